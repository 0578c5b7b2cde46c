"""Low-latency (decode) ops: fixed expert-major layout, fused and send/receive split.

``low_latency_dispatch`` writes each (token, expert) row into
``recv_x[local expert, source rank * M + i]`` (M = ``max_tokens_per_rank``), in
source-token order, so the output shape never depends on the routing. A token
that names the same expert in two slots sends one row; ``low_latency_combine``
weights that row by each slot. Rows past each (expert, source rank) count are
undefined on the CUDA backend unless ``zero_padding=True`` (always zero when
differentiated; the reference backend writes zeros). The split forms return a pending
state from ``*_send`` that ``*_recv`` completes (two custom calls on CUDA), so computation
can sit in between.

``packed=True`` moves each local expert's rows to ``recv_x[e, 0 : recv_count[e]]`` in
(source rank, source token) order, zeros after, the layout masked expert kernels (e.g.
DeepGEMM's masked grouped GEMM) read; ``low_latency_combine`` then takes ``y`` in that
layout. It is one gather after the exchange (and one before combine's), the same on every
backend. The default stays per source rank: it needs no pass over the rows and is what the
kernels write.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jax_ep import backends
from jax_ep import validation as v
from jax_ep.types import LowLatencyConfig, LowLatencyDispatchResult, LowLatencyHandle, _Handle


def _config(op, x, topk_idx, num_experts, max_tokens_per_rank, axis_name, use_fp8, buffer,
            backend, zero_padding=False, num_sms=None, packed=False) -> LowLatencyConfig:
    num_ranks = v.axis_size(axis_name, op)
    v.check_array(op, "x", x, 2, v.FLOAT_DTYPES)
    v.check_hidden(op, "x", x)
    if use_fp8 and x.shape[1] % 128:
        raise ValueError(f"{op}: use_fp8=True needs hidden % 128 == 0, got {x.shape[1]}")
    num_experts = v.check_num_experts(op, num_experts, num_ranks)
    v.check_topk(op, topk_idx, None, x.shape[0])
    v.check_buffer(op, buffer, axis_name, num_ranks)
    max_tokens_per_rank = v.check_positive_int(op, "max_tokens_per_rank", max_tokens_per_rank)
    if x.shape[0] > max_tokens_per_rank:
        raise ValueError(f"{op}: x has {x.shape[0]} tokens but max_tokens_per_rank is "
                         f"{max_tokens_per_rank}; raise max_tokens_per_rank to at least "
                         f"{x.shape[0]}")
    if num_sms is not None:
        num_sms = v.check_positive_int(op, "num_sms", num_sms)
    resolved = backends.resolve(backend, buffer, "low_latency")
    uses_buffer = backends.uses_buffer(resolved)
    cfg = LowLatencyConfig(
        num_experts=num_experts, num_ranks=num_ranks, axis_name=axis_name,
        max_tokens_per_rank=max_tokens_per_rank, num_tokens=x.shape[0],
        num_topk=topk_idx.shape[1], hidden=x.shape[1], use_fp8=bool(use_fp8), backend=resolved,
        buffer_id=getattr(buffer, "buffer_id", None) if uses_buffer else None,
        zero_padding=bool(zero_padding), num_sms=num_sms,
        packed=v.check_bool(op, "packed", packed))
    if uses_buffer:
        buffer.check_fits_low_latency(cfg, x.dtype)
    return cfg


def low_latency_dispatch(x: jax.Array, topk_idx: jax.Array, *, num_experts: int,
                         max_tokens_per_rank: int, axis_name: str, use_fp8: bool = False,
                         zero_padding: bool = False, buffer=None, backend: str = "auto",
                         num_sms: Optional[int] = None,
                         packed: bool = False) -> LowLatencyDispatchResult:
    """Dispatch for decoding: output ``[E/R, R*max_tokens_per_rank, H]`` whatever the routing.

    Args:
      x: ``[T, H]`` bf16/f16/f32 with ``T <= max_tokens_per_rank``.
      topk_idx: ``[T, K]`` int32 expert ids, -1 for an unused slot.
      use_fp8: cast rows to e4m3 with per-128-channel scales before sending;
        ``recv_x`` is then ``(values, scales [E/R, R*M, H/128])``. Not differentiable.
      zero_padding: write zeros into the rows of ``recv_x`` past each (local expert,
        source rank) count. By default the CUDA kernels leave those rows undefined (like
        DeepEP; writing them costs about as much as the whole transfer) and no jax_ep op
        reads them; the reference backend always writes zeros. Under differentiation the
        rows are always zero (a NaN there would poison the expert weights' gradients).
      num_sms: thread blocks of the CUDA kernels of this dispatch and of its combine
        (default 128: nearly every SM of an H100/H200). Lower it to leave SMs to
        work that runs beside the exchange, or when several ranks share one GPU.
      packed: each local expert's rows at ``recv_x[e, :recv_count[e]]`` in (source rank,
        source token) order and zeros after (default: per source rank at ``s*M``); the
        combine of this handle then takes ``y`` in the packed layout too.

    Returns :class:`LowLatencyDispatchResult` (``recv_x``, ``recv_count [E/R]``, ``handle``).

    Example::

        r = jax_ep.low_latency_dispatch(x, idx, num_experts=64, max_tokens_per_rank=128,
                                        axis_name="ep")
        y = jnp.einsum("erh,ehf->erf", r.recv_x, w)      # every local expert at once
        out = jax_ep.low_latency_combine(y, idx, weights, r.handle)
    """
    cfg = _config("low_latency_dispatch", x, topk_idx, num_experts, max_tokens_per_rank,
                  axis_name, use_fp8, buffer, backend, zero_padding, num_sms, packed)
    recv_x, recv_count, harr = _ll_dispatch(cfg, x, topk_idx)
    invalid = v.num_invalid_ids(topk_idx, cfg.num_experts)
    return LowLatencyDispatchResult(_packed_if_asked(cfg, recv_x, harr), recv_count,
                                    LowLatencyHandle(harr, cfg, invalid))


def _packed_rows(handle_arrays, cfg: LowLatencyConfig):
    """For each packed row ``[e, j]``: its row in the per-source layout, -1 past the count."""
    counts = handle_arrays.recv_count_per_rank  # [L, R]
    M = cfg.max_tokens_per_rank
    start = jnp.cumsum(counts, axis=1) - counts  # packed row of each source's first row
    j = jnp.arange(cfg.num_ranks * M, dtype=jnp.int32)
    src = jnp.sum(j[None, :, None] >= start[:, None, :], axis=2).astype(jnp.int32) - 1
    src = jnp.maximum(src, 0)  # [L, R*M]: the last source starting at or before j
    first = jnp.take_along_axis(start, src, axis=1)
    live = j[None, :] < jnp.sum(counts, axis=1, keepdims=True)
    return jnp.where(live, src * M + j[None, :] - first, -1)


def _move_rows(a: jax.Array, rows: jax.Array) -> jax.Array:
    """``out[e, j] = a[e, rows[e, j]]``, zeros where ``rows`` is -1."""
    got = jnp.take_along_axis(a, jnp.maximum(rows, 0)[:, :, None], axis=1)
    return jnp.where((rows >= 0)[:, :, None], got, jnp.zeros((), a.dtype))


def _packed_if_asked(cfg: LowLatencyConfig, recv_x, handle_arrays):
    if not cfg.packed:
        return recv_x
    rows = _packed_rows(handle_arrays, cfg)
    return jax.tree.map(lambda a: _move_rows(a, rows), recv_x)


def _unpacked_if_asked(cfg: LowLatencyConfig, y, handle_arrays):
    """Combine's ``y`` back in the per-source layout (rows past the counts: zeros)."""
    if not cfg.packed:
        return y
    rows = _packed_rows(handle_arrays, cfg)  # packed -> per-source, inverted below
    L, n = rows.shape
    inverse = jnp.full((L, n), -1, jnp.int32).at[
        jnp.arange(L)[:, None], jnp.where(rows >= 0, rows, n)].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (L, n)), mode="drop")
    return _move_rows(y, inverse)


def _zero_padded(cfg: LowLatencyConfig) -> LowLatencyConfig:
    return dataclasses.replace(cfg, zero_padding=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_dispatch(cfg, x, topk_idx):
    return backends.get(cfg.backend).ll_dispatch(x, topk_idx, None, cfg)


def _ll_dispatch_fwd(cfg, x, topk_idx):
    # Differentiated: the expert weights' gradients read every row of recv_x, so the
    # padding must be zeros (the primal path above may leave it undefined).
    outs = backends.get(cfg.backend).ll_dispatch(x, topk_idx, None, _zero_padded(cfg))
    return outs, (topk_idx, outs[2])


def _ll_dispatch_bwd(cfg, residuals, cotangents):
    if cfg.use_fp8:
        raise TypeError("low_latency_dispatch with use_fp8=True is not differentiable; "
                        "dispatch in bf16 to train through it")
    topk_idx, handle = residuals
    d_recv_x = cotangents[0]
    # Each (token, expert) row was sent once: weight 1 on the slot that carried it.
    first = _first_slot_mask(topk_idx, handle)
    dx = backends.get(cfg.backend).ll_combine(d_recv_x, topk_idx, first, handle, cfg)
    return dx, None


_ll_dispatch.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


def _first_slot_mask(topk_idx, handle) -> jax.Array:
    """1.0 on the first slot naming each (token, expert), 0.0 on repeats and masked slots."""
    k = topk_idx.shape[1]
    valid = handle.send_pos >= 0
    same = (topk_idx[:, :, None] == topk_idx[:, None, :]) & valid[:, :, None]
    earlier = jnp.triu(jnp.ones((k, k), bool), k=1)[None]
    repeat = jnp.any(same & earlier, axis=1)
    return (valid & ~repeat).astype(jnp.float32)


def _check_combine_args(op, y, topk_idx, topk_weights, handle):
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"{op}: handle must come from low_latency_dispatch, got "
                        f"{type(handle).__name__}")
    cfg = handle.config
    v.axis_size(cfg.axis_name, op)
    expected = (cfg.num_local_experts, cfg.num_ranks * cfg.max_tokens_per_rank)
    v.check_array(op, "y", y, 3, v.FLOAT_DTYPES)
    if tuple(y.shape[:2]) != expected:
        raise ValueError(f"{op}: y must have shape {expected + ('H',)} (the dispatch's recv_x "
                         f"layout), got {tuple(y.shape)}")
    v.check_hidden(op, "y", y)
    v.check_topk(op, topk_idx, topk_weights, cfg.num_tokens)
    if topk_idx.shape[1] != cfg.num_topk:
        raise ValueError(f"{op}: topk_idx has {topk_idx.shape[1]} slots, the dispatch had "
                         f"{cfg.num_topk}")
    return cfg


def low_latency_combine(y: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
                        handle: LowLatencyHandle) -> jax.Array:
    """Returns ``out[t] = sum_k topk_weights[t,k] * y[row of (t, topk_idx[t,k])]``, fp32
    accumulation, as ``[T, H]`` in ``y``'s dtype. ``y`` is ``[E/R, R*M, H]`` in the
    layout of the dispatch's ``recv_x``; rows past the counts are never read (they may hold
    anything, NaN included). Its VJP's ``dy`` has zeros there.

    Example::

        out = jax_ep.low_latency_combine(expert_out, topk_idx, topk_weights, r.handle)
    """
    cfg = _check_combine_args("low_latency_combine", y, topk_idx, topk_weights, handle)
    y = _unpacked_if_asked(cfg, y, handle.arrays)
    return _ll_combine(cfg, y, topk_idx, v.weights_f32(topk_weights), handle.arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_combine(cfg, y, topk_idx, topk_weights, handle):
    return backends.get(cfg.backend).ll_combine(y, topk_idx, topk_weights, handle, cfg)


def _ll_combine_fwd(cfg, y, topk_idx, topk_weights, handle):
    return _ll_combine(cfg, y, topk_idx, topk_weights, handle), (y, topk_idx, topk_weights,
                                                                   handle)


def _ll_combine_bwd(cfg, residuals, d_out):
    y, topk_idx, topk_weights, handle = residuals
    be = backends.get(cfg.backend)
    d_out = d_out.astype(y.dtype)
    # dy[row of (t, e)] = d_out[t] * (sum of t's weights on e): a weighted dispatch. It
    # feeds the expert weights' gradients, which read every row: zero padding.
    dy, _, _ = be.ll_dispatch(d_out, topk_idx, topk_weights, _grad_config(cfg, d_out, True))
    # d_w[t, k] = <y[row of (t, e_k)], d_out[t]>: dot on the expert side, then each slot's
    # value home. Only the counted rows of `sent` are read: its padding may stay undefined.
    sent, _, _ = be.ll_dispatch(d_out, topk_idx, None, _grad_config(cfg, d_out, False))
    dots = jnp.sum(sent.astype(jnp.float32) * y.astype(jnp.float32), axis=-1, keepdims=True)
    k = topk_idx.shape[1]
    d_w = jnp.concatenate(
        [be.ll_combine(dots, topk_idx, jax.nn.one_hot(jnp.full(topk_idx.shape[:1], i), k,
                                                      dtype=jnp.float32), handle, cfg)
         for i in range(k)], axis=1)
    return dy.astype(y.dtype), None, d_w, None


_ll_combine.defvjp(_ll_combine_fwd, _ll_combine_bwd)


def _grad_config(cfg: LowLatencyConfig, d_out, zero_padding: bool) -> LowLatencyConfig:
    """The config of a dispatch of the combine's cotangent ``d_out [T, W]``."""
    return dataclasses.replace(cfg, use_fp8=False, hidden=int(d_out.shape[1]),
                               zero_padding=zero_padding)


# ----------------------------------------------------------------------------- split form
#
# *_send returns a pending state with the backend's "sent" pytree; *_recv completes it. On
# CUDA these are two custom calls tied by a one-int ticket (a data dependency, so XLA runs
# the recv after the send and may schedule independent work between them); on one Buffer
# every *_send must be followed by its *_recv before the next low-latency op (the kernels
# trap otherwise). XLA orders custom calls only along data dependencies, so chain
# consecutive low-latency ops by data (the next dispatch's tokens come from the last
# combine in a decode loop). The reference backend runs what it can in *_send (an
# all_to_all has nothing to overlap).
# The receive halves are custom VJPs: gradients flow from recv's outputs to send's inputs
# (which the pending state carries), as through the fused ops; no tangents enter a send.

def _no_grad(*trees):
    return jax.tree.map(jax.lax.stop_gradient, trees)


@jax.tree_util.register_pytree_node_class
class LowLatencyDispatchPending(_Handle):
    """What :func:`low_latency_dispatch_send` returns: pass it to
    :func:`low_latency_dispatch_recv` (once). A pytree (arrays plus the static config)."""

    def __repr__(self):
        return f"LowLatencyDispatchPending(backend={self.config.backend!r})"


@jax.tree_util.register_pytree_node_class
class LowLatencyCombinePending(_Handle):
    """What :func:`low_latency_combine_send` returns: pass it to
    :func:`low_latency_combine_recv` (once)."""

    def __repr__(self):
        return f"LowLatencyCombinePending(backend={self.config.backend!r})"


def low_latency_dispatch_send(x, topk_idx, *, num_experts: int, max_tokens_per_rank: int,
                              axis_name: str, use_fp8: bool = False, zero_padding: bool = False,
                              buffer=None, backend: str = "auto",
                              num_sms: Optional[int] = None,
                              packed: bool = False) -> LowLatencyDispatchPending:
    """First half of :func:`low_latency_dispatch`: issues the sends and returns at once.

    Put independent computation between this and :func:`low_latency_dispatch_recv`;
    the result equals the fused op's (same arguments, same padding rules).

    Example::

        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=64,
                                                   max_tokens_per_rank=128, axis_name="ep")
        h = attention(h)                              # overlaps with the transfer
        r = jax_ep.low_latency_dispatch_recv(pending)
    """
    cfg = _config("low_latency_dispatch_send", x, topk_idx, num_experts, max_tokens_per_rank,
                  axis_name, use_fp8, buffer, backend, zero_padding, num_sms, packed)
    sent = backends.get(cfg.backend).ll_dispatch_send(*_no_grad(x, topk_idx), cfg)
    return LowLatencyDispatchPending((x, topk_idx, sent), cfg)


def low_latency_dispatch_recv(pending: LowLatencyDispatchPending) -> LowLatencyDispatchResult:
    """Second half of :func:`low_latency_dispatch`: waits for the rows and returns them."""
    if not isinstance(pending, LowLatencyDispatchPending):
        raise TypeError("low_latency_dispatch_recv takes what low_latency_dispatch_send "
                        f"returned, got {type(pending).__name__}")
    cfg = pending.config
    recv_x, recv_count, harr = _ll_dispatch_recv(cfg, *pending.arrays)
    invalid = v.num_invalid_ids(pending.arrays[1], cfg.num_experts)
    return LowLatencyDispatchResult(_packed_if_asked(cfg, recv_x, harr), recv_count,
                                    LowLatencyHandle(harr, cfg, invalid))


def _dispatch_recv_call(cfg, x, sent):
    return backends.get(cfg.backend).ll_dispatch_recv(sent, cfg, x.dtype, hidden=x.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_dispatch_recv(cfg, x, topk_idx, sent):
    del topk_idx  # carried for the VJP
    return _dispatch_recv_call(cfg, x, sent)


def _ll_dispatch_recv_fwd(cfg, x, topk_idx, sent):
    outs = _dispatch_recv_call(_zero_padded(cfg), x, sent)
    return outs, (topk_idx, outs[2])


def _ll_dispatch_recv_bwd(cfg, residuals, cotangents):
    dx, _ = _ll_dispatch_bwd(cfg, residuals, cotangents)
    return dx, None, None


_ll_dispatch_recv.defvjp(_ll_dispatch_recv_fwd, _ll_dispatch_recv_bwd)


def low_latency_combine_send(y, topk_idx, topk_weights, handle) -> LowLatencyCombinePending:
    """First half of :func:`low_latency_combine`; see :func:`low_latency_dispatch_send`."""
    cfg = _check_combine_args("low_latency_combine_send", y, topk_idx, topk_weights, handle)
    y = _unpacked_if_asked(cfg, y, handle.arrays)
    topk_weights = v.weights_f32(topk_weights)
    sent = backends.get(cfg.backend).ll_combine_send(*_no_grad(y, handle.arrays), cfg)
    return LowLatencyCombinePending((y, topk_idx, topk_weights, handle.arrays, sent), cfg)


def low_latency_combine_recv(pending: LowLatencyCombinePending) -> jax.Array:
    """Second half of :func:`low_latency_combine`: returns ``[T, H]``."""
    if not isinstance(pending, LowLatencyCombinePending):
        raise TypeError("low_latency_combine_recv takes what low_latency_combine_send "
                        f"returned, got {type(pending).__name__}")
    return _ll_combine_recv(pending.config, *pending.arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ll_combine_recv(cfg, y, topk_idx, topk_weights, handle, sent):
    return backends.get(cfg.backend).ll_combine_recv(sent, topk_idx, topk_weights, handle, cfg,
                                                     y.dtype, y.shape[2])


def _ll_combine_recv_fwd(cfg, y, topk_idx, topk_weights, handle, sent):
    out = _ll_combine_recv(cfg, y, topk_idx, topk_weights, handle, sent)
    return out, (y, topk_idx, topk_weights, handle)


def _ll_combine_recv_bwd(cfg, residuals, d_out):
    dy, _, d_w, _ = _ll_combine_bwd(cfg, residuals, d_out)
    return dy, None, d_w, None, None


_ll_combine_recv.defvjp(_ll_combine_recv_fwd, _ll_combine_recv_bwd)
