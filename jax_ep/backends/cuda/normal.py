"""CUDA backend, normal ops: the intranode (NVLink) kernels as XLA FFI custom calls.

Same functions, signatures and results as :mod:`jax_ep.backends.reference`, called per
rank inside ``shard_map``; each op is one custom call (xla_ffi/normal_handlers.cc) whose
result shapes come from the static config (no host synchronisation). Rows move directly
between the GPUs' XLA buffers (dispatch pushes into the receivers' outputs, combine pulls
from every rank's ``y``); the communication buffer (:mod:`.buffer`) holds only counts,
flags and published pointers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jax_ep import fp8
from jax_ep.backends.cuda._ffi import F32, I32, call, i64
from jax_ep.backends.cuda.side_stream import exchange_call
from jax_ep.backends.vma import varying
from jax_ep.types import DispatchConfig, HandleArrays

_LAYOUT_CODE = {"rank": 0, "expert": 1}


def _require_buffer(cfg: DispatchConfig, op: str) -> int:
    if cfg.buffer_id is None:
        raise ValueError(f"{op}: the CUDA backend needs buffer=jax_ep.Buffer(mesh, axis_name)")
    return int(cfg.buffer_id)


def get_dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int):
    T = topk_idx.shape[0]
    results = (jax.ShapeDtypeStruct((num_ranks,), I32),
               jax.ShapeDtypeStruct((num_experts,), I32),
               jax.ShapeDtypeStruct((T, num_ranks), jnp.bool_))
    # The handler reads num_ranks and num_experts from the result shapes.
    return tuple(call("jax_ep_dispatch_layout", results, topk_idx.astype(I32)))


def dispatch(payload: Tuple[jax.Array, ...], topk_idx: jax.Array, topk_weights: jax.Array,
             cfg: DispatchConfig):
    return dispatch_with_totals(payload, topk_idx, topk_weights, cfg)[:8]


def dispatch_with_totals(payload: Tuple[jax.Array, ...], topk_idx: jax.Array,
                         topk_weights: jax.Array, cfg: DispatchConfig):
    """:func:`dispatch`'s results, then ``needed_per_expert [L]``: in the expert layout the
    rows each local expert gets before capacity and alignment (the internode path sums
    them over the source nodes), zeros in the rank layout."""
    buffer_id = _require_buffer(cfg, "dispatch")
    R, T, K, L, cap = (cfg.num_ranks, cfg.num_tokens, cfg.num_topk, cfg.num_local_experts,
                       cfg.capacity)
    rank_layout = cfg.layout == "rank"
    meta_shape = (cap, K) if rank_layout else (cap,)
    results = [
        jax.ShapeDtypeStruct(meta_shape, I32),   # recv_topk_idx
        jax.ShapeDtypeStruct(meta_shape, F32),   # recv_topk_weights
        jax.ShapeDtypeStruct((), I32),           # num_recv_tokens
        jax.ShapeDtypeStruct((L,), I32),         # num_recv_tokens_per_expert
        jax.ShapeDtypeStruct((L,), I32),         # group_sizes
        jax.ShapeDtypeStruct((), I32),           # num_overflow
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_rank
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_token
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_slot
        jax.ShapeDtypeStruct((T, R) if rank_layout else (T, K), I32),  # send_pos
        jax.ShapeDtypeStruct((L,), I32),         # needed_per_expert
    ] + [jax.ShapeDtypeStruct((cap,) + p.shape[1:], p.dtype)
         for p in (fp8.cast_shapes(payload[0]) if cfg.cast_fp8 else payload)]
    if T == 0:  # T is static and equal on every rank: nobody sends anything
        return _empty_dispatch(results, len(results) - 11, cfg)
    outs = exchange_call("jax_ep_dispatch", results, topk_idx.astype(I32),
                         topk_weights.astype(F32), *payload, axis_name=cfg.axis_name,
                         side_stream=cfg.side_stream, buffer_id=i64(buffer_id),
                         num_sms=i64(cfg.num_sms), expert_alignment=i64(cfg.expert_alignment))
    (recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow, src_rank, src_token,
     src_slot, send_pos, needed) = outs[:11]
    recv_payload = tuple(outs[11:])
    handle = HandleArrays(recv_src_rank=src_rank, recv_src_token=src_token,
                          recv_src_slot=src_slot, send_pos=send_pos)
    return (recv_payload, recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow, handle,
            needed)


def _empty_dispatch(results, num_payloads: int, cfg: DispatchConfig):
    """What a dispatch with no tokens anywhere returns (no kernel launch needed)."""
    # Derived from axis_index so the values live inside the manual computation.
    zero = jax.lax.axis_index(cfg.axis_name).astype(I32) * 0
    fill = lambda r, v: jnp.full(r.shape, v, r.dtype) + zero.astype(r.dtype)
    (idx_r, w_r, nrecv_r, per_r, grp_r, ovf_r, srank_r, stok_r, sslot_r, spos_r,
     need_r) = results[:11]
    recv_payload = tuple(fill(r, 0) for r in results[11:11 + num_payloads])
    handle = HandleArrays(recv_src_rank=fill(srank_r, -1), recv_src_token=fill(stok_r, -1),
                          recv_src_slot=fill(sslot_r, -1), send_pos=fill(spos_r, -1))
    return (recv_payload, fill(idx_r, -1), fill(w_r, 0), fill(nrecv_r, 0), fill(per_r, 0),
            fill(grp_r, 0), fill(ovf_r, 0), handle, fill(need_r, 0))


def cached_dispatch(x: jax.Array, handle: HandleArrays, cfg: DispatchConfig) -> jax.Array:
    """``x [T, W]`` moved into the rows of the dispatch that made ``handle`` (zeros elsewhere)."""
    buffer_id = _require_buffer(cfg, "cached_dispatch")
    out = jax.ShapeDtypeStruct((cfg.capacity,) + x.shape[1:], x.dtype)
    if cfg.num_tokens == 0:
        return varying(jnp.zeros(out.shape, out.dtype), cfg.axis_name)
    return exchange_call("jax_ep_cached_dispatch", out, x, handle.recv_src_rank,
                         handle.recv_src_token, axis_name=cfg.axis_name,
                         side_stream=cfg.side_stream, buffer_id=i64(buffer_id),
                         num_sms=i64(cfg.num_sms))


def combine(y: jax.Array, weights: Optional[jax.Array], handle: HandleArrays,
            cfg: DispatchConfig) -> jax.Array:
    """out[t] = sum over the rows of t of weights[row] * y[row], fp32 accumulation."""
    buffer_id = _require_buffer(cfg, "combine")
    width = y.shape[1]
    if cfg.num_tokens == 0:
        return varying(jnp.zeros((0, width), y.dtype), cfg.axis_name)
    per_vector = 16 // jnp.dtype(y.dtype).itemsize
    pad = (-width) % per_vector  # the kernel moves 16-byte vectors (e.g. f32 width-K grads)
    if pad:
        y = jnp.pad(y, ((0, 0), (0, pad)))
    has_weights = weights is not None
    w = weights.astype(F32) if has_weights else jnp.zeros((1,), F32)
    out = jax.ShapeDtypeStruct((cfg.num_tokens, width + pad), y.dtype)
    res = exchange_call("jax_ep_combine", out, y, w, handle.send_pos, handle.recv_src_rank,
                        handle.recv_src_token, handle.recv_src_slot, axis_name=cfg.axis_name,
                        side_stream=cfg.side_stream, buffer_id=i64(buffer_id),
                        num_sms=i64(cfg.num_sms), layout=i64(_LAYOUT_CODE[cfg.layout]),
                        has_weights=bool(has_weights))
    return res[:, :width] if pad else res
