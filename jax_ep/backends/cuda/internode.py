"""CUDA backend, normal ops over several nodes: an RDMA hop, then the NVLink hop.

Rank ``(n, g)`` (node ``n``, local index ``g``, global rank ``n * G + g``) sends each token
once to every node ``m`` holding one of its experts, to the rank ``(m, g)`` with the same
local index (the rail exchange over NVSHMEM, ``cuda/internode/rail.h``); there the
intranode kernels fan it out over NVLink, one node hop per source node (the ``T`` rows
rank ``(n, g)`` forwarded are the "tokens" of hop ``n``, their experts this node's). The
hops' rows, concatenated in source-node order, are the reference backend's rows in its
order (source rank, then token; in the expert layout per expert first): a row keeps its
hop position or moves later, so capacity drops the same rows.

Combine runs backwards: every node hop reduces its rows inside the node in fp32 (the
local ranks in rank order), the forwarders send one fp32 partial per token home over the
rail exchange, and the home rank adds the nodes' partials in node order (the reference
backend's node-ordered sum, ``DispatchConfig.node_size``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_ep import fp8
from jax_ep.backends.cuda import normal
from jax_ep.backends.cuda._ffi import F32, I32, call, i64
from jax_ep.backends.vma import varying
from jax_ep.types import DispatchConfig, HandleArrays, InternodeHandleArrays

# cuda/internode/rail.h RailOp: names the op in timeout messages
_DISPATCH, _COMBINE, _CACHED_DISPATCH = 0, 1, 2

# buffer_id -> bytes of its RDMA (symmetric) region in this process; set by buffer.py
rdma_bytes = {}

RAIL_HEADER_BYTES = 4096  # cuda/internode/rail.h kRailDataOffset
MAX_CHUNKS = 64  # rail exchanges per op when the region is smaller than the batch needs


def spans_nodes(cfg: DispatchConfig) -> bool:
    """Whether ``cfg``'s EP axis spans several nodes (then these ops run)."""
    return cfg.node_size is not None and cfg.node_size < cfg.num_ranks


def _align(n: int, a: int) -> int:
    return -(-int(n) // a) * a


def rail_bytes(num_nodes: int, num_tokens: int, row_bytes, per_node_rows: bool) -> int:
    """Bytes of RDMA region one rail exchange needs (cuda/internode/rail.h rail_layout)."""
    packed = sum(_align(b, 16) for b in row_bytes)
    nt = num_nodes * num_tokens
    off = RAIL_HEADER_BYTES
    off = _align(off + 4 * nt, 256)
    off = _align(off + nt * packed, 256)
    off = _align(off + (nt if per_node_rows else num_tokens) * packed, 256)
    return _align(off + 4 * nt, 256)


def rdma_bytes_hint(num_tokens: int, hidden: int, num_nodes: int, dtype_bytes: int = 2,
                    num_topk: int = 8) -> int:
    """RDMA bytes per GPU for normal dispatch and combine of ``num_tokens`` per rank."""
    dispatch = rail_bytes(num_nodes, num_tokens, [hidden * dtype_bytes, 4 * num_topk,
                                                  4 * num_topk], False)
    combine = rail_bytes(num_nodes, num_tokens, [4 * hidden], True)  # fp32 partials
    return max(dispatch, combine)


def chunk_tokens(num_nodes: int, num_tokens: int, row_bytes, per_node_rows: bool,
                 region_bytes: int) -> int:
    """Tokens per rail exchange: all ``num_tokens`` when they fit in the RDMA region, else
    the most that do (the exchange then runs chunk after chunk through the same region,
    each waiting for the receivers' acknowledgement of the previous); 0 if none fits."""
    if rail_bytes(num_nodes, num_tokens, row_bytes, per_node_rows) <= region_bytes:
        return num_tokens
    lo, hi = 0, num_tokens  # rail_bytes grows with the tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rail_bytes(num_nodes, mid, row_bytes, per_node_rows) <= region_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _row_bytes(a: jax.Array, lead: int = 1) -> int:
    size = 1
    for d in a.shape[lead:]:
        size *= int(d)
    return size * jnp.dtype(a.dtype).itemsize


def _rail_exchange(send_mask, arrays, cfg: DispatchConfig, op: int, per_node_rows: bool,
                   what: str):
    """Row t (or (m, t) with ``per_node_rows``) of every array to each node m with
    ``send_mask[m, t]``; returns ``(recv_flags [N, T], rows [N, T, ...] per array)``, zeros
    where nothing came. Runs in chunks of tokens where the RDMA region is smaller than the
    whole batch needs."""
    N, T = send_mask.shape
    lead = 2 if per_node_rows else 1
    row_bytes = [_row_bytes(a, lead) for a in arrays]
    region = rdma_bytes.get(cfg.buffer_id)
    chunk = T if region is None else chunk_tokens(N, T, row_bytes, per_node_rows, region)
    if chunk < 1 or -(-T // max(chunk, 1)) > MAX_CHUNKS:
        need = rail_bytes(N, -(-T // MAX_CHUNKS), row_bytes, per_node_rows)
        raise ValueError(
            f"{what}: over {N} nodes these {T} tokens need an RDMA buffer of at least {need} "
            f"bytes per GPU (in {MAX_CHUNKS} chunks at most) but the Buffer has {region}; "
            f"create it with num_rdma_bytes>={need} (Buffer.get_rdma_size_hint gives the "
            "bytes of one exchange of the whole batch)")
    flags, outs = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        part = tuple(a[:, t0:t1] if per_node_rows else a[t0:t1] for a in arrays)
        results = [jax.ShapeDtypeStruct((N, t1 - t0), I32)] + [
            jax.ShapeDtypeStruct((N, t1 - t0) + a.shape[lead:], a.dtype) for a in part]
        got = call("jax_ep_rail_exchange", results, send_mask[:, t0:t1].astype(I32), *part,
                   axis_name=cfg.axis_name, buffer_id=i64(cfg.buffer_id),
                   num_sms=i64(cfg.num_sms), op=i64(op))
        flags.append(got[0])
        outs.append(got[1:])
    if len(flags) == 1:
        return flags[0], tuple(outs[0])
    return (jnp.concatenate(flags, axis=1),
            tuple(jnp.concatenate(parts, axis=1) for parts in zip(*outs)))


def _node_config(cfg: DispatchConfig) -> DispatchConfig:
    """The NVLink hop's config: this node's ranks and experts, ``T`` forwarded rows."""
    G = cfg.node_size
    return dataclasses.replace(cfg, num_ranks=G, num_experts=G * cfg.num_local_experts,
                               expert_alignment=1, cast_fp8=False, node_size=None)


def _hop(node_hops: HandleArrays, n: int) -> HandleArrays:
    return jax.tree.map(lambda a: a[n], node_hops)


def _gather(stacked: jax.Array, rows: jax.Array, fill) -> jax.Array:
    """``[N, cap, ...]`` node-hop rows -> ``[cap, ...]``: row ``rows[i]``, ``fill`` at -1."""
    flat = stacked.reshape((-1,) + stacked.shape[2:])
    got = flat[jnp.maximum(rows, 0)]
    keep = (rows >= 0).reshape((-1,) + (1,) * (got.ndim - 1))
    return jnp.where(keep, got, jnp.asarray(fill, got.dtype))


def _rank_layout_rows(num_recv, overflow, cap: int):
    """Rank layout: hop n's rows follow those of hops < n. Returns (rows, hop, needed)."""
    need = num_recv + overflow  # [N] rows each hop had before capacity
    start = jnp.cumsum(need) - need
    i = jnp.arange(cap, dtype=I32)
    # last hop starting <= i (unrolled: the default method is a while loop, a
    # device-to-host round trip per step on GPUs)
    hop = jnp.searchsorted(start, i, side="right", method="scan_unrolled").astype(I32) - 1
    q = i - start[hop]
    rows = jnp.where(q < num_recv[hop], hop * cap + q, -1)
    return rows, hop, jnp.sum(need).astype(I32)


def _expert_layout_rows(needed_per_expert, cap: int, align: int):
    """Expert layout: expert l's group holds hop 0's rows of l, then hop 1's..., padded to
    ``align``; hop n's rows of l start at its rows of experts < l (the hops run unaligned).
    Returns (rows, hop, needed, group_start, group_end)."""
    N, L = needed_per_expert.shape
    counts = jnp.sum(needed_per_expert, axis=0)
    padded = (counts + align - 1) // align * align
    end = jnp.cumsum(padded)
    start = end - padded
    i = jnp.arange(cap, dtype=I32)
    group = jnp.searchsorted(end, i, side="right",  # L past the groups; unrolled as above
                             method="scan_unrolled").astype(I32)
    g = jnp.minimum(group, L - 1)
    q = i - start[g]
    real = (group < L) & (q < counts[g])
    before_hop = jnp.cumsum(needed_per_expert, axis=0) - needed_per_expert  # [N, L]
    hop = jnp.clip(jnp.sum(q[:, None] >= before_hop[:, g].T, axis=1).astype(I32) - 1, 0, N - 1)
    in_hop = jnp.cumsum(needed_per_expert, axis=1) - needed_per_expert  # hop's group starts
    row = in_hop[hop, g] + q - before_hop[hop, g]
    rows = jnp.where(real & (row < cap), hop * cap + row, -1)
    return rows, hop, jnp.sum(padded).astype(I32), start, end


def _count_experts(recv_idx: jax.Array, num_local: int) -> jax.Array:
    expert = jnp.where(recv_idx >= 0, recv_idx, num_local).reshape(-1)
    return jnp.zeros((num_local,), I32).at[expert].add(1, mode="drop")


def dispatch(payload, topk_idx: jax.Array, topk_weights: jax.Array, cfg: DispatchConfig):
    G = cfg.node_size
    N = cfg.num_ranks // G
    T, E, L, cap = cfg.num_tokens, cfg.num_experts, cfg.num_local_experts, cfg.capacity
    per_node = G * L  # experts of one node
    if cfg.cast_fp8:  # cast before the network hop: the bytes that travel are FP8
        payload = fp8.per_token_cast(payload[0])
    payload = tuple(payload)
    if T == 0:
        return _empty_dispatch(payload, cfg)
    arrays = payload + (topk_idx.astype(I32), topk_weights.astype(F32))
    valid = (topk_idx >= 0) & (topk_idx < E)
    node_of = jnp.where(valid, topk_idx // per_node, -1)
    sent_to_node = jnp.any(node_of[None] == jnp.arange(N, dtype=I32)[:, None, None],
                           axis=2).astype(I32)  # [N, T]
    recv_flags, recv = _rail_exchange(sent_to_node, arrays, cfg, _DISPATCH, False, "dispatch")
    *hop_payload, hop_idx, hop_w = recv
    my_node = (jax.lax.axis_index(cfg.axis_name) // G).astype(I32)
    here = ((recv_flags[..., None] > 0) & (hop_idx >= 0) & (hop_idx < E) &
            (hop_idx // per_node == my_node))
    local_idx = jnp.where(here, hop_idx - my_node * per_node, -1).astype(I32)
    node_cfg = _node_config(cfg)
    hops = [normal.dispatch_with_totals(tuple(p[n] for p in hop_payload), local_idx[n],
                                        hop_w[n], node_cfg) for n in range(N)]
    (h_payload, h_idx, h_w, h_num, _, _, h_overflow, h_handle,
     h_needed) = jax.tree.map(lambda *a: jnp.stack(a), *hops)

    if cfg.layout == "rank":
        rows, hop, needed = _rank_layout_rows(h_num, h_overflow, cap)
    else:
        rows, hop, needed, start, end = _expert_layout_rows(h_needed, cap, cfg.expert_alignment)
    out_payload = tuple(_gather(p, rows, 0) for p in h_payload)
    out_idx = _gather(h_idx, rows, -1)
    out_w = _gather(h_w, rows, 0.0)
    kept = rows >= 0
    handle = InternodeHandleArrays(
        recv_src_rank=jnp.where(kept, hop * G + _gather(h_handle.recv_src_rank, rows, -1), -1),
        recv_src_token=_gather(h_handle.recv_src_token, rows, -1),
        recv_src_slot=_gather(h_handle.recv_src_slot, rows, -1),
        rows=rows, node_hops=h_handle, sent_to_node=sent_to_node, recv_from_node=recv_flags)
    per_expert = _count_experts(out_idx, L)
    if cfg.layout == "rank":
        group_sizes = per_expert
    else:
        group_sizes = (jnp.minimum(end, cap) - jnp.minimum(start, cap)).astype(I32)
    outs = (out_payload, out_idx, out_w, jnp.minimum(needed, cap).astype(I32), per_expert,
            group_sizes, jnp.maximum(needed - cap, 0).astype(I32), handle)
    return jax.tree.map(lambda a: varying(a, cfg.axis_name), outs)


def _empty_dispatch(payload, cfg: DispatchConfig):
    """What a dispatch with no tokens anywhere returns (no exchange needed)."""
    N, G = cfg.num_ranks // cfg.node_size, cfg.node_size
    cap, K, L = cfg.capacity, cfg.num_topk, cfg.num_local_experts
    zero = jax.lax.axis_index(cfg.axis_name).astype(I32) * 0

    def full(shape, value, dtype):
        return jnp.full(shape, value, dtype) + zero.astype(dtype)

    meta = (cap, K) if cfg.layout == "rank" else (cap,)
    none = full((cap,), -1, I32)
    hop_send = (N, 0, G) if cfg.layout == "rank" else (N, 0, K)
    hops = HandleArrays(full((N, cap), -1, I32), full((N, cap), -1, I32),
                        full((N, cap), -1, I32), full(hop_send, -1, I32))
    handle = InternodeHandleArrays(none, none, none, none, hops, full((N, 0), 0, I32),
                                   full((N, 0), 0, I32))
    return (tuple(full((cap,) + p.shape[1:], 0, p.dtype) for p in payload),
            full(meta, -1, I32), full(meta, 0, F32), full((), 0, I32), full((L,), 0, I32),
            full((L,), 0, I32), full((), 0, I32), handle)


def cached_dispatch(x: jax.Array, handle: InternodeHandleArrays,
                    cfg: DispatchConfig) -> jax.Array:
    """``x [T, W]`` moved into the rows of the dispatch that made ``handle``."""
    N = cfg.num_ranks // cfg.node_size
    if cfg.num_tokens == 0:
        return varying(jnp.zeros((cfg.capacity,) + x.shape[1:], x.dtype), cfg.axis_name)
    _, (forwarded,) = _rail_exchange(handle.sent_to_node, (x,), cfg, _CACHED_DISPATCH, False,
                                     "cached_dispatch")
    node_cfg = _node_config(cfg)
    hops = jnp.stack([normal.cached_dispatch(forwarded[n], _hop(handle.node_hops, n), node_cfg)
                      for n in range(N)])
    return _gather(hops, handle.rows, 0)


def combine(y: jax.Array, weights, handle: InternodeHandleArrays,
            cfg: DispatchConfig) -> jax.Array:
    """out[t] = sum over the rows of t of weights[row] * y[row] in fp32: inside each node
    first (the node hops), then the nodes in node order."""
    N = cfg.num_ranks // cfg.node_size
    cap, width = cfg.capacity, y.shape[1]
    if cfg.num_tokens == 0:
        return varying(jnp.zeros((0, width), y.dtype), cfg.axis_name)
    dest = jnp.where(handle.rows >= 0, handle.rows, N * cap)  # back to the node hops' rows

    def to_hops(a):
        out = jnp.zeros((N * cap,) + a.shape[1:], F32).at[dest].set(a.astype(F32), mode="drop")
        return out.reshape((N, cap) + a.shape[1:])

    y_hops = to_hops(y)
    w_hops = None if weights is None else to_hops(weights)
    node_cfg = _node_config(cfg)
    partials = jnp.stack([
        normal.combine(y_hops[n], None if w_hops is None else w_hops[n],
                       _hop(handle.node_hops, n), node_cfg) for n in range(N)])  # [N, T, W]
    _, (home,) = _rail_exchange(handle.recv_from_node, (partials,), cfg, _COMBINE, True,
                                "combine")
    total = home[0]
    for m in range(1, N):
        total = total + home[m]
    return total.astype(y.dtype)
