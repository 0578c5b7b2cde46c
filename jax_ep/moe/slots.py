"""Fixed expert slots: row gathers between the dispatch layouts and ``[E/R, C, H]``.

With ``expert_capacity`` C the local experts run as dense batched matmuls over C rows
each. The maps here move rows between the dispatched layouts and those slots with
gathers only, forward and backward (custom VJPs): a scatter-add's colliding rows
serialise on GPUs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ExpertSlotMap", "RankSlots", "fan_out", "from_expert_slots", "rank_slots",
           "reduce_to_rows", "take_rows", "to_expert_slots"]


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """``a[idx]`` along axis 0; an index outside ``[0, len(a))`` (negative ones too)
    gives a zero row.

    Rows of 1- or 2-byte elements move as 32-bit words: XLA's GPU gather handles one
    element per index computation, and a bf16 row gather at the layer's size ran at
    1.8 TB/s as bf16 elements, 2.6 TB/s as words (``bench/gather_probe.py``, H200).

    Example::

        take_rows(jnp.arange(6.0).reshape(3, 2), jnp.array([2, -1, 0]))
        # [[4, 5], [0, 0], [0, 1]]
    """
    n = a.shape[0]
    per_word = 4 // a.dtype.itemsize if a.dtype.itemsize in (1, 2) else 0
    row = math.prod(a.shape[1:])
    if n == 0:  # zeros_like keeps a's vma type under shard_map
        return jnp.zeros_like(a, shape=(idx.shape[0],) + a.shape[1:])
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
    return take_rows(a, idx)


def _gather_rows_fwd(a, idx, inv):
    return _gather_rows(a, idx, inv), (idx, inv)


def _gather_rows_bwd(res, g):
    idx, inv = res
    return _gather_rows(g, inv, idx), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class ExpertSlotMap(NamedTuple):
    """Rows of the expert layout ``[cap, H]`` <-> slots ``[E/R * C]`` (C rows per expert).

    src: ``[E/R * C]`` the row of each slot (``cap``: empty slot, reads a zero row).
    slot: ``[cap]`` the slot of each row (``E/R * C``: none, the row past its group's C
        rows or a padding row after the last group; it comes back as zeros)."""

    src: jax.Array
    slot: jax.Array


def to_expert_slots(recv_x: jax.Array, group_sizes: jax.Array, real_sizes: jax.Array,
                    expert_capacity: int):
    """Gathers the expert layout's groups into ``[E/R, C, H]`` slots (C = expert_capacity).

    ``recv_x [cap, H]`` holds ``E/R`` consecutive groups of ``group_sizes`` rows (then
    padding), as ``jax_ep.dispatch(layout="expert")`` returns them; each group's first C
    rows take its expert's slots, the rest are dropped. Returns ``(slots, slot_map,
    dropped)``: the slots, the :class:`ExpertSlotMap` for :func:`from_expert_slots`, and
    the count of dropped rows (``real_sizes``: the groups' rows without
    ``expert_alignment`` padding, which is not counted). Forward and backward are gathers
    only.

    Example::

        d = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout="expert")
        slots, smap, dropped = to_expert_slots(d.recv_x, d.group_sizes,
                                               d.num_recv_tokens_per_expert, C)
        y = from_expert_slots(batched_swiglu(slots, w_gate, w_up, w_down), smap)
    """
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
    slot_map = ExpertSlotMap(src, slot)
    slots = _gather_rows(recv_x, src, slot).reshape(num_local, C, hidden)
    dropped = jnp.sum(jnp.maximum(real_sizes - C, 0))  # padding is not counted
    return slots, slot_map, dropped


def from_expert_slots(y_slots: jax.Array, slot_map: ExpertSlotMap) -> jax.Array:
    """Inverse of :func:`to_expert_slots`: ``[E/R, C, H]`` -> ``[cap, H]``; rows that had
    no slot come back as zeros. A gather (backward: a gather too).

    Example::

        y = from_expert_slots(y_slots, smap)   # smap from to_expert_slots
    """
    flat = y_slots.reshape(-1, y_slots.shape[-1])
    return _gather_rows(flat, slot_map.slot, slot_map.src)


class RankSlots(NamedTuple):
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


def rank_slots(recv_topk_idx: jax.Array, num_local: int, expert_capacity: int):
    """Assigns the local (row, slot) pairs of a rank-layout dispatch to expert slots.

    ``recv_topk_idx [cap, K]``: the local expert ids (-1: none) that
    ``jax_ep.dispatch(layout="rank")`` returns. A local expert's slots take its pairs in
    received-row order (source rank, then source token: the expert layout's order);
    pairs past ``expert_capacity`` get no slot and are counted in the returned
    ``dropped``. Returns ``(RankSlots, dropped)``. Index arithmetic on ``[cap * K]`` ints
    only (one sort).

    Example::

        d = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout="rank")
        plan, dropped = rank_slots(d.recv_topk_idx, E // R, C)
        slots = fan_out(d.recv_x, plan.slot_row, plan.pair_slot)        # [E/R * C, H]
        y = batched_swiglu(slots.reshape(E // R, C, -1), w_gate, w_up, w_down)
        w = jnp.where(d.recv_topk_idx >= 0, d.recv_topk_weights, 0.0)
        rows = reduce_to_rows(y.reshape(E // R * C, -1), w, plan.pair_slot, plan.slot_pair)
        out = jax_ep.combine(rows, d.handle)
    """
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
    return RankSlots(pair_slot, slot_row, slot_pair), dropped


@jax.custom_vjp
def fan_out(rows: jax.Array, slot_row: jax.Array, pair_slot: jax.Array) -> jax.Array:
    """``slots[s] = rows[slot_row[s]]`` (a zero row for an empty slot): each received row
    goes to the slot of every local expert it was sent for (maps from :func:`rank_slots`).

    The backward pass sums each row's slot gradients (``pair_slot``, K gathers): gathers
    only, no scatter-add.

    Example::

        slots = fan_out(d.recv_x, plan.slot_row, plan.pair_slot)   # [E/R * C, H]
    """
    return take_rows(rows, slot_row)


def _fan_out_fwd(rows, slot_row, pair_slot):
    return fan_out(rows, slot_row, pair_slot), (slot_row, pair_slot)


def _fan_out_bwd(res, g):
    slot_row, pair_slot = res
    acc = None
    for k in range(pair_slot.shape[1]):  # k order, f32
        term = jnp.take(g, pair_slot[:, k], axis=0, mode="fill", fill_value=0)
        acc = term.astype(jnp.float32) if acc is None else acc + term.astype(jnp.float32)
    return acc.astype(g.dtype), None, None


fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)


@jax.custom_vjp
def reduce_to_rows(y_slots: jax.Array, weights: jax.Array, pair_slot: jax.Array,
                   slot_pair: jax.Array) -> jax.Array:
    """``rows[j] = sum_k weights[j, k] * y_slots[pair_slot[j, k]]`` in f32 (k order),
    returned in ``y_slots``' dtype: each received row's local experts, weighted and summed
    on the expert's rank, so that combine moves one row per (token, rank).

    ``y_slots [E/R * C, H]``; ``weights [cap, K]`` f32 (pairs without a slot add nothing);
    ``pair_slot``, ``slot_pair`` from :func:`rank_slots`.
    Backward: ``d_y[s] = w[pair(s)] * g[row(s)]`` and ``d_w[j, k] = <g[j], y[slot(j, k)]>``
    (computed per slot, then gathered to the pairs): gathers only.

    Example::

        rows = reduce_to_rows(y, w, plan.pair_slot, plan.slot_pair)   # [cap, H]
    """
    acc = None
    for k in range(pair_slot.shape[1]):
        y = jnp.take(y_slots, pair_slot[:, k], axis=0, mode="fill", fill_value=0)
        term = weights[:, k, None] * y.astype(jnp.float32)
        acc = term if acc is None else acc + term
    return acc.astype(y_slots.dtype)


def _reduce_to_rows_fwd(y_slots, weights, pair_slot, slot_pair):
    return reduce_to_rows(y_slots, weights, pair_slot, slot_pair), (y_slots, weights,
                                                                    pair_slot, slot_pair)


def _reduce_to_rows_bwd(res, g):
    y_slots, weights, pair_slot, slot_pair = res
    cap, K = weights.shape
    n = cap * K
    if n == 0:  # no rows arrived (a rank without tokens): nothing flows back
        return jnp.zeros_like(y_slots), jnp.zeros_like(weights), None, None
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


reduce_to_rows.defvjp(_reduce_to_rows_fwd, _reduce_to_rows_bwd)
