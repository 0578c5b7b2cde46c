"""CUDA backend, low-latency (decode) ops: XLA FFI custom calls over NVLink peer pointers
inside a node and NVSHMEM puts across nodes.

``ll_dispatch`` and ``ll_combine`` have the signatures and results of
:mod:`jax_ep.backends.reference` (bitwise the same values, including the
:class:`~jax_ep.types.LowLatencyHandleArrays`; dispatch rows past the per-(expert, source
rank) counts are undefined unless ``cfg.zero_padding``, where the reference writes zeros);
each is one custom call that runs the send and receive phases in one cooperative kernel.
The split form (``ll_dispatch_send`` / ``ll_dispatch_recv``, ``ll_combine_send`` /
``ll_combine_recv``) is two custom calls tied by a one-int ticket, so independent work can
sit between them.

Receive slots live in the low-latency region of each GPU's communication buffer (see
``cuda/low_latency/low_latency.h``): create the ``jax_ep.Buffer`` with
``num_nvl_bytes=jax_ep.Buffer.get_low_latency_size_hint(...)``. Consecutive low-latency ops
alternate between two halves of that region, so on one Buffer every ``*_send`` must be
followed by its ``*_recv`` before the next ``*_send`` (the kernels trap with a message
otherwise). Where the EP axis spans several nodes the same calls run on the Buffer's
symmetric low-latency region (:mod:`.buffer`): the handlers pick the kernels over NVSHMEM
puts for it, with the same results.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.backends.cuda._ffi import F32, I32, call, limits
from jax_ep.types import LowLatencyConfig, LowLatencyHandleArrays

# Default launch shape: up to 128 blocks (about one per SM of an H100/H200; the fused ops'
# single cooperative kernel is also capped at what fits on the GPU at once), 16 warps each
# (the most the kernels are compiled for).
DEFAULT_LL_NUM_SMS = 128
DEFAULT_LL_NUM_WARPS = 16

_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _check(op: str, cfg: LowLatencyConfig, num_tokens: int, num_topk: int) -> int:
    if cfg.buffer_id is None:
        raise ValueError(f"{op}: the CUDA backend needs buffer=jax_ep.Buffer(mesh, axis_name, "
                         "num_nvl_bytes=jax_ep.Buffer.get_low_latency_size_hint(...))")
    R, E, M = cfg.num_ranks, cfg.num_experts, cfg.max_tokens_per_rank
    lim = limits()
    max_ranks, max_experts, max_topk = lim["ll_max_ranks"], lim["max_experts"], lim["max_topk"]
    max_tokens = lim["ll_max_tokens_per_rank"]
    if R > max_ranks:
        raise ValueError(f"{op}: the CUDA kernels support up to {max_ranks} ranks, got {R}")
    if E > max_experts or E % R:
        raise ValueError(f"{op}: num_experts must be a multiple of {R} and <= {max_experts}, "
                         f"got {E}")
    if not 1 <= M <= max_tokens:
        raise ValueError(f"{op}: the CUDA kernels support max_tokens_per_rank in [1, "
                         f"{max_tokens}], got {M}")
    if num_tokens > M:
        raise ValueError(f"{op}: {num_tokens} tokens but max_tokens_per_rank is {M}")
    if not 1 <= num_topk <= max_topk:
        raise ValueError(f"{op}: the CUDA kernels support 1 to {max_topk} top-k slots, got "
                         f"{num_topk}")
    return int(cfg.buffer_id)


def _check_dtype(op: str, name: str, a) -> None:
    if jnp.dtype(a.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be bfloat16, float16 or float32, got {a.dtype}")


def _attrs(cfg: LowLatencyConfig, buffer_id: int, num_sms: Optional[int],
           num_warps: Optional[int]):
    """The attributes every handler takes (sizes come from recv_x or y)."""
    num_sms = num_sms or cfg.num_sms or DEFAULT_LL_NUM_SMS
    return dict(buffer_id=np.int64(buffer_id), num_sms=np.int64(num_sms),
                num_warps=np.int64(num_warps or DEFAULT_LL_NUM_WARPS))


def _recv_results(cfg: LowLatencyConfig, hidden: int, dtype):
    L, R, M = cfg.num_local_experts, cfg.num_ranks, cfg.max_tokens_per_rank
    counts = [jax.ShapeDtypeStruct((L,), I32),          # recv_count
              jax.ShapeDtypeStruct((L, R * M), I32),    # recv_src_token
              jax.ShapeDtypeStruct((L, R), I32)]        # recv_count_per_rank
    if cfg.use_fp8:
        payload = [jax.ShapeDtypeStruct((L, R * M, hidden), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((L, R * M, hidden // 128), F32)]
    else:
        payload = [jax.ShapeDtypeStruct((L, R * M, hidden), dtype)]
    return counts, payload


def _check_row(op, hidden, dtype, use_fp8):
    if use_fp8 and hidden % 128:
        raise ValueError(f"{op}: use_fp8=True needs hidden % 128 == 0, got {hidden}")
    if not use_fp8 and (hidden * jnp.dtype(dtype).itemsize) % 16:
        raise ValueError(f"{op}: rows must be a multiple of 16 bytes, got hidden={hidden} in "
                         f"{jnp.dtype(dtype).name}")


def _sender_operands(op, x, topk_idx, slot_scale, cfg):
    _check_dtype(op, "x", x)
    if x.ndim != 2 or topk_idx.ndim != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: x must be [T, H] and topk_idx [T, K], got {x.shape} and "
                         f"{topk_idx.shape}")
    _check_row(op, x.shape[1], x.dtype, cfg.use_fp8)
    has_scale = slot_scale is not None
    if has_scale and cfg.use_fp8:
        raise ValueError(f"{op}: slot_scale is not supported with use_fp8=True")
    scale = (slot_scale.astype(F32) if has_scale else jnp.zeros((1,), F32))
    return x, topk_idx.astype(I32), scale, has_scale


# ----------------------------------------------------------------------------- dispatch

def ll_dispatch(x: jax.Array, topk_idx: jax.Array, slot_scale: Optional[jax.Array],
                cfg: LowLatencyConfig, *, num_sms: Optional[int] = None,
                num_warps: Optional[int] = None):
    """Same contract as ``reference.ll_dispatch``: ``(recv_x, recv_count, handle)``."""
    op = "low_latency_dispatch"
    x, idx, scale, has_scale = _sender_operands(op, x, topk_idx, slot_scale, cfg)
    T, H = x.shape
    buffer_id = _check(op, cfg, T, idx.shape[1])
    counts, payload = _recv_results(cfg, H, x.dtype)
    results = [jax.ShapeDtypeStruct(idx.shape, I32)] + counts + payload  # send_pos first
    outs = call("jax_ep_ll_dispatch", results, x, idx, scale, axis_name=cfg.axis_name,
                has_slot_scale=bool(has_scale), zero_padding=bool(cfg.zero_padding),
                **_attrs(cfg, buffer_id, num_sms, num_warps))
    send_pos, recv_count, src_token, count_per_rank = outs[:4]
    recv_x = tuple(outs[4:]) if cfg.use_fp8 else outs[4]
    return recv_x, recv_count, LowLatencyHandleArrays(src_token, count_per_rank, send_pos)


class DispatchSent(NamedTuple):
    """What :func:`ll_dispatch_send` returns; pass it to :func:`ll_dispatch_recv`. The send
    already wrote this rank's own rows (and their tokens and counts) into the receive
    buffers, which pass through the recv (aliased) to become its results."""
    send_pos: jax.Array        # [T, K] int32, the handle's send_pos
    ticket: jax.Array          # [1] int32, the op number (ties the recv to this send)
    recv_src_token: jax.Array  # [L, R*M] int32
    recv_count_per_rank: jax.Array  # [L, R] int32
    payload: tuple             # (recv_x,) or, with FP8, (values, scales)


def ll_dispatch_send(x: jax.Array, topk_idx: jax.Array, cfg: LowLatencyConfig,
                     slot_scale: Optional[jax.Array] = None, *, num_sms: Optional[int] = None,
                     num_warps: Optional[int] = None) -> DispatchSent:
    """First half of :func:`ll_dispatch`: writes the rows into the peers' slots (and this
    rank's own rows into the receive buffers)."""
    op = "low_latency_dispatch_send"
    x, idx, scale, has_scale = _sender_operands(op, x, topk_idx, slot_scale, cfg)
    buffer_id = _check(op, cfg, x.shape[0], idx.shape[1])
    counts, payload = _recv_results(cfg, x.shape[1], x.dtype)
    results = [jax.ShapeDtypeStruct(idx.shape, I32), jax.ShapeDtypeStruct((1,), I32)]
    outs = call("jax_ep_ll_dispatch_send", results + counts[1:] + payload, x, idx, scale,
                axis_name=cfg.axis_name, has_slot_scale=bool(has_scale),
                **_attrs(cfg, buffer_id, num_sms, num_warps))
    return DispatchSent(outs[0], outs[1], outs[2], outs[3], tuple(outs[4:]))


def ll_dispatch_recv(sent: DispatchSent, cfg: LowLatencyConfig, dtype, *,
                     hidden: Optional[int] = None, num_sms: Optional[int] = None,
                     num_warps: Optional[int] = None):
    """Second half of :func:`ll_dispatch`: waits for the rows; ``dtype`` is x's dtype.

    Returns ``(recv_x, recv_count, handle)`` exactly as the fused op (padding rows zeroed
    when ``cfg.zero_padding``)."""
    op = "low_latency_dispatch_recv"
    buffer_id = _check(op, cfg, 0, 1)
    hidden = int(hidden if hidden is not None else cfg.hidden)
    if jnp.dtype(dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be bfloat16, float16 or float32, got {dtype}")
    _check_row(op, hidden, dtype, cfg.use_fp8)
    counts, payload = _recv_results(cfg, hidden, jnp.dtype(dtype))
    passed = (sent.recv_src_token, sent.recv_count_per_rank) + tuple(sent.payload)
    # operand 0 is the ticket; operand i >= 1 becomes result i (result 0 is recv_count)
    outs = call("jax_ep_ll_dispatch_recv", counts + payload, sent.ticket, *passed,
                axis_name=cfg.axis_name,
                input_output_aliases={i: i for i in range(1, 1 + len(passed))},
                zero_padding=bool(cfg.zero_padding),
                **_attrs(cfg, buffer_id, num_sms, num_warps))
    recv_count, src_token, count_per_rank = outs[:3]
    recv_x = tuple(outs[3:]) if cfg.use_fp8 else outs[3]
    return recv_x, recv_count, LowLatencyHandleArrays(src_token, count_per_rank, sent.send_pos)


# ----------------------------------------------------------------------------- combine

def _check_y(op, y, cfg):
    _check_dtype(op, "y", y)
    L, R, M = cfg.num_local_experts, cfg.num_ranks, cfg.max_tokens_per_rank
    if y.ndim != 3 or y.shape[:2] != (L, R * M) or y.shape[2] < 1:
        raise ValueError(f"{op}: y must have shape {(L, R * M, 'W')}, got {y.shape}")


def ll_combine(y: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
               handle: LowLatencyHandleArrays, cfg: LowLatencyConfig, *,
               num_sms: Optional[int] = None, num_warps: Optional[int] = None) -> jax.Array:
    """Same contract as ``reference.ll_combine``: ``out [T, W]`` in ``y``'s dtype."""
    op = "low_latency_combine"
    T, K = topk_idx.shape
    buffer_id = _check(op, cfg, T, K)
    _check_y(op, y, cfg)
    out = jax.ShapeDtypeStruct((T, y.shape[2]), y.dtype)
    return call("jax_ep_ll_combine", out, y, topk_idx.astype(I32), topk_weights.astype(F32),
                handle.send_pos.astype(I32), handle.recv_count_per_rank.astype(I32),
                axis_name=cfg.axis_name, **_attrs(cfg, buffer_id, num_sms, num_warps))


class CombineSent(NamedTuple):
    """What :func:`ll_combine_send` returns; pass it to :func:`ll_combine_recv`, which
    reads this rank's own experts' rows from ``y``."""
    ticket: jax.Array  # [1] int32
    y: jax.Array       # [L, R*M, W]


def ll_combine_send(y: jax.Array, handle: LowLatencyHandleArrays, cfg: LowLatencyConfig, *,
                    num_sms: Optional[int] = None,
                    num_warps: Optional[int] = None) -> CombineSent:
    """First half of :func:`ll_combine`: sends the expert rows of other ranks' tokens home."""
    op = "low_latency_combine_send"
    buffer_id = _check(op, cfg, 0, 1)
    _check_y(op, y, cfg)
    ticket = call("jax_ep_ll_combine_send", jax.ShapeDtypeStruct((1,), I32), y,
                  handle.recv_count_per_rank.astype(I32), axis_name=cfg.axis_name,
                  **_attrs(cfg, buffer_id, num_sms, num_warps))
    return CombineSent(ticket, y)


def ll_combine_recv(sent: CombineSent, topk_idx: jax.Array, topk_weights: jax.Array,
                    handle: LowLatencyHandleArrays, cfg: LowLatencyConfig, dtype, width: int, *,
                    num_sms: Optional[int] = None, num_warps: Optional[int] = None) -> jax.Array:
    """Second half of :func:`ll_combine`: ``out [T, width]`` in ``dtype`` (y's)."""
    op = "low_latency_combine_recv"
    T, K = topk_idx.shape
    buffer_id = _check(op, cfg, T, K)
    if jnp.dtype(dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be bfloat16, float16 or float32, got {dtype}")
    if sent.y.dtype != jnp.dtype(dtype) or sent.y.shape[2] != int(width):
        raise ValueError(f"{op}: y is {sent.y.dtype} {sent.y.shape}, but the output was asked "
                         f"in {jnp.dtype(dtype)} of width {width}")
    out = jax.ShapeDtypeStruct((T, int(width)), jnp.dtype(dtype))
    return call("jax_ep_ll_combine_recv", out, sent.ticket, sent.y, topk_idx.astype(I32),
                topk_weights.astype(F32), handle.send_pos.astype(I32),
                axis_name=cfg.axis_name, **_attrs(cfg, buffer_id, num_sms, num_warps))
