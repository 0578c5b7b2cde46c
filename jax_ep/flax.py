"""Flax NNX mixture-of-experts layer on jax_ep's dispatch and combine.

:class:`MoE` is a drop-in MoE FFN: a router (linear, softmax or sigmoid scores),
top-k selection with optional DeepSeek-V3 group-limited routing and
aux-loss-free bias balancing, routed SwiGLU experts sharded over the
expert-parallel (EP) mesh axis, and an optional shared expert.

The forward pass routes every token, moves it with
``jax_ep.dispatch(layout="expert")`` to the ranks holding its experts, runs the
local experts with one ``jax.lax.ragged_dot`` per projection over the received
rows (grouped by local expert), and brings the results home with
``jax_ep.combine(y, handle, recv_topk_weights)``. With a fixed ``expert_capacity`` it
exchanges one row per (token, rank) instead (``layout="rank"``, DeepEP's normal mode):
rows are copied into their local experts' slots on arrival and each row's expert outputs
are weighted and summed before ``jax_ep.combine``: combine and both backward exchanges
then move less than half the rows (a token reaches ~3.6 of 4 ranks but 8 experts). Everything from routing to
combine runs inside ``jax.shard_map`` over the EP axis: tokens are sharded over
that axis and each rank holds ``num_experts / R`` experts.

Example (8 simulated CPU devices: set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax)::

    import jax, jax.numpy as jnp
    from flax import nnx
    from jax_ep.flax import MoE

    mesh = jax.make_mesh((8,), ("ep",))
    moe = MoE(hidden=64, ffn_hidden=128, num_experts=16, top_k=2, mesh=mesh,
              rngs=nnx.Rngs(0))
    x = jnp.ones((8 * 32, 64))               # [tokens, hidden], tokens % 8 == 0

    @nnx.jit
    def fwd(moe, x):
        return moe(x)

    out, stats = fwd(moe, x)                 # out [256, 64]; stats.load [16]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_ep

__all__ = ["ExpertBias", "MoE", "MoEStats", "Routing", "linen_moe", "route", "swiglu"]

SCORE_FUNCS = ("softmax", "sigmoid")
EXCHANGES = ("auto", "rank", "expert")
_VECTOR_BYTES = 16  # jax_ep moves rows in 16-byte vectors


class ExpertBias(nnx.Variable):
    """Non-trainable per-expert routing bias (DeepSeek-V3 aux-loss-free balancing).

    It is added to the scores for expert *selection* only; the combine weights use
    the unbiased scores. Optimizers built with ``wrt=nnx.Param`` leave it alone; update
    it with :meth:`MoE.update_bias`.

    Example::

        bias = ExpertBias(jnp.zeros((16,)))
    """


class MoEStats(NamedTuple):
    """Statistics of one :class:`MoE` forward pass (replicated across ranks).

    load: ``[E]`` int32, (token, slot) pairs routed to each expert, over all ranks.
    dropped: ``[]`` int32, expert rows dropped because ``capacity`` or
        ``expert_capacity`` was too small, summed over ranks (always 0 with the defaults,
        None).
    aux_loss: ``[]`` f32, the Switch/GShard load-balancing loss
        ``E * sum_e f_e * p_e`` (``f_e`` fraction of slots routed to e, ``p_e`` mean
        score of e); differentiable, add it to the loss with a small weight if wanted.

    Example::

        out, stats = moe(x)
        loss = task_loss(out) + 1e-2 * stats.aux_loss
        print(stats.load, stats.dropped)          # [E] per-expert load, dropped rows
    """

    load: jax.Array
    dropped: jax.Array
    aux_loss: jax.Array


class Routing(NamedTuple):
    """Router output for ``N`` tokens: ``topk_idx [N, K]`` int32 expert ids,
    ``topk_weights [N, K]`` f32 combine weights, ``scores [N, E]`` f32 (unbiased).

    Example::

        idx, weights, scores = route(logits, top_k=2)
    """

    topk_idx: jax.Array
    topk_weights: jax.Array
    scores: jax.Array


def route(logits: jax.Array, *, top_k: int, score_func: str = "softmax",
          bias: Optional[jax.Array] = None, n_groups: int = 1, topk_groups: int = 1,
          normalize: Optional[bool] = None, scaling: float = 1.0) -> Routing:
    """Top-k routing from router logits, as in DeepSeek-V3.

    ``scores = softmax(logits)`` or ``sigmoid(logits)``; the experts are chosen by the top
    ``top_k`` of ``scores + bias`` (``bias`` only steers selection and gets no gradient).
    With ``n_groups > 1`` the experts are split into ``n_groups`` contiguous groups, each
    group is scored by the sum of its two best biased scores, and only experts of the
    best ``topk_groups`` groups can be chosen. The weights are the unbiased scores of the
    chosen experts, divided by their sum when ``normalize`` (default: True for sigmoid,
    False for softmax), times ``scaling``.

    Args:
      logits: ``[N, E]`` router logits (any float dtype; computed in f32).
      top_k: experts per token, ``1 <= top_k <= E``.
      score_func: ``"softmax"`` or ``"sigmoid"``.
      bias: optional ``[E]`` selection bias.
      n_groups, topk_groups: group-limited routing (``E % n_groups == 0``).
      normalize: renormalise the top-k weights to sum to 1.
      scaling: multiplies the weights (DeepSeek's ``routed_scaling_factor``).

    Returns:
      :class:`Routing`.

    Example::

        r = route(jnp.array([[0.1, 2.0, -1.0, 0.5]]), top_k=2)
        # r.topk_idx == [[1, 3]]
    """
    num_experts = logits.shape[-1]
    _check_routing_args("route", num_experts, top_k, score_func, n_groups, topk_groups)
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)
    select = scores
    if bias is not None:
        select = select + jax.lax.stop_gradient(bias.astype(jnp.float32))
    select = jax.lax.stop_gradient(select)
    if n_groups > 1:
        per_group = num_experts // n_groups
        grouped = select.reshape(select.shape[:-1] + (n_groups, per_group))
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)
        _, best_groups = jax.lax.top_k(group_score, topk_groups)
        keep = jnp.sum(jax.nn.one_hot(best_groups, n_groups, dtype=jnp.int32), axis=-2) > 0
        keep = jnp.repeat(keep, per_group, axis=-1)
        select = jnp.where(keep, select, -jnp.inf)
    _, topk_idx = jax.lax.top_k(select, top_k)
    weights = jnp.take_along_axis(scores, topk_idx, axis=-1)
    if normalize is None:
        normalize = score_func == "sigmoid"
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return Routing(topk_idx.astype(jnp.int32), weights.astype(jnp.float32), scores)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU FFN ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``.

    The matmuls output ``x``'s dtype (the GEMMs accumulate in f32; with bf16 operands
    their backward matmuls then stay bf16 x bf16 instead of f32 x f32); ``silu(gate) *
    up`` is computed in f32 and cast back (see :func:`_glu`).

    Example::

        x = jnp.ones((4, 8))
        y = swiglu(x, jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8)))  # [4, 8]
    """
    h = _glu(jnp.dot(x, w_gate), jnp.dot(x, w_up), x.dtype)
    return jnp.dot(h, w_down).astype(x.dtype)


def _glu(gate, up, dtype):
    """``silu(gate) * up`` in f32, cast to ``dtype``.

    The expert matmuls feeding it output the activation dtype on purpose: with
    ``preferred_element_type=f32`` their cotangents would be f32 and JAX would run every
    backward matmul f32 x f32 (bf16 operands upcast); that made the expert FFN's
    forward+backward 2.6x slower on GPUs in a measurement at DeepSeek-like shapes. The
    GEMMs themselves accumulate in f32 either way."""
    f32 = jnp.float32
    return (jax.nn.silu(gate.astype(f32)) * up.astype(f32)).astype(dtype)


def _check_routing_args(where, num_experts, top_k, score_func, n_groups, topk_groups):
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"{where}: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{where}: top_k must be an int in [1, num_experts={num_experts}], "
                         f"got {top_k!r}")
    if not isinstance(n_groups, int) or n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"{where}: n_groups must be a positive int dividing num_experts="
                         f"{num_experts}, got {n_groups!r}")
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= n_groups:
        raise ValueError(f"{where}: topk_groups must be an int in [1, n_groups={n_groups}], "
                         f"got {topk_groups!r}")
    if top_k > topk_groups * (num_experts // n_groups):
        raise ValueError(
            f"{where}: top_k={top_k} exceeds the {topk_groups * (num_experts // n_groups)} "
            f"experts reachable in topk_groups={topk_groups} groups of "
            f"{num_experts // n_groups}; raise topk_groups or lower top_k")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static part of a forward pass (hashable: a ``jax.jit`` static argument)."""

    mesh: Any
    axis_name: str
    token_axes: tuple
    num_experts: int
    top_k: int
    score_func: str
    n_groups: int
    topk_groups: int
    normalize: bool
    scaling: float
    capacity: Optional[int]
    expert_capacity: Optional[int]
    expert_alignment: int
    exchange: str
    buffer: Any
    backend: str
    has_shared: bool
    low_latency: bool
    max_tokens_per_rank: Optional[int]


def _ragged_swiglu(x, w_gate, w_up, w_down, group_sizes):
    """SwiGLU of each row with its group's expert: rows grouped by ``group_sizes``.

    Matmul outputs in ``x``'s dtype, ``silu * up`` in f32 (see :func:`_glu`)."""
    gate = jax.lax.ragged_dot(x, w_gate, group_sizes)
    up = jax.lax.ragged_dot(x, w_up, group_sizes)
    h = _glu(gate, up, x.dtype)
    return jax.lax.ragged_dot(h, w_down, group_sizes).astype(x.dtype)


def _batched_swiglu(x, w_gate, w_up, w_down):
    """SwiGLU per expert on ``x [L, M, H]`` (the low-latency and expert-slot layouts).

    Matmul outputs in ``x``'s dtype, ``silu * up`` in f32 (see :func:`_glu`)."""
    gate = jnp.einsum("lmh,lhf->lmf", x, w_gate)
    up = jnp.einsum("lmh,lhf->lmf", x, w_up)
    h = _glu(gate, up, x.dtype)
    return jnp.einsum("lmf,lfh->lmh", h, w_down).astype(x.dtype)


def _take_rows(a, idx):
    """``a[idx]`` along axis 0; an index outside ``[0, len(a))`` (negative ones too)
    gives a zero row.

    Rows of 1- or 2-byte elements move as 32-bit words: XLA's GPU gather handles one
    element per index computation, and a bf16 row gather at the layer's size ran at
    1.8 TB/s as bf16 elements, 2.6 TB/s as words (``bench/gather_probe.py``, H200)."""
    n = a.shape[0]
    per_word = 4 // a.dtype.itemsize if a.dtype.itemsize in (1, 2) else 0
    row = math.prod(a.shape[1:])
    if n == 0:
        return jnp.zeros((idx.shape[0],) + a.shape[1:], a.dtype)
    if not per_word or row % per_word or a.dtype == jnp.bool_:
        # (take's fill mode would wrap negative indices)
        return jnp.take(a, jnp.where(idx < 0, n, idx), axis=0, mode="fill", fill_value=0)
    words = jax.lax.bitcast_convert_type(a.reshape(n, row // per_word, per_word), jnp.uint32)
    inside = (idx >= 0) & (idx < n)
    got = jnp.take(words, jnp.clip(idx, 0, n - 1), axis=0, mode="clip")
    got = jnp.where(inside[:, None], got, jnp.uint32(0))
    return jax.lax.bitcast_convert_type(got, a.dtype).reshape((idx.shape[0],) + a.shape[1:])


@jax.custom_vjp
def _gather_rows(a, idx, inv):
    """``a[idx]`` for a one-to-one row map, out-of-range indices reading zero rows: ``idx
    [M]`` picks a row of ``a [N, ...]`` (``N``: none) for each output row, no row twice,
    and ``inv [N]`` is its inverse (the output row of each row of ``a``; ``M``: none).

    The map is a partial permutation, so its transpose is the gather by ``inv``: the
    backward pass is ``_gather_rows(g, inv, idx)``, not a scatter-add (whose colliding
    out-of-range rows serialise on GPUs)."""
    return _take_rows(a, idx)


def _gather_rows_fwd(a, idx, inv):
    return _gather_rows(a, idx, inv), (idx, inv)


def _gather_rows_bwd(res, g):
    idx, inv = res
    return _gather_rows(g, inv, idx), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class _SlotMap(NamedTuple):
    """Rows of the expert layout ``[cap, H]`` <-> slots ``[E/R * C]`` (C rows per expert).

    src: ``[E/R * C]`` the row of each slot (``cap``: empty slot, reads a zero row).
    slot: ``[cap]`` the slot of each row (``E/R * C``: none, the row past its group's C
        rows or a padding row after the last group; it comes back as zeros)."""

    src: jax.Array
    slot: jax.Array


def _to_expert_slots(recv_x, group_sizes, real_sizes, expert_capacity):
    """Gathers the expert layout's groups into ``[E/R, C, H]`` slots (C = expert_capacity).

    ``recv_x [cap, H]`` holds ``E/R`` consecutive groups of ``group_sizes`` rows (then
    padding); each group's first C rows take its expert's slots, the rest are dropped.
    Returns the slots, the :class:`_SlotMap` for :func:`_from_expert_slots`, and the count
    of dropped rows (``real_sizes``: the groups' rows without ``expert_alignment``
    padding, which is not counted). Forward and backward are gathers only."""
    cap, hidden = recv_x.shape
    num_local, C = group_sizes.shape[0], expert_capacity
    group_sizes = group_sizes.astype(jnp.int32)
    end = jnp.cumsum(group_sizes)
    start = end - group_sizes
    col = jnp.arange(C, dtype=jnp.int32)
    src = jnp.where(col[None, :] < group_sizes[:, None], start[:, None] + col[None, :],
                    cap).reshape(-1)
    row = jnp.arange(cap, dtype=jnp.int32)
    # unrolled binary search: the default method is a while loop, whose every step is a
    # device-to-host round trip of its predicate on GPUs (~15 us each)
    grp = jnp.searchsorted(end, row, side="right",
                           method="scan_unrolled").astype(jnp.int32)  # num_local: past end
    pos = row - jnp.take(start, jnp.minimum(grp, num_local - 1))
    slot = jnp.where((grp < num_local) & (pos < C), grp * C + pos, num_local * C)
    slot_map = _SlotMap(src, slot)
    slots = _gather_rows(recv_x, src, slot).reshape(num_local, C, hidden)
    dropped = jnp.sum(jnp.maximum(real_sizes - C, 0))  # padding is not counted
    return slots, slot_map, dropped


def _from_expert_slots(y_slots, slot_map):
    """Inverse of :func:`_to_expert_slots`: ``[E/R, C, H]`` -> ``[cap, H]``; rows that had
    no slot come back as zeros. A gather (backward: a gather too)."""
    flat = y_slots.reshape(-1, y_slots.shape[-1])
    return _gather_rows(flat, slot_map.slot, slot_map.src)


class _RankSlots(NamedTuple):
    """Pairs (received row j, top-k slot k) of the rank layout <-> expert slots
    ``[E/R * C]`` (C rows per local expert), for the ``exchange="rank"`` path.

    pair_slot: ``[cap, K]`` the slot of each pair (``E/R * C``: none, the pair's expert is
        not local or the pair is past its expert's C rows).
    slot_row: ``[E/R * C]`` the received row of each slot (``cap``: empty slot).
    slot_pair: ``[E/R * C]`` the flat pair ``j * K + k`` of each slot (``cap * K``: empty).
    """

    pair_slot: jax.Array
    slot_row: jax.Array
    slot_pair: jax.Array


def _rank_slots(recv_topk_idx, num_local, expert_capacity):
    """Assigns the local (row, slot) pairs of a rank-layout dispatch to expert slots.

    A local expert's slots take its pairs in received-row order (source rank, then
    source token: the expert layout's order); pairs past ``expert_capacity`` get no
    slot and are counted in the returned ``dropped``. Index arithmetic on
    ``[cap * K]`` ints only (one sort)."""
    cap, K = recv_topk_idx.shape
    n, C = cap * K, expert_capacity
    e = recv_topk_idx.reshape(-1).astype(jnp.int32)
    key = jnp.where((e >= 0) & (e < num_local), e, num_local)  # num_local: not here
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # by expert, then pair order
    sorted_key = jnp.take(key, order)
    # group bounds in the sorted keys (no scatter-add into few bins): E/R + 2 queries
    # compared with every key in one fusion (the default binary search is a while loop
    # whose every step costs a device-to-host round trip on GPUs: 250 us in a profile)
    bounds = jnp.searchsorted(sorted_key, jnp.arange(num_local + 2, dtype=jnp.int32),
                              side="left", method="compare_all").astype(jnp.int32)
    start, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    pos = jnp.arange(n, dtype=jnp.int32) - jnp.take(start, sorted_key)
    none = num_local * C
    slot_sorted = jnp.where((sorted_key < num_local) & (pos < C), sorted_key * C + pos, none)
    pair_slot = jnp.zeros((n,), jnp.int32).at[order].set(slot_sorted).reshape(cap, K)
    slot_pair = jnp.full((none,), n, jnp.int32).at[slot_sorted].set(order, mode="drop")
    slot_row = jnp.where(slot_pair < n, slot_pair // K, cap)
    dropped = jnp.sum(jnp.maximum(counts[:num_local] - C, 0))
    return _RankSlots(pair_slot, slot_row, slot_pair), dropped


@jax.custom_vjp
def _fan_out(rows, slot_row, pair_slot):
    """``slots[s] = rows[slot_row[s]]`` (a zero row for an empty slot): each received row
    goes to the slot of every local expert it was sent for.

    The backward pass sums each row's slot gradients (``pair_slot``, K gathers): gathers
    only, no scatter-add."""
    return _take_rows(rows, slot_row)


def _fan_out_fwd(rows, slot_row, pair_slot):
    return _fan_out(rows, slot_row, pair_slot), (slot_row, pair_slot)


def _fan_out_bwd(res, g):
    slot_row, pair_slot = res
    acc = None
    for k in range(pair_slot.shape[1]):  # k order, f32
        term = jnp.take(g, pair_slot[:, k], axis=0, mode="fill", fill_value=0)
        acc = term.astype(jnp.float32) if acc is None else acc + term.astype(jnp.float32)
    return acc.astype(g.dtype), None, None


_fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)


@jax.custom_vjp
def _reduce_to_rows(y_slots, weights, pair_slot, slot_pair):
    """``rows[j] = sum_k weights[j, k] * y_slots[pair_slot[j, k]]`` in f32 (k order),
    returned in ``y_slots``' dtype: each received row's local experts, weighted and summed
    on the expert's rank, so that combine moves one row per (token, rank).

    ``y_slots [E/R * C, H]``; ``weights [cap, K]`` f32 (pairs without a slot add nothing).
    Backward: ``d_y[s] = w[pair(s)] * g[row(s)]`` and ``d_w[j, k] = <g[j], y[slot(j, k)]>``
    (computed per slot, then gathered to the pairs): gathers only."""
    acc = None
    for k in range(pair_slot.shape[1]):
        y = jnp.take(y_slots, pair_slot[:, k], axis=0, mode="fill", fill_value=0)
        term = weights[:, k, None] * y.astype(jnp.float32)
        acc = term if acc is None else acc + term
    return acc.astype(y_slots.dtype)


def _reduce_to_rows_fwd(y_slots, weights, pair_slot, slot_pair):
    return _reduce_to_rows(y_slots, weights, pair_slot, slot_pair), (y_slots, weights, pair_slot,
                                                                      slot_pair)


def _reduce_to_rows_bwd(res, g):
    y_slots, weights, pair_slot, slot_pair = res
    cap, K = weights.shape
    n = cap * K
    # per slot: its row's gradient (a zero row for an empty slot) and its pair's weight
    # g_slot stays in g's dtype: each consumer converts inside its fusion (an f32 copy of
    # [E/R * C, H] would be the largest array of the backward pass)
    g_slot = jnp.take(g, jnp.where(slot_pair < n, slot_pair // K, cap), axis=0, mode="fill",
                      fill_value=0)
    w_slot = jnp.take(weights.reshape(-1), slot_pair, mode="fill", fill_value=0)
    d_y = (w_slot[:, None] * g_slot.astype(jnp.float32)).astype(y_slots.dtype)
    d_w_slot = jnp.sum(g_slot.astype(jnp.float32) * y_slots.astype(jnp.float32), axis=1)
    d_w = jnp.take(d_w_slot, pair_slot, mode="fill", fill_value=0)
    return d_y, d_w, None, None


_reduce_to_rows.defvjp(_reduce_to_rows_fwd, _reduce_to_rows_bwd)


def _per_rank(cfg: _Config, x, router, bias, w_gate, w_up, w_down, shared):
    """One rank's MoE: x ``[T, H]`` local tokens, expert weights ``[E/R, ...]`` local."""
    ax = cfg.axis_name
    all_axes = cfg.token_axes + (ax,)  # every axis the tokens are sharded over
    E, K = cfg.num_experts, cfg.top_k
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    r = route(logits, top_k=K, score_func=cfg.score_func, bias=bias, n_groups=cfg.n_groups,
              topk_groups=cfg.topk_groups, normalize=cfg.normalize, scaling=cfg.scaling)
    if cfg.low_latency:
        d = jax_ep.low_latency_dispatch(
            x, r.topk_idx, num_experts=E, max_tokens_per_rank=cfg.max_tokens_per_rank,
            axis_name=ax, buffer=cfg.buffer, backend=cfg.backend)
        y = _batched_swiglu(d.recv_x, w_gate, w_up, w_down)
        out = jax_ep.low_latency_combine(y, r.topk_idx, r.topk_weights, d.handle)
        dropped = jnp.zeros((), jnp.int32)
    elif cfg.exchange == "rank":  # one row per (token, rank) both ways; slots built here
        d = jax_ep.dispatch(x, r.topk_idx, r.topk_weights, num_experts=E, axis_name=ax,
                            layout="rank", max_recv_tokens=cfg.capacity, buffer=cfg.buffer,
                            backend=cfg.backend)
        num_local = w_gate.shape[0]
        plan, lost = _rank_slots(d.recv_topk_idx, num_local, cfg.expert_capacity)
        slots = _fan_out(d.recv_x, plan.slot_row, plan.pair_slot)
        y = _batched_swiglu(slots.reshape(num_local, cfg.expert_capacity, -1),
                            w_gate, w_up, w_down)
        weights = jnp.where(d.recv_topk_idx >= 0, d.recv_topk_weights, 0.0)
        rows = _reduce_to_rows(y.reshape(num_local * cfg.expert_capacity, -1), weights,
                               plan.pair_slot, plan.slot_pair)
        out = jax_ep.combine(rows, d.handle)
        dropped = jax.lax.psum(d.num_overflow + lost, all_axes)
    else:
        d = jax_ep.dispatch(x, r.topk_idx, r.topk_weights, num_experts=E, axis_name=ax,
                            layout="expert", max_recv_tokens=cfg.capacity,
                            expert_alignment=cfg.expert_alignment, buffer=cfg.buffer,
                            backend=cfg.backend)
        dropped = d.num_overflow
        if cfg.expert_capacity is None:
            y = _ragged_swiglu(d.recv_x, w_gate, w_up, w_down, d.group_sizes)
        else:  # fixed rows per expert: dense batched matmuls instead of ragged_dot
            slots, slot_map, lost = _to_expert_slots(d.recv_x, d.group_sizes,
                                                      d.num_recv_tokens_per_expert,
                                                      cfg.expert_capacity)
            y = _from_expert_slots(_batched_swiglu(slots, w_gate, w_up, w_down), slot_map)
            dropped = dropped + lost
        out = jax_ep.combine(y, d.handle, d.recv_topk_weights)
        dropped = jax.lax.psum(dropped, all_axes)
    if cfg.has_shared:
        out = out + swiglu(x, *shared)
    # Statistics over every rank's tokens.
    local_load = jnp.zeros((E,), jnp.int32).at[r.topk_idx.reshape(-1)].add(1)
    load = jax.lax.psum(local_load, all_axes)
    num_slots = jax.lax.psum(jnp.asarray(x.shape[0] * K, jnp.float32), all_axes)
    mean_score = jax.lax.psum(jnp.sum(r.scores, axis=0), all_axes) / (num_slots / K)
    frac = jax.lax.stop_gradient(load.astype(jnp.float32) / jnp.maximum(num_slots, 1.0))
    aux = E * jnp.sum(frac * mean_score)
    return out, MoEStats(load, dropped, aux)


def _token_dim(token_axes, axis_name):
    """PartitionSpec entry of the token dim: sharded over the extra axes, then EP."""
    return token_axes + (axis_name,) if token_axes else axis_name


def _forward(cfg: _Config, x, router, bias, w_gate, w_up, w_down, shared):
    ax = cfg.axis_name
    tok = P(_token_dim(cfg.token_axes, ax), None)
    expert_spec = P(ax, None, None)
    shared_spec = tuple(P(None, None) for _ in shared)
    fn = jax.shard_map(
        lambda *a: _per_rank(cfg, *a), mesh=cfg.mesh,
        in_specs=(tok, P(None, None), P(None), expert_spec, expert_spec, expert_spec,
                  shared_spec),
        out_specs=(tok, MoEStats(P(None), P(), P())))
    place = lambda a, spec: _place(cfg.mesh, a, spec)  # noqa: E731
    return fn(place(x, tok), place(router, P(None, None)), place(bias, P(None)),
              place(w_gate, expert_spec), place(w_up, expert_spec), place(w_down, expert_spec),
              tuple(place(a, s) for a, s in zip(shared, shared_spec)))


def _is_explicit(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _place(mesh, a, spec):
    """Puts ``a`` on ``mesh`` with ``spec`` (explicit meshes need it before shard_map)."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if _is_explicit(mesh):
        return jax.sharding.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)


_forward_jit = jax.jit(_forward, static_argnums=0)


@functools.lru_cache(maxsize=None)
def _sharded_init(kind, shape, dtype, sharding):
    """A jitted initializer that creates each shard on its own device: no full copy of
    an ``[E, H, F]`` weight on one device. Cached, so equal layers compile it once."""
    if kind == "expert":  # fan-in scaled per expert ([E, in, out])
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=-2, out_axis=-1, batch_axis=(0,))
    elif kind == "router":
        init = nnx.initializers.normal(stddev=shape[0] ** -0.5)
    else:
        init = nnx.initializers.lecun_normal()
    return jax.jit(lambda key: init(key, shape, dtype), out_shardings=sharding)


def _on_gpus(mesh) -> bool:
    return any(d.platform == "gpu" for d in mesh.devices.flat)


_RAGGED_DENSE_WARN_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def _warn_ragged_dot_on_gpus(num_local: int, dense_gib: float) -> None:
    """Once per shape: the ragged path's cost on GPUs is easy to miss."""
    warnings.warn(
        f"MoE: expert_capacity=None runs the {num_local} local experts with "
        "jax.lax.ragged_dot; XLA lowers it on GPUs to a dense matmul (its operand here: "
        f"~{dense_gib} GiB) unless its cuDNN grouped-matmul path is available (cuDNN >= "
        "9.22): 108 ms against 1.9 ms for the "
        "capacity layout in one H200 measurement (bench/ragged_probe.py), and out of memory "
        "at DeepSeek-like shapes. Pass expert_capacity=ceil(1.25 * R * T * K / E) (rows "
        "per local expert; R ranks, T tokens per rank) for dense batched matmuls.",
        RuntimeWarning, stacklevel=3)


class MoE(nnx.Module):
    """Mixture-of-experts SwiGLU FFN with expert parallelism through jax_ep.

    Parameters: ``router [H, E]`` (replicated, f32), routed experts ``w_gate, w_up
    [E, H, F]`` and ``w_down [E, F, H]`` sharded over ``axis_name`` on their first dim
    (``nnx.with_partitioning``), optional shared expert ``shared_gate, shared_up
    [H, Fs]``, ``shared_down [Fs, H]`` (replicated), and the non-trainable
    :class:`ExpertBias` ``expert_bias [E]``.

    Args:
      hidden: model width H; ``H * itemsize(dtype)`` must be a multiple of 16 bytes.
      ffn_hidden: F, hidden width of each routed expert.
      num_experts: E, divisible by the size R of ``mesh.shape[axis_name]``.
      top_k: K experts per token, ``1 <= K <= E``.
      mesh: the ``jax.sharding.Mesh``; tokens and experts are sharded over ``axis_name``.
      axis_name: the expert-parallel mesh axis.
      token_axes: other mesh axes the tokens are also sharded over (e.g. ``("data",)``
        on a ``("data", "ep")`` mesh); experts are replicated over them, each group of
        EP ranks exchanges its own tokens, and the stats sum over all of them.
      score_func: ``"softmax"`` or ``"sigmoid"`` router scores.
      n_groups, topk_groups: DeepSeek-V3 group-limited routing (see :func:`route`).
      shared_ffn_hidden: width of the shared expert (0: none).
      capacity: ``max_recv_tokens`` of the dispatch (rows each rank can receive); None
        never drops. Rows beyond it are dropped and counted in ``MoEStats.dropped``.
      expert_capacity: rows per local expert for the expert matmuls. None: one
        ``jax.lax.ragged_dot`` per projection over the received rows. An int C: the
        received groups are gathered into ``[E/R, C, H]`` and the experts run as dense
        batched matmuls; rows past C are dropped and counted in ``MoEStats.dropped``.
        Use it on GPUs, where XLA lowers ``ragged_dot`` with many groups to a dense
        matmul over ``[rows, groups * H]`` (out of memory at DeepSeek-like shapes; a
        ``RuntimeWarning`` says so when that operand would exceed 1 GiB).
        Choosing C: a local expert receives the rows of all R ranks, on average
        ``R * T * K / E`` (T tokens per rank); set ``C = ceil(f * R * T * K / E)``
        (plus ``expert_alignment`` padding per group, which counts towards C). Because
        the rows of all ranks are pooled per expert, their relative spread is smaller
        than that of a per-source GShard capacity, so f can be tighter than a GShard
        capacity factor: with balanced routing at T=4096, E=256, K=8 on 4 ranks,
        f = 1.25 dropped nothing and f = 1.1 dropped a few rows (8 in one measurement)
        while saving ~12% of the expert FLOPs. Routing skew (an untrained or unbalanced
        router, few tokens per rank) needs a larger f. Nothing is dropped silently:
        watch ``MoEStats.dropped`` and raise f if it is not 0 (or is more than you
        accept). The default None never drops.
      buffer: a :class:`jax_ep.Buffer` for the CUDA kernels (None: reference backend).
      backend: ``"auto"``, ``"cuda"`` or ``"reference"``.
      normalize_weights: renormalise top-k weights (default: True for sigmoid).
      routed_scaling: multiplies the routed weights.
      expert_alignment: pad each local expert group of the dispatch to this multiple
        (``exchange="expert"`` only).
      exchange: how tokens travel. ``"expert"``: ``jax_ep.dispatch(layout="expert")``,
        one row per (token, local expert) each way; combine applies the weights on the
        token's rank. ``"rank"`` (needs ``expert_capacity``): ``layout="rank"``, one row
        per (token, rank) each way, as DeepEP's normal mode: the received row is copied
        into the slots of each of its local experts here, and each row's local expert
        outputs are weighted and summed (f32, rounded to the activation dtype) on the
        expert's rank before the combine sums the ranks' rows. A token reaches about 3.6
        of 4 ranks but 8 experts at K=8, so combine and both backward exchanges move
        less than half the bytes; the extra rounding of the per-rank partial sums is the
        numerical difference. ``"auto"`` (default): ``"rank"`` when ``expert_capacity``
        is set and ``expert_alignment`` is 1, else ``"expert"``. ``capacity`` counts (token, rank) rows with
        ``"rank"`` (at most ``R * T`` are ever needed).
      dtype: compute dtype of the experts (default: the input's dtype).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` for initialisation.

    Calling ``moe(x)`` with ``x [..., H]`` (all leading dims are tokens; their product
    must be divisible by R times the sizes of ``token_axes``) returns
    ``(out [..., H], MoEStats)``. ``moe(x, low_latency=True, max_tokens_per_rank=M)``
    uses the low-latency kernels instead (decoding; at most M tokens per rank).

    Example::

        mesh = jax.make_mesh((4,), ("ep",))
        moe = MoE(hidden=32, ffn_hidden=64, num_experts=8, top_k=2, mesh=mesh,
                  score_func="sigmoid", n_groups=4, topk_groups=2, shared_ffn_hidden=32,
                  rngs=nnx.Rngs(0))
        out, stats = nnx.jit(lambda m, x: m(x))(moe, jnp.ones((4, 16, 32)))
        moe.update_bias(stats.load, rate=1e-3)   # aux-loss-free balancing step
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, mesh, *,
                 axis_name: str = "ep", token_axes: Sequence[str] = (),
                 score_func: str = "softmax", n_groups: int = 1,
                 topk_groups: int = 1, shared_ffn_hidden: int = 0,
                 capacity: Optional[int] = None, expert_capacity: Optional[int] = None,
                 buffer=None, backend: str = "auto",
                 normalize_weights: Optional[bool] = None, routed_scaling: float = 1.0,
                 expert_alignment: int = 1, exchange: str = "auto", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        where = "MoE"
        for name, value in (("hidden", hidden), ("ffn_hidden", ffn_hidden),
                            ("num_experts", num_experts), ("expert_alignment",
                                                           expert_alignment)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        if not isinstance(shared_ffn_hidden, int) or shared_ffn_hidden < 0:
            raise ValueError(f"{where}: shared_ffn_hidden must be an int >= 0, got "
                             f"{shared_ffn_hidden!r}")
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh, got "
                            f"{type(mesh).__name__}")
        if axis_name not in mesh.shape:
            raise ValueError(f"{where}: axis_name {axis_name!r} is not an axis of the mesh "
                             f"(axes: {tuple(mesh.shape)})")
        num_ranks = int(mesh.shape[axis_name])
        token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
        for a in token_axes:
            if a not in mesh.shape or a == axis_name or token_axes.count(a) > 1:
                raise ValueError(f"{where}: token_axes must be distinct mesh axes other than "
                                 f"axis_name={axis_name!r} (mesh axes: {tuple(mesh.shape)}), "
                                 f"got {token_axes!r}")
        if num_experts % num_ranks:
            raise ValueError(f"{where}: num_experts={num_experts} is not divisible by the "
                             f"{num_ranks} ranks of mesh axis {axis_name!r}")
        _check_routing_args(where, num_experts, top_k, score_func, n_groups, topk_groups)
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"{where}: capacity must be None or a positive int, got "
                             f"{capacity!r}")
        if expert_capacity is not None and (not isinstance(expert_capacity, int) or
                                            expert_capacity < 1):
            raise ValueError(f"{where}: expert_capacity must be None or a positive int, got "
                             f"{expert_capacity!r}")
        if backend not in ("auto", "cuda", "reference"):
            raise ValueError(f"{where}: backend must be 'auto', 'cuda' or 'reference', got "
                             f"{backend!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"{where}: exchange must be one of {EXCHANGES}, got {exchange!r}")
        if exchange == "auto":
            exchange = "rank" if expert_capacity is not None and expert_alignment == 1 \
                else "expert"
        if exchange == "rank" and expert_capacity is None:
            raise ValueError(f"{where}: exchange='rank' builds fixed expert slots: pass "
                             "expert_capacity (rows per local expert) too, or use "
                             "exchange='expert'")
        if exchange == "rank" and expert_alignment != 1:
            raise ValueError(f"{where}: expert_alignment pads the expert layout's groups; it "
                             "does not apply to exchange='rank' (pass exchange='expert')")
        self._check_hidden(hidden, dtype if dtype is not None else param_dtype)
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.mesh, self.axis_name, self.num_ranks = mesh, axis_name, num_ranks
        self.token_axes = token_axes
        self.token_shards = num_ranks * math.prod(int(mesh.shape[a]) for a in token_axes)
        self.score_func, self.n_groups, self.topk_groups = score_func, n_groups, topk_groups
        self.normalize_weights = (score_func == "sigmoid" if normalize_weights is None
                                  else bool(normalize_weights))
        self.routed_scaling = float(routed_scaling)
        self.shared_ffn_hidden, self.capacity = shared_ffn_hidden, capacity
        self.expert_capacity = expert_capacity
        self.expert_alignment = expert_alignment
        self.exchange = exchange
        self.buffer, self.backend = buffer, backend
        self.dtype, self.param_dtype = dtype, param_dtype

        def param(kind, shape, spec, dtype=param_dtype):
            sharding = jax.sharding.NamedSharding(mesh, P(*spec))

            def init(key, shape, dtype):
                return _sharded_init(kind, shape, dtype, sharding)(key)

            return nnx.Param(nnx.with_partitioning(init, spec, mesh=mesh)(
                rngs.params(), tuple(shape), jnp.dtype(dtype)))

        E, H, F = num_experts, hidden, ffn_hidden
        self.router = param("router", (H, E), (None, None), jnp.float32)
        self.expert_bias = ExpertBias(jax.device_put(
            jnp.zeros((E,), jnp.float32), jax.sharding.NamedSharding(mesh, P(None))))
        expert_spec = (axis_name, None, None)
        self.w_gate = param("expert", (E, H, F), expert_spec)
        self.w_up = param("expert", (E, H, F), expert_spec)
        self.w_down = param("expert", (E, F, H), expert_spec)
        if shared_ffn_hidden:
            Fs = shared_ffn_hidden
            self.shared_gate = param("dense", (H, Fs), (None, None))
            self.shared_up = param("dense", (H, Fs), (None, None))
            self.shared_down = param("dense", (Fs, H), (None, None))

    @staticmethod
    def _check_hidden(hidden, dtype):
        step = max(1, _VECTOR_BYTES // jnp.dtype(dtype).itemsize)
        if hidden % step:
            raise ValueError(f"MoE: hidden={hidden} must be a multiple of {step} for dtype "
                             f"{jnp.dtype(dtype).name} (jax_ep moves {_VECTOR_BYTES}-byte "
                             "vectors); pad the hidden size")

    def route(self, x: jax.Array) -> Routing:
        """Routes tokens ``x [N, H]`` with this layer's router and bias (no communication).

        Example::

            r = moe.route(x.reshape(-1, moe.hidden))   # r.topk_idx [N, K]
        """
        logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return route(logits, top_k=self.top_k, score_func=self.score_func,
                     bias=self.expert_bias[...], n_groups=self.n_groups,
                     topk_groups=self.topk_groups, normalize=self.normalize_weights,
                     scaling=self.routed_scaling)

    def __call__(self, x: jax.Array, *, low_latency: bool = False,
                 max_tokens_per_rank: Optional[int] = None):
        """Applies the layer: ``x [..., H]`` → ``(out [..., H], MoEStats)``.

        Args:
          x: tokens; the product of the leading dims must be divisible by R times the
            sizes of ``token_axes`` (they are sharded over those axes and ``axis_name``).
          low_latency: use ``jax_ep.low_latency_dispatch/combine`` (decoding).
          max_tokens_per_rank: low-latency capacity M (default: the tokens per rank).

        Example::

            out, stats = moe(jnp.ones((8, 4, moe.hidden)))
        """
        if not hasattr(x, "shape") or x.ndim < 2:
            raise ValueError(f"MoE: x must be an array [..., hidden], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[-1] != self.hidden:
            raise ValueError(f"MoE: x.shape[-1]={x.shape[-1]} != hidden={self.hidden}")
        lead = x.shape[:-1]
        n = math.prod(lead)
        if n % self.token_shards:
            raise ValueError(f"MoE: {n} tokens are not divisible by the {self.token_shards} "
                             f"shards of mesh axes {self.token_axes + (self.axis_name,)}; "
                             "pad the batch")
        dtype = self.dtype or x.dtype
        self._check_hidden(self.hidden, dtype)
        if low_latency:
            per_rank = n // self.token_shards
            if max_tokens_per_rank is None:
                max_tokens_per_rank = per_rank
            if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < per_rank:
                raise ValueError(f"MoE: max_tokens_per_rank must be an int >= the {per_rank} "
                                 f"tokens per rank, got {max_tokens_per_rank!r}")
        elif max_tokens_per_rank is not None:
            raise ValueError("MoE: max_tokens_per_rank applies to low_latency=True only")
        if not low_latency and self.expert_capacity is None and _on_gpus(self.mesh):
            # XLA's dense lowering of ragged_dot multiplies [rows, E/R * H]: warn where
            # that is big (the small demo model is fine)
            num_local = self.num_experts // self.num_ranks
            rows = self.capacity or self.num_ranks * (n // self.token_shards) * self.top_k
            dense_bytes = rows * num_local * self.hidden * jnp.dtype(dtype).itemsize
            if dense_bytes >= _RAGGED_DENSE_WARN_BYTES:
                _warn_ragged_dot_on_gpus(num_local, round(dense_bytes / 2**30, 1))
        capacity = self.capacity
        if capacity is not None and self.exchange == "rank":
            # (token, rank) rows: more than every token of every rank is never needed
            capacity = min(capacity, self.num_ranks * (n // self.token_shards))
        cfg = _Config(
            mesh=self.mesh, axis_name=self.axis_name, token_axes=self.token_axes,
            num_experts=self.num_experts,
            top_k=self.top_k, score_func=self.score_func, n_groups=self.n_groups,
            topk_groups=self.topk_groups, normalize=self.normalize_weights,
            scaling=self.routed_scaling, capacity=capacity,
            expert_capacity=self.expert_capacity,
            expert_alignment=self.expert_alignment, exchange=self.exchange, buffer=self.buffer, backend=self.backend,
            has_shared=bool(self.shared_ffn_hidden), low_latency=bool(low_latency),
            max_tokens_per_rank=max_tokens_per_rank if low_latency else None)
        cast = lambda p: p[...].astype(dtype)  # noqa: E731
        shared = ((cast(self.shared_gate), cast(self.shared_up), cast(self.shared_down))
                  if self.shared_ffn_hidden else ())
        out, stats = _forward_jit(cfg, self._flatten(x).astype(dtype),
                                  self.router[...], self.expert_bias[...], cast(self.w_gate),
                                  cast(self.w_up), cast(self.w_down), shared)
        return self._unflatten(out, lead), stats

    def _lead_spec(self, lead):
        """Sharding of the leading token dim when reshaping on an explicit mesh."""
        return (_token_dim(self.token_axes, self.axis_name)
                if lead[0] % self.token_shards == 0 else None)

    def _flatten(self, x):
        """``[..., H]`` → ``[N, H]``; explicit meshes need the reshape's output sharding."""
        lead = x.shape[:-1]
        n = math.prod(lead)
        if x.ndim == 2:
            return x
        if not _is_explicit(self.mesh):
            return x.reshape(n, self.hidden)
        ax = self._lead_spec(lead)
        spec = P(*((ax,) + (None,) * (x.ndim - 1)))
        x = jax.sharding.reshard(x, jax.sharding.NamedSharding(self.mesh, spec))
        return jax.lax.reshape(x, (n, self.hidden),
                               out_sharding=jax.sharding.NamedSharding(self.mesh, P(ax, None)))

    def _unflatten(self, out, lead):
        if len(lead) == 1:
            return out
        shape = lead + (self.hidden,)
        if not _is_explicit(self.mesh):
            return out.reshape(shape)
        ax = self._lead_spec(lead)
        out = jax.sharding.reshard(out, jax.sharding.NamedSharding(self.mesh, P(ax, None)))
        spec = P(*((ax,) + (None,) * len(lead)))
        return jax.lax.reshape(out, shape,
                               out_sharding=jax.sharding.NamedSharding(self.mesh, spec))

    def update_bias(self, load: jax.Array, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``.

        Overloaded experts become less likely to be chosen, underloaded ones more.
        Works eagerly and inside ``nnx.jit`` (the bias is module state).

        Example::

            out, stats = moe(x)
            moe.update_bias(stats.load, rate=1e-3)
        """
        load = jnp.asarray(load, jnp.float32)
        if load.shape != (self.num_experts,):
            raise ValueError(f"MoE.update_bias: load must have shape ({self.num_experts},), "
                             f"got {tuple(load.shape)}")
        step = rate * jnp.sign(jnp.mean(load) - load)
        self.expert_bias[...] = self.expert_bias[...] + step.astype(jnp.float32)


def linen_moe(**kwargs):
    """The :class:`MoE` layer as a Flax Linen module (through ``nnx.bridge.to_linen``).

    Takes :class:`MoE`'s constructor arguments except ``rngs``. Parameters live in the
    ``"params"`` collection (with their EP sharding) and the routing bias in
    ``"ExpertBias"``; ``apply`` returns ``(out, MoEStats)``.

    Example::

        layer = linen_moe(hidden=32, ffn_hidden=64, num_experts=8, top_k=2, mesh=mesh)
        variables = layer.init(jax.random.key(0), x)          # x [N, 32]
        out, stats = jax.jit(layer.apply)(variables, x)
    """
    from flax.nnx import bridge
    if "rngs" in kwargs:
        raise TypeError("linen_moe: pass no rngs; Linen's init supplies them")
    return bridge.to_linen(MoE, **kwargs)
