"""Pure-JAX reference backend: every op on ``jax.lax.all_to_all``.

It defines the semantics (row order, padding, overflow, accumulation order) that
the CUDA kernels must reproduce, and it is the default wherever no GPU kernels
are available. Everything here runs per rank inside ``shard_map``. It favours
clarity over memory: each rank materialises ``[R, T, ...]`` send slabs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jax_ep import fp8
from jax_ep.backends.vma import varying
from jax_ep.types import DispatchConfig, HandleArrays, LowLatencyConfig, LowLatencyHandleArrays

I32 = jnp.int32


# ----------------------------------------------------------------------------- helpers

def _exchange(x: jax.Array, axis_name: str) -> jax.Array:
    """``x[r]`` is sent to rank r; returns ``y[s]`` = what rank s sent here."""
    out = jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0, tiled=False)
    return varying(out, axis_name)  # (an empty x comes back without the axis in its type)


def _dest_rank(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> jax.Array:
    """Rank owning each slot's expert, -1 for masked or out-of-range slots."""
    local = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    return jnp.where(valid, topk_idx // local, -1).astype(I32)


def _sequential_sum(parts: jax.Array) -> jax.Array:
    """Sums along axis 0 in index order (fixed order: bitwise reproducible)."""
    acc = parts[0]
    for i in range(1, parts.shape[0]):
        acc = acc + parts[i]
    return acc


def _node_ordered_sum(parts: jax.Array, node_size) -> jax.Array:
    """Sums per-source-rank partials ``[R, ...]``: the ranks of each node in rank order,
    then the nodes in node order (the internode kernels reduce inside a node before the
    network hop); rank order when all ranks share one node (``node_size`` None)."""
    if node_size is None:
        return _sequential_sum(parts)
    per_node = [_sequential_sum(parts[i:i + node_size])
                for i in range(0, parts.shape[0], node_size)]
    return _sequential_sum(jnp.stack(per_node))


def _scatter_rows(cap: int, rows: jax.Array, values: jax.Array, fill) -> jax.Array:
    """out[rows[i]] = values[i] for 0 <= rows[i] < cap; other rows hold ``fill``."""
    out = jnp.full((cap,) + values.shape[1:], fill, values.dtype)
    safe = jnp.where((rows >= 0) & (rows < cap), rows, cap)
    return out.at[safe].set(values, mode="drop")


# ----------------------------------------------------------------------------- layout

def get_dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int):
    dest = _dest_rank(topk_idx, num_experts, num_ranks)
    valid = dest >= 0
    expert = jnp.where(valid, topk_idx, num_experts)
    per_expert = jnp.zeros((num_experts,), I32).at[expert.reshape(-1)].add(1, mode="drop")
    in_rank = jnp.any(dest[:, :, None] == jnp.arange(num_ranks, dtype=I32), axis=1)
    per_rank = jnp.sum(in_rank, axis=0, dtype=I32)
    return per_rank, per_expert, in_rank


# ----------------------------------------------------------------------------- normal dispatch

def _broadcast_to_ranks(a: jax.Array, num_ranks: int) -> jax.Array:
    return jnp.broadcast_to(a[None], (num_ranks,) + a.shape)


def dispatch(payload: Tuple[jax.Array, ...], topk_idx: jax.Array, topk_weights: jax.Array,
             cfg: DispatchConfig):
    R, T, K, E = cfg.num_ranks, cfg.num_tokens, cfg.num_topk, cfg.num_experts
    L, cap = cfg.num_local_experts, cfg.capacity
    me = jax.lax.axis_index(cfg.axis_name).astype(I32)
    if cfg.cast_fp8:  # what the CUDA kernel computes on the way
        payload = fp8.per_token_cast(payload[0])

    dest = _dest_rank(topk_idx, E, R)
    in_rank = jnp.any(dest[:, :, None] == jnp.arange(R, dtype=I32), axis=1)  # [T, R]

    # Every rank receives every token with its routing; the mask says which are its own.
    recv_mask = _exchange(in_rank.T.astype(I32), cfg.axis_name) > 0  # [R(src), T]
    recv_idx = _exchange(_broadcast_to_ranks(topk_idx, R), cfg.axis_name)  # [R, T, K] global ids
    recv_w = _exchange(_broadcast_to_ranks(topk_weights, R), cfg.axis_name)
    recv_payload = [_exchange(_broadcast_to_ranks(p, R), cfg.axis_name) for p in payload]

    recv_dest = _dest_rank(recv_idx, E, R)
    is_local_slot = recv_dest == me  # [R, T, K]
    local_idx = jnp.where(is_local_slot, recv_idx - me * L, -1).astype(I32)
    local_w = jnp.where(is_local_slot, recv_w, 0.0).astype(jnp.float32)
    src_rank = jnp.broadcast_to(jnp.arange(R, dtype=I32)[:, None], (R, T))
    src_token = jnp.broadcast_to(jnp.arange(T, dtype=I32)[None, :], (R, T))

    if cfg.layout == "rank":
        flat_mask = recv_mask.reshape(-1)
        needed = jnp.sum(flat_mask, dtype=I32)
        pos = jnp.cumsum(flat_mask.astype(I32)) - 1
        kept = flat_mask & (pos < cap)
        rows = jnp.where(kept, pos, -1)  # [R*T]
        out_payload = tuple(_scatter_rows(cap, rows, p.reshape((R * T,) + p.shape[2:]), 0)
                            for p in recv_payload)
        out_idx = _scatter_rows(cap, rows, local_idx.reshape(R * T, K), -1)
        out_w = _scatter_rows(cap, rows, local_w.reshape(R * T, K), 0.0)
        handle = HandleArrays(
            recv_src_rank=_scatter_rows(cap, rows, src_rank.reshape(-1), -1),
            recv_src_token=_scatter_rows(cap, rows, src_token.reshape(-1), -1),
            recv_src_slot=jnp.full((cap,), -1, I32),
            send_pos=_exchange(rows.reshape(R, T), cfg.axis_name).T,  # [T, R(dest)]
        )
        expert_of_slot = jnp.where(out_idx >= 0, out_idx, L).reshape(-1)
        per_expert = jnp.zeros((L,), I32).at[expert_of_slot].add(1, mode="drop")
        num_recv = jnp.minimum(needed, cap).astype(I32)
        return (out_payload, out_idx, out_w, num_recv, per_expert, per_expert,
                jnp.maximum(needed - cap, 0).astype(I32), handle)

    # Expert layout: one row per (source rank, token, slot) whose expert is local,
    # ordered by (local expert, source rank, source token, slot); groups padded.
    n = R * T * K
    key = jnp.where(local_idx >= 0, local_idx, L).reshape(-1)
    order = jnp.argsort(key, stable=True)
    sorted_expert = key[order]
    counts = jnp.zeros((L,), I32).at[key].add(1, mode="drop")
    align = cfg.expert_alignment
    padded = (counts + align - 1) // align * align
    start = jnp.cumsum(counts) - counts
    padded_start = jnp.cumsum(padded) - padded
    needed = jnp.sum(padded, dtype=I32)
    is_real = sorted_expert < L
    e_safe = jnp.minimum(sorted_expert, L - 1)
    row_sorted = padded_start[e_safe] + jnp.arange(n, dtype=I32) - start[e_safe]
    row_sorted = jnp.where(is_real & (row_sorted < cap), row_sorted, -1)
    rows = jnp.full((n,), -1, I32).at[order].set(row_sorted)  # per flat (src, t, k)

    token_of = jnp.arange(n, dtype=I32) // K  # flat (src*T + t)
    out_payload = tuple(
        _scatter_rows(cap, rows, p.reshape((R * T,) + p.shape[2:])[token_of], 0)
        for p in recv_payload)
    out_idx = _scatter_rows(cap, rows, local_idx.reshape(-1), -1)
    out_w = _scatter_rows(cap, rows, local_w.reshape(-1), 0.0)
    flat_src_rank = jnp.repeat(src_rank.reshape(-1), K)
    flat_src_token = jnp.repeat(src_token.reshape(-1), K)
    flat_slot = jnp.tile(jnp.arange(K, dtype=I32), R * T)
    back = _exchange(rows.reshape(R, T, K), cfg.axis_name)  # [R(dest), T, K]
    handle = HandleArrays(
        recv_src_rank=_scatter_rows(cap, rows, flat_src_rank, -1),
        recv_src_token=_scatter_rows(cap, rows, flat_src_token, -1),
        recv_src_slot=_scatter_rows(cap, rows, flat_slot, -1),
        send_pos=jnp.max(back, axis=0),  # -1 except at the slot's own destination
    )
    kept_per_expert = jnp.zeros((L,), I32).at[jnp.where(out_idx >= 0, out_idx, L)].add(
        1, mode="drop")
    padded_end = jnp.minimum(padded_start + padded, cap)
    group_sizes = (padded_end - jnp.minimum(padded_start, cap)).astype(I32)
    num_recv = jnp.minimum(needed, cap).astype(I32)
    outs = (out_payload, out_idx, out_w, num_recv, kept_per_expert, group_sizes,
            jnp.maximum(needed - cap, 0).astype(I32), handle)
    # per-rank results, also where they are built without the exchange (no rows: cap 0)
    return jax.tree.map(lambda a: varying(a, cfg.axis_name), outs)


def cached_dispatch(x: jax.Array, handle: HandleArrays, cfg: DispatchConfig) -> jax.Array:
    """Moves ``x [T, W]`` into the rows of an earlier dispatch (zeros elsewhere)."""
    R, T = cfg.num_ranks, cfg.num_tokens
    recv = _exchange(_broadcast_to_ranks(x, R), cfg.axis_name).reshape((R * T,) + x.shape[1:])
    valid = handle.recv_src_rank >= 0
    flat = jnp.where(valid, handle.recv_src_rank * T + handle.recv_src_token, 0)
    out = recv[flat]
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), out, jnp.zeros_like(out))


def combine(y: jax.Array, weights: Optional[jax.Array], handle: HandleArrays,
            cfg: DispatchConfig) -> jax.Array:
    """out[t] = sum over rows from token t of weights[row] * y[row], in fp32."""
    R, T = cfg.num_ranks, cfg.num_tokens
    valid = handle.recv_src_rank >= 0
    contrib = y.astype(jnp.float32)
    if weights is not None:
        contrib = contrib * weights.astype(jnp.float32)[:, None]
    contrib = jnp.where(valid[:, None], contrib, 0.0)
    flat = jnp.where(valid, handle.recv_src_rank * T + handle.recv_src_token, R * T)
    partial = jnp.zeros((R * T, y.shape[1]), jnp.float32).at[flat].add(contrib, mode="drop")
    parts = _exchange(partial.reshape(R, T, y.shape[1]), cfg.axis_name)  # [R(src of rows)]
    return _node_ordered_sum(parts, cfg.node_size).astype(y.dtype)


# ----------------------------------------------------------------------------- low latency

def _ll_positions(topk_idx: jax.Array, cfg: LowLatencyConfig):
    """Deduplicated routing: which slots send, and each slot's row in its expert's block."""
    E, T, K = cfg.num_experts, cfg.num_tokens, cfg.num_topk
    valid = (topk_idx >= 0) & (topk_idx < E)
    expert = jnp.where(valid, topk_idx, E)
    earlier_same = jnp.triu(jnp.ones((K, K), bool), k=1)  # [k', k]: k' < k
    dup = jnp.any((expert[:, :, None] == expert[:, None, :]) & earlier_same[None] &
                  valid[:, :, None], axis=1)
    first = valid & ~dup  # the slot that carries the (token, expert) row
    has = jnp.zeros((T, E + 1), I32).at[jnp.arange(T)[:, None], expert].max(
        first.astype(I32))[:, :E]  # [T, E]
    before = jnp.cumsum(has, axis=0) - has  # tokens before t routed to e
    pos = jnp.take_along_axis(before, jnp.minimum(expert, E - 1), axis=1)  # [T, K]
    return valid, first, has, pos


def ll_dispatch(x: jax.Array, topk_idx: jax.Array, slot_scale: Optional[jax.Array],
                cfg: LowLatencyConfig):
    E, R, L, M = cfg.num_experts, cfg.num_ranks, cfg.num_local_experts, cfg.max_tokens_per_rank
    T, K, H = cfg.num_tokens, cfg.num_topk, cfg.hidden
    me = jax.lax.axis_index(cfg.axis_name).astype(I32)
    valid, first, has, pos = _ll_positions(topk_idx, cfg)
    expert = jnp.where(valid, topk_idx, E)

    if slot_scale is None:
        rows = jnp.broadcast_to(x[:, None, :], (T, K, H))
    else:  # scale of the (token, expert) row = sum of the weights of its slots
        same = (expert[:, :, None] == expert[:, None, :]) & valid[:, None, :]
        scale = jnp.sum(jnp.where(same, slot_scale[:, None, :].astype(jnp.float32), 0.0), -1)
        rows = (x[:, None, :].astype(jnp.float32) * scale[..., None]).astype(x.dtype)
    target_e = jnp.where(first, expert, E).reshape(-1)
    target_p = jnp.where(first, pos, 0).reshape(-1)
    token_ids = jnp.broadcast_to(jnp.arange(T, dtype=I32)[:, None], (T, K)).reshape(-1)

    def to_blocks(values, fill):
        out = jnp.full((E, M) + values.shape[1:], fill, values.dtype)
        return out.at[target_e, target_p].set(values, mode="drop")

    def exchange_blocks(blocks):  # [E, M, ...] -> [L, R*M, ...] grouped by source rank
        got = _exchange(blocks.reshape((R, L, M) + blocks.shape[2:]), cfg.axis_name)
        got = jnp.moveaxis(got, 0, 1)  # [L, R(src), M, ...]
        return got.reshape((L, R * M) + blocks.shape[2:])

    flat_rows = rows.reshape(T * K, H)
    if cfg.use_fp8:
        q, s = fp8.per_token_cast(flat_rows)
        recv_x = (exchange_blocks(to_blocks(q, 0)), exchange_blocks(to_blocks(s, 0.0)))
    else:
        recv_x = exchange_blocks(to_blocks(flat_rows, 0))
    recv_src_token = exchange_blocks(to_blocks(token_ids, -1))
    sent_counts = jnp.sum(has, axis=0, dtype=I32).reshape(R, L)
    count_per_rank = _exchange(sent_counts, cfg.axis_name).T  # [L, R(src)]
    send_pos = jnp.where(valid, me * M + pos, -1).astype(I32)
    handle = LowLatencyHandleArrays(recv_src_token, count_per_rank.astype(I32), send_pos)
    return recv_x, jnp.sum(count_per_rank, axis=1, dtype=I32), handle


def ll_combine_exchange(y: jax.Array, cfg: LowLatencyConfig) -> jax.Array:
    """Sends expert outputs ``[L, R*M, W]`` home; returns ``[E, M, W]`` (rows of this rank's tokens)."""
    R, L, M = cfg.num_ranks, cfg.num_local_experts, cfg.max_tokens_per_rank
    blocks = jnp.moveaxis(y.reshape((L, R, M) + y.shape[2:]), 1, 0)  # [R(home), L, M, W]
    got = _exchange(blocks, cfg.axis_name)  # [R(expert rank), L, M, W]
    return got.reshape((R * L, M) + y.shape[2:])


def ll_combine_reduce(home: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
                      handle: LowLatencyHandleArrays, cfg: LowLatencyConfig,
                      out_dtype) -> jax.Array:
    """out[t] = sum_k w[t,k] * home[e_k, row of (t, e_k)], fp32 in slot order.

    A masked slot adds an exact 0 (its gathered row is a placeholder that may hold
    anything, NaN included: rows past the counts are never read)."""
    M = cfg.max_tokens_per_rank
    valid = handle.send_pos >= 0
    e = jnp.where(valid, topk_idx, 0)
    p = jnp.where(valid, handle.send_pos % M, 0)
    gathered = home[e, p].astype(jnp.float32)  # [T, K, W]
    w = jnp.where(valid, topk_weights.astype(jnp.float32), 0.0)
    terms = jnp.where(valid[..., None], gathered * w[..., None], 0.0)
    return _sequential_sum(jnp.moveaxis(terms, 1, 0)).astype(out_dtype)


def ll_combine(y, topk_idx, topk_weights, handle, cfg):
    home = ll_combine_exchange(y, cfg)
    return ll_combine_reduce(home, topk_idx, topk_weights, handle, cfg, y.dtype)


# The split forms: an all_to_all has nothing to overlap, so the dispatch runs whole in
# *_send (the "sent" state is its result); the combine's exchange runs in *_send and its
# reduction in *_recv. Same values as the fused ops, bitwise.

def ll_dispatch_send(x, topk_idx, cfg, slot_scale=None):
    return ll_dispatch(x, topk_idx, slot_scale, cfg)


def ll_dispatch_recv(sent, cfg, dtype, *, hidden=None):
    del cfg, dtype, hidden  # the send did everything
    return sent


def ll_combine_send(y, handle, cfg):
    del handle
    return ll_combine_exchange(y, cfg)


def ll_combine_recv(sent, topk_idx, topk_weights, handle, cfg, dtype, width):
    del width
    return ll_combine_reduce(sent, topk_idx, topk_weights, handle, cfg, dtype)
