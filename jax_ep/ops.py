"""Normal (throughput) ops: layout, dispatch and combine, with their custom VJPs.

All three are called per rank inside ``jax.shard_map`` over the expert-parallel
axis. The VJPs are written once, here, in terms of the backend functions
(``dispatch``'s backward is a ``combine``; ``combine``'s backward is a
``cached_dispatch``), so every backend inherits them.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax_ep import backends, fp8, overlap
from jax_ep import validation as v
from jax_ep.check import emit as emit_checks
from jax_ep.types import (DEFAULT_NUM_SMS, DispatchConfig, DispatchHandle, DispatchLayout,
                          DispatchResult)

LAYOUTS = ("rank", "expert")


def get_dispatch_layout(topk_idx: jax.Array, num_experts: int, *, axis_name: str,
                        backend: str = "auto") -> DispatchLayout:
    """Counts where each token goes, without moving anything.

    Returns :class:`DispatchLayout`: tokens per rank ``[R]``, (token, slot) pairs per
    expert ``[E]`` and ``is_token_in_rank [T, R]``. Slots holding -1 are ignored. The op
    is local (no communication), so the CUDA kernel needs no :class:`Buffer`.

    Example (inside ``shard_map`` over axis ``"ep"``)::

        layout = jax_ep.get_dispatch_layout(topk_idx, 64, axis_name="ep")
    """
    op = "get_dispatch_layout"
    num_ranks = v.axis_size(axis_name, op)
    num_experts = v.check_num_experts(op, num_experts, num_ranks)
    v.check_array(op, "topk_idx", topk_idx, 2, (jnp.int32,))
    be = backends.get(backends.resolve(backend, None, op, needs_buffer=False))
    return DispatchLayout(*be.get_dispatch_layout(
        topk_idx, num_experts=num_experts, num_ranks=num_ranks))


def default_capacity(num_tokens: int, num_ranks: int, num_topk: int, num_local_experts: int,
                     layout: str, expert_alignment: int = 1) -> int:
    """Rows that can never overflow: every token of every rank (times its slots, plus
    alignment padding, in the expert layout)."""
    if layout == "rank":
        return num_ranks * num_tokens
    return num_ranks * num_tokens * num_topk + num_local_experts * (expert_alignment - 1)


def dispatch(x, topk_idx: jax.Array, topk_weights: Optional[jax.Array] = None, *,
             num_experts: int, axis_name: str, layout: str = "rank",
             max_recv_tokens: Optional[int] = None, expert_alignment: int = 1,
             buffer=None, backend: str = "auto", num_sms: Optional[int] = None,
             check_inputs: bool = False, cast_fp8: bool = False) -> DispatchResult:
    """Sends every token to each rank that holds one of its top-k experts.

    Args:
      x: ``[T, H]`` bf16/f16/f32 tokens of this rank, or an FP8 pair
        ``(e4m3 [T, H], f32 scales [T, H/128])`` from :func:`jax_ep.fp8.per_token_cast`.
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for an unused slot.
      topk_weights: ``[T, K]`` routing weights (ones if None); bf16/f16 are cast to f32.
      num_experts: E (a static int, NumPy integers accepted), divisible by the axis size R;
        expert e lives on rank ``e // (E/R)``.
      axis_name: the ``shard_map`` mesh axis that holds the experts.
      layout: ``"rank"`` (one row per token and receiving rank, ordered by source rank
        then source token) or ``"expert"`` (one row per (token, local expert) slot, grouped
        by local expert, ready for ``jax.lax.ragged_dot``).
      max_recv_tokens: static row capacity; default never overflows. Rows beyond it are
        dropped and counted in ``num_overflow`` (see :func:`jax_ep.check`).
      expert_alignment: expert layout only: pad each expert group to this multiple.
      buffer: a :class:`jax_ep.Buffer`; required for the CUDA kernels.
      backend: ``"auto"``, ``"cuda"`` or ``"reference"``.
      num_sms: SMs for the CUDA kernels (default: the buffer's).
      check_inputs: check that every expert id is in ``[-1, E)``, as
        :func:`jax_ep.check` does (``mode="auto"``: a ``checkify`` check under a
        ``checkify.checkify`` wrapper, else an error raised when the step runs). Either way
        ids out of range are treated as -1 and counted in ``num_invalid_ids``.
      cast_fp8: ``x`` is bf16 ``[T, H]`` (``H % 128 == 0``) and travels as FP8: each row is
        cast on the way, as :func:`jax_ep.fp8.per_token_cast` does (the CUDA kernel casts
        while it copies, bitwise equal to that function as XLA compiles it, with no separate
        cast pass), and ``recv_x`` is the FP8 pair. Like an FP8 pair input, not
        differentiable with respect to ``x`` (its gradient is zero); ``topk_weights``'
        gradient still flows.

    Returns:
      :class:`DispatchResult`. Its ``handle`` feeds :func:`combine`.

    Example::

        def step(x, idx, w):
            r = jax_ep.dispatch(x, idx, w, num_experts=64, axis_name="ep", layout="expert")
            y = expert_ffn(r.recv_x, r.group_sizes)
            return jax_ep.combine(y, r.handle, r.recv_topk_weights)
    """
    op = "dispatch"
    num_ranks = v.axis_size(axis_name, op)
    is_fp8 = isinstance(x, (tuple, list))
    if cast_fp8:
        if is_fp8:
            raise ValueError(f"{op}: cast_fp8=True takes bf16 x, not an FP8 pair (pass the "
                             "pair without cast_fp8)")
        v.check_array(op, "x", x, 2, (jnp.bfloat16,))
        if x.shape[1] % fp8.BLOCK:
            raise ValueError(f"{op}: cast_fp8=True needs hidden % {fp8.BLOCK} == 0, got x of "
                             f"shape {tuple(x.shape)}; pad the hidden dimension")
        payload = (x,)
    elif is_fp8:
        if len(x) != 2:
            raise ValueError(f"{op}: an FP8 x must be a pair (values, scales), got {len(x)} items")
        q, scales = x
        v.check_array(op, "x[0] (fp8 values)", q, 2, (jnp.float8_e4m3fn,))
        v.check_array(op, "x[1] (fp8 scales)", scales, 2, (jnp.float32,))
        if q.shape[1] % fp8.BLOCK or scales.shape != (q.shape[0], q.shape[1] // fp8.BLOCK):
            raise ValueError(
                f"{op}: FP8 x needs hidden % {fp8.BLOCK} == 0 and scales of shape "
                f"{(q.shape[0], q.shape[1] // fp8.BLOCK)}; got values {tuple(q.shape)}, "
                f"scales {tuple(scales.shape)} (use jax_ep.fp8.per_token_cast)")
        payload = (q, scales)
    else:
        v.check_array(op, "x", x, 2, v.FLOAT_DTYPES)
        payload = (x,)
    v.check_hidden(op, "x", payload[0])
    # what travels: the FP8 pair when cast on the way
    wire = fp8.cast_shapes(x) if cast_fp8 else payload
    num_tokens = payload[0].shape[0]
    num_experts = v.check_num_experts(op, num_experts, num_ranks)
    v.check_topk(op, topk_idx, topk_weights, num_tokens)
    v.check_buffer(op, buffer, axis_name, num_ranks)
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")
    expert_alignment = v.check_positive_int(op, "expert_alignment", expert_alignment)
    if layout == "rank" and expert_alignment != 1:
        raise ValueError(f"{op}: expert_alignment applies to layout='expert' only")
    num_topk = topk_idx.shape[1]
    local = num_experts // num_ranks
    if max_recv_tokens is None:
        max_recv_tokens = default_capacity(num_tokens, num_ranks, num_topk, local, layout,
                                           expert_alignment)
    else:
        max_recv_tokens = v.check_positive_int(op, "max_recv_tokens", max_recv_tokens,
                                               minimum=0)
    resolved = backends.resolve(backend, buffer, op)
    if num_sms is None:
        num_sms = getattr(buffer, "num_sms", DEFAULT_NUM_SMS)
    num_sms = v.check_positive_int(op, "num_sms", num_sms)
    cfg = DispatchConfig(
        num_experts=num_experts, num_ranks=num_ranks, axis_name=axis_name, layout=layout,
        capacity=max_recv_tokens, expert_alignment=expert_alignment, num_tokens=num_tokens,
        num_topk=num_topk, backend=resolved, num_sms=num_sms,
        buffer_id=getattr(buffer, "buffer_id", None) if backends.uses_buffer(resolved) else None,
        cast_fp8=bool(cast_fp8), side_stream=backends.side_stream(buffer, resolved),
        node_size=v.node_size(op, buffer, num_ranks))
    if backends.uses_buffer(resolved):
        buffer.check_fits(cfg, wire)
    # counted here, outside the backends: the same on every backend, no kernel change
    invalid = v.num_invalid_ids(topk_idx, num_experts)
    if check_inputs:
        emit_checks(None, None, invalid, num_experts=num_experts, axis_name=axis_name,
                    what=f"{op}(check_inputs)")
    if topk_weights is None:
        topk_weights = jnp.ones(topk_idx.shape, jnp.float32)
    topk_weights = v.weights_f32(topk_weights)
    hook = overlap.take("op")  # jax_ep.beside's compute, run inside the exchange
    compute, beside_in = overlap.carried(hook)
    outs, beside_out = _dispatch(cfg, compute, payload, topk_idx, topk_weights, beside_in)
    overlap.deliver(hook, beside_out)
    recv_payload, recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow, harr = outs
    recv_x = tuple(recv_payload) if is_fp8 or cast_fp8 else recv_payload[0]
    return DispatchResult(recv_x, recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow,
                          DispatchHandle(harr, cfg, invalid))


# The ops' custom VJPs carry jax_ep.beside's compute (`compute`, static; its inputs
# `beside_in`, its outputs beside the op's) so that it is traced next to the op's custom
# call, forward and backward (jax_ep/overlap.py). Without one, compute is None and
# beside_in ().

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dispatch(cfg: DispatchConfig, compute, payload, topk_idx, topk_weights, beside_in):
    be = backends.get(cfg.backend)
    return overlap.exchange_beside(
        compute, beside_in, lambda: be.dispatch(tuple(payload), topk_idx, topk_weights, cfg))


def _dispatch_fwd(cfg, compute, payload, topk_idx, topk_weights, beside_in):
    be = backends.get(cfg.backend)
    outs, beside_out, beside_vjp = overlap.forward_beside(
        compute, beside_in, lambda: be.dispatch(tuple(payload), topk_idx, topk_weights, cfg))
    recv_idx, handle = outs[1], outs[7]
    return (outs, beside_out), (recv_idx, handle, payload, beside_vjp)


def _dispatch_bwd(cfg, compute, residuals, cotangents):
    recv_idx, handle, payload, beside_vjp = residuals
    (d_payload, _, d_recv_w), d_beside = cotangents[0][:3], cotangents[1]
    be = backends.get(cfg.backend)

    def exchange():
        if len(payload) == 1 and not cfg.cast_fp8:  # the adjoint of moving rows: summing back
            dx = (be.combine(d_payload[0].astype(payload[0].dtype), None, handle, cfg),)
        else:  # FP8 values are quantised constants: documented as non-differentiable
            dx = tuple(jnp.zeros_like(p) for p in payload)
        if cfg.layout == "rank":
            slot_grads = jnp.where(recv_idx >= 0, d_recv_w, 0.0)
        else:
            slot = jax.nn.one_hot(handle.recv_src_slot, cfg.num_topk, dtype=jnp.float32)
            slot_grads = slot * jnp.where(recv_idx >= 0, d_recv_w, 0.0)[:, None]
        return dx, be.combine(slot_grads.astype(jnp.float32), None, handle, cfg)
    (dx, d_weights), d_beside_in = overlap.backward_beside(compute, beside_vjp, d_beside,
                                                           exchange)
    return dx, None, d_weights, d_beside_in


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def combine(y: jax.Array, handle: DispatchHandle, weights: Optional[jax.Array] = None, *,
            backend: Optional[str] = None) -> jax.Array:
    """Brings rows back to their source tokens and sums them in fp32.

    ``out[t] = sum over rows r received from token t of weights[r] * y[r]`` (plain sum
    when ``weights`` is None), returned as ``[T, H]`` in ``y``'s dtype.

    Args:
      y: ``[cap, H]`` rows in the order of ``handle``'s dispatch (rank layout: one row
        per (token, rank), already reduced over that rank's experts; expert layout: one
        row per (token, local expert) slot).
      handle: ``DispatchResult.handle``.
      weights: optional ``[cap]`` f32 per-row weights, e.g. the expert layout's
        ``recv_topk_weights``.
      backend: defaults to the backend of the dispatch that made ``handle``.

    Example::

        out = jax_ep.combine(expert_out, r.handle, r.recv_topk_weights)
    """
    op = "combine"
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"{op}: handle must be DispatchResult.handle, got {type(handle).__name__}")
    cfg = handle.config
    v.axis_size(cfg.axis_name, op)
    v.check_array(op, "y", y, 2, v.FLOAT_DTYPES)
    if y.shape[0] != cfg.capacity:
        raise ValueError(f"{op}: y has {y.shape[0]} rows but the dispatch produced "
                         f"{cfg.capacity} (its max_recv_tokens); pass one row per received row")
    v.check_hidden(op, "y", y)
    if weights is not None:
        v.check_array(op, "weights", weights, 1, (jnp.float32,))
        if weights.shape[0] != cfg.capacity:
            raise ValueError(f"{op}: weights must have shape ({cfg.capacity},), got "
                             f"{tuple(weights.shape)}")
    if backend is not None and backend != "auto" and backend != cfg.backend:
        raise ValueError(f"{op}: backend={backend!r} differs from the dispatch's backend "
                         f"{cfg.backend!r}; a handle can only be combined by its own backend")
    hook = overlap.take("op")  # jax_ep.beside's compute, run inside the exchange
    compute, beside_in = overlap.carried(hook)
    if weights is None:
        out, beside_out = _combine_unweighted(cfg, compute, y, handle.arrays, beside_in)
    else:
        out, beside_out = _combine_weighted(cfg, compute, y, weights, handle.arrays, beside_in)
    overlap.deliver(hook, beside_out)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_weighted(cfg, compute, y, weights, handle, beside_in):
    be = backends.get(cfg.backend)
    return overlap.exchange_beside(compute, beside_in,
                                   lambda: be.combine(y, weights, handle, cfg))


def _combine_weighted_fwd(cfg, compute, y, weights, handle, beside_in):
    be = backends.get(cfg.backend)
    out, beside_out, beside_vjp = overlap.forward_beside(
        compute, beside_in, lambda: be.combine(y, weights, handle, cfg))
    return (out, beside_out), (y, weights, handle, beside_vjp)


def _combine_weighted_bwd(cfg, compute, residuals, cotangents):
    y, weights, handle, beside_vjp = residuals
    d_out, d_beside = cotangents
    be = backends.get(cfg.backend)
    rows, d_beside_in = overlap.backward_beside(
        compute, beside_vjp, d_beside, lambda: be.cached_dispatch(d_out, handle, cfg))
    rows = rows.astype(jnp.float32)
    dy = (rows * weights[:, None]).astype(y.dtype)
    d_weights = jnp.sum(rows * y.astype(jnp.float32), axis=1)
    return dy, d_weights, None, d_beside_in


_combine_weighted.defvjp(_combine_weighted_fwd, _combine_weighted_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_unweighted(cfg, compute, y, handle, beside_in):
    be = backends.get(cfg.backend)
    return overlap.exchange_beside(compute, beside_in, lambda: be.combine(y, None, handle, cfg))


def _combine_unweighted_fwd(cfg, compute, y, handle, beside_in):
    be = backends.get(cfg.backend)
    out, beside_out, beside_vjp = overlap.forward_beside(
        compute, beside_in, lambda: be.combine(y, None, handle, cfg))
    return (out, beside_out), (handle, beside_vjp)


def _combine_unweighted_bwd(cfg, compute, residuals, cotangents):
    handle, beside_vjp = residuals
    d_out, d_beside = cotangents
    be = backends.get(cfg.backend)
    dy, d_beside_in = overlap.backward_beside(
        compute, beside_vjp, d_beside, lambda: be.cached_dispatch(d_out, handle, cfg))
    return dy, None, d_beside_in


_combine_unweighted.defvjp(_combine_unweighted_fwd, _combine_unweighted_bwd)
