"""SwiGLU expert FFNs: dense, over ragged groups of rows, and batched per expert."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

__all__ = ["batched_swiglu", "ragged_swiglu", "swiglu"]


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


def ragged_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                  group_sizes: jax.Array) -> jax.Array:
    """SwiGLU of each row with its group's expert, one :func:`jax_ep.grouped_matmul` per
    matmul (the CUTLASS kernel on Hopper GPUs, ``jax.lax.ragged_dot`` elsewhere).

    ``x [M, H]`` holds ``L`` consecutive groups of ``group_sizes [L]`` rows (rows past
    their sum give zeros), ``w_gate, w_up [L, H, F]``, ``w_down [L, F, H]``: the expert
    layout ``jax_ep.dispatch(layout="expert")`` returns. Matmul outputs in ``x``'s dtype,
    ``silu * up`` in f32 (as :func:`swiglu`). Where the kernel does not apply (not
    bfloat16, or H, F not multiples of 8), XLA may lower ``ragged_dot`` on GPUs to a dense
    matmul over ``[M, L * H]``; :func:`batched_swiglu` over fixed expert slots avoids that.

    Example::

        x = jnp.ones((6, 8))                      # 2 experts: 4 rows, then 2
        y = ragged_swiglu(x, jnp.ones((2, 8, 16)), jnp.ones((2, 8, 16)),
                          jnp.ones((2, 16, 8)), jnp.array([4, 2]))   # [6, 8]
    """
    gate = _ragged_dot(x, w_gate, group_sizes)
    up = _ragged_dot(x, w_up, group_sizes)
    h = _glu(gate, up, x.dtype)
    return _ragged_dot(h, w_down, group_sizes).astype(x.dtype)


def _ragged_dot(x, w, group_sizes):
    """:func:`jax_ep.grouped_matmul` (the CUTLASS grouped GEMM on Hopper GPUs,
    ``jax.lax.ragged_dot`` elsewhere); ragged_dot's vmap NotImplementedError gets the way
    around it."""
    from jax_ep.grouped_matmul import grouped_matmul

    try:
        return grouped_matmul(x, w, group_sizes)
    except NotImplementedError as e:
        if "vmap" not in str(e):
            raise
        raise NotImplementedError(
            f"{e}: jax.lax.ragged_dot cannot be batched here (jax.vmap / nnx.vmap over "
            "stacked MoE layers or their inputs). Make the layers with expert_capacity=C "
            "(dense batched matmuls over [E/R, C, H], which vmap), or loop over the layers "
            "with nnx.scan instead of vmapping them") from e


def batched_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """SwiGLU per expert on ``x [L, M, H]``: expert ``l`` runs on the rows ``x[l]``.

    The layout of ``jax_ep.low_latency_dispatch`` and of fixed expert slots
    (:func:`jax_ep.moe.to_expert_slots`); ``w_gate, w_up [L, H, F]``, ``w_down [L, F, H]``.
    Matmul outputs in ``x``'s dtype, ``silu * up`` in f32 (as :func:`swiglu`).

    Example::

        y = batched_swiglu(jnp.ones((2, 4, 8)), jnp.ones((2, 8, 16)),
                           jnp.ones((2, 8, 16)), jnp.ones((2, 16, 8)))   # [2, 4, 8]
    """
    gate = jnp.einsum("lmh,lhf->lmf", x, w_gate)
    up = jnp.einsum("lmh,lhf->lmf", x, w_up)
    h = _glu(gate, up, x.dtype)
    return jnp.einsum("lmf,lfh->lmh", h, w_down).astype(x.dtype)


def _on_gpus(mesh) -> bool:
    return any(d.platform == "gpu" for d in mesh.devices.flat)


_RAGGED_DENSE_WARN_BYTES = 1 << 30


def _check_ragged_dot_cost(mesh, num_local: int, rows: int, hidden: int, ffn: int,
                           dtype) -> None:
    """Warns when XLA's dense lowering of ``ragged_dot`` on GPUs would multiply a large
    ``[rows, num_local * hidden]`` operand (the small demo model is fine); not when the
    grouped-matmul kernel runs the experts instead."""
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm
    from jax_ep.grouped_matmul import kernel_applies

    if not _on_gpus(mesh):
        return
    if cuda_gm.available() and kernel_applies(dtype, hidden, ffn):
        return
    dense_bytes = rows * num_local * hidden * jnp.dtype(dtype).itemsize
    if dense_bytes >= _RAGGED_DENSE_WARN_BYTES:
        _warn_ragged_dot_on_gpus(num_local, round(dense_bytes / 2**30, 1))


@functools.lru_cache(maxsize=None)
def _warn_ragged_dot_on_gpus(num_local: int, dense_gib: float) -> None:
    """Once per shape: the ragged path's cost on GPUs is easy to miss."""
    warnings.warn(
        f"MoE: expert_capacity=None runs the {num_local} local experts with "
        "jax.lax.ragged_dot here (the grouped-matmul kernel needs bfloat16, H and F "
        "multiples of 8, and the extension built with CUTLASS); XLA lowers it on GPUs to a "
        f"dense matmul (its operand here: ~{dense_gib} GiB) unless its cuDNN grouped-matmul "
        "path is available (cuDNN >= 9.22): 65 ms against 2.2 ms for the capacity layout "
        "at 64 groups on one H200 (bench/results/grouped_matmul-1xNVIDIA-H200.json), and "
        "out of memory at DeepSeek-like shapes. Use bfloat16, or pass "
        "expert_capacity=ceil(1.25 * R * T * K / E) (rows per local expert; R ranks, T "
        "tokens per rank) for dense batched matmuls.",
        RuntimeWarning, stacklevel=5)
