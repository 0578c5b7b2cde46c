"""``jax_ep.grouped_matmul``: the expert matmul over rows grouped by expert (the expert
layout of :func:`jax_ep.dispatch`), dropless, with a custom VJP.

The CUDA path is one CUTLASS SM90 grouped GEMM per product (forward; backward: the rows'
gradient with each group's matrix transposed, and each group's weight gradient), with the
group sizes read on the device: no host synchronisation, so it runs under ``jit``,
``shard_map``, ``lax.scan`` and CUDA graphs. The reference path is ``jax.lax.ragged_dot``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import validation as v

OP = "grouped_matmul"
BACKENDS = ("auto", "cuda", "reference")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   backend: str = "auto") -> jax.Array:
    """Rows of ``x`` times their group's matrix: ``out[r] = x[r] @ w[g]`` for the rows
    ``r`` of group ``g`` — the contract of ``jax.lax.ragged_dot``.

    Args:
      x: ``[M, K]`` rows grouped by expert: group 0's ``group_sizes[0]`` rows first, then
        group 1's, and so on (the expert layout of :func:`jax_ep.dispatch`; rows past the
        last group, such as ``expert_alignment`` padding at the end, are allowed).
      w: ``[G, K, N]``, one matrix per group, same dtype as ``x``.
      group_sizes: ``[G]`` integer rows per group, summing to at most ``M`` (on the CUDA
        path sizes are clamped to the rows left, in group order).
      backend: ``"cuda"`` (the CUTLASS kernel: bfloat16, ``K`` and ``N`` multiples of 8,
        Hopper GPU), ``"reference"`` (``jax.lax.ragged_dot``) or ``"auto"`` (the kernel
        where it applies, else the reference).

    Returns ``[M, N]`` in ``x.dtype`` (the kernel accumulates in float32, the reference as
    ``jax.lax.ragged_dot`` does); rows past the last group are zeros. Differentiable in
    ``x`` and ``w``; the backward matmuls take operands of ``x.dtype`` too.

    Example::

        r = jax_ep.dispatch(x, idx, w_topk, num_experts=E, axis_name="ep", layout="expert")
        h = jax_ep.grouped_matmul(r.recv_x, w_up, r.group_sizes)  # w_up [E/R, H, F]
    """
    _check(x, w, group_sizes)
    group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    resolved = _resolve(backend, x, w)
    if resolved == "reference":
        return _reference(x, w, group_sizes)
    return _cuda(x, w, group_sizes)


def masked_grouped_matmul(x: jax.Array, w: jax.Array, counts: jax.Array, *,
                          backend: str = "auto") -> jax.Array:
    """The masked layout: ``out[g, j] = x[g, j] @ w[g]`` for ``j < counts[g]``, zeros after.

    The layout of ``jax_ep.low_latency_dispatch(..., packed=True)`` (each expert's rows
    first in its block of ``S`` rows, ``recv_count`` of them) and of DeepGEMM's masked
    grouped GEMM. The live rows are gathered into the contiguous layout, multiplied by
    :func:`grouped_matmul` (the CUTLASS kernel on Hopper GPUs: it reads the sizes on the
    device and computes only live rows; ``jax.lax.ragged_dot`` elsewhere) and moved back;
    rows past the counts are never read, so they may hold anything.

    Args:
      x: ``[G, S, K]``; w: ``[G, K, N]`` (same dtype); counts: ``[G]`` integers in
        ``[0, S]`` (traced counts past ``S`` are clamped to it).

    Returns ``[G, S, N]`` in ``x.dtype``. Differentiable in ``x`` and ``w``.

    Example::

        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name="ep", packed=True)
        h = jax_ep.masked_grouped_matmul(r.recv_x, w_up, r.recv_count)  # [E/R, R*M, F]
    """
    op = "masked_grouped_matmul"
    v.check_array(op, "x", x, 3, v.FLOAT_DTYPES)
    v.check_array(op, "w", w, 3, v.FLOAT_DTYPES)
    G, S, K = x.shape
    if w.shape[0] != G:
        raise ValueError(f"{op}: x holds {G} groups ([G, S, K] = {tuple(x.shape)}) but w has "
                         f"{w.shape[0]} matrices ([G, K, N] = {tuple(w.shape)})")
    if hasattr(counts, "shape") and not isinstance(counts, jax.core.Tracer):
        c = np.asarray(counts)
        if c.shape == (G,) and np.issubdtype(c.dtype, np.integer) and (
                (c < 0).any() or (c > S).any()):
            raise ValueError(f"{op}: counts must lie in [0, S={S}], got {c.tolist()}")
    _check(x.reshape(G * S, K), w, counts)
    if G * S == 0:
        return jnp.zeros((G, S, w.shape[2]), x.dtype)
    counts = jnp.minimum(jnp.asarray(counts).astype(jnp.int32), S)
    ends = jnp.cumsum(counts)
    starts = ends - counts
    flat = x.reshape(G * S, K)
    # contiguous row c: group searchsorted(ends, c), its (c - start)-th live row (unrolled:
    # the default method is a while loop, a device-to-host round trip per step on GPUs)
    c = jnp.arange(G * S, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, c, side="right", method="scan_unrolled"),
                        G - 1).astype(jnp.int32)
    live = c < ends[-1]
    rows = jnp.where(live, group * S + c - starts[group], 0)
    contiguous = jnp.where(live[:, None], flat[rows], jnp.zeros((), x.dtype))
    y = grouped_matmul(contiguous, w, counts, backend=backend)  # [G*S, N], zeros past ends
    j = jnp.arange(S, dtype=jnp.int32)
    mine = j[None, :] < counts[:, None]  # [G, S]
    back = jnp.where(mine, starts[:, None] + j[None, :], 0)
    return jnp.where(mine[..., None], y[back], jnp.zeros((), y.dtype))


def _check(x, w, group_sizes) -> None:
    v.check_array(OP, "x", x, 2, v.FLOAT_DTYPES)
    v.check_array(OP, "w", w, 3, v.FLOAT_DTYPES)
    if w.dtype != x.dtype:
        raise TypeError(f"{OP}: w has dtype {w.dtype} but x has {x.dtype}; cast one of them")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{OP}: x is [M, K] = {tuple(x.shape)} and w must be [G, K, N], but "
                         f"w.shape[1] = {w.shape[1]} != K = {x.shape[1]}")
    if not hasattr(group_sizes, "shape") or not hasattr(group_sizes, "dtype"):
        raise TypeError(f"{OP}: group_sizes must be an integer array, got "
                        f"{type(group_sizes).__name__}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"{OP}: group_sizes must be integers, got {group_sizes.dtype}")
    if tuple(group_sizes.shape) != (w.shape[0],):
        raise ValueError(f"{OP}: group_sizes must be [G] = [{w.shape[0]}] (one size per matrix "
                         f"of w), got shape {tuple(group_sizes.shape)}")
    if not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes).astype(np.int64)
        if (sizes < 0).any():
            raise ValueError(f"{OP}: group_sizes must be >= 0, got {sizes.tolist()}")
        if sizes.sum() > x.shape[0]:
            raise ValueError(f"{OP}: group_sizes sum to {int(sizes.sum())} rows but x has "
                             f"{x.shape[0]}; a group cannot hold rows x does not have")


def kernel_applies(dtype, k: int, n: int) -> bool:
    """Whether the CUDA kernel can run operands of ``dtype`` with ``w[g]`` of ``[k, n]``
    (bfloat16, k and n multiples of 8)."""
    return jnp.dtype(dtype) == jnp.bfloat16 and k % 8 == 0 and n % 8 == 0


def _resolve(backend: str, x, w) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    if backend == "cuda":
        if not cuda_gm.available():
            raise RuntimeError(f"{OP}: backend='cuda' needs the extension built with CUTLASS "
                               "(pip install nvidia-cutlass before building) and a Hopper GPU; "
                               "use backend='reference' or 'auto'")
        if not kernel_applies(x.dtype, *w.shape[1:]):
            raise ValueError(f"{OP}: the CUDA kernel takes bfloat16 x and w with K and N "
                             f"multiples of 8; got {x.dtype} x {tuple(x.shape)}, {w.dtype} w "
                             f"{tuple(w.shape)}; use backend='reference' or pad/cast")
        return "cuda"
    if cuda_gm.available() and kernel_applies(x.dtype, *w.shape[1:]):
        return "cuda"
    _say_reference_on_gpu(cuda_gm.available(), x.dtype, tuple(w.shape[1:]))
    return "reference"


@functools.lru_cache(maxsize=None)
def _say_reference_on_gpu(built: bool, dtype, kn) -> None:
    """backend="auto" chose ragged_dot: say so once per case where a GPU was there."""
    from jax_ep.backends import _default_platform_is_gpu

    if not _default_platform_is_gpu():
        return
    why = (f"the kernel takes bfloat16 with K and N multiples of 8, got {jnp.dtype(dtype).name} "
           f"with [K, N] = {list(kn)}" if built else
           "the extension was built without it (pip install nvidia-cutlass, then rebuild)")
    warnings.warn(f"jax_ep.{OP}: using jax.lax.ragged_dot on GPU because {why}", stacklevel=4)


def _reference(x, w, group_sizes):
    # x's dtype out, so that the backward matmuls stay in it (bf16 x bf16) as well
    return jax.lax.ragged_dot(x, w, group_sizes)


@jax.custom_vjp
def _cuda(x, w, group_sizes):
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    return cuda_gm.matmul(x, w, group_sizes)


def _cuda_fwd(x, w, group_sizes):
    return _cuda(x, w, group_sizes), (x, w, group_sizes)


def _cuda_bwd(residuals, dy):
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    x, w, group_sizes = residuals
    dy = dy.astype(jnp.bfloat16)
    dx = cuda_gm.matmul(dy, w, group_sizes, transpose_rhs=True)
    dw = cuda_gm.weight_grad(x, dy, group_sizes)
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_cuda.defvjp(_cuda_fwd, _cuda_bwd)
