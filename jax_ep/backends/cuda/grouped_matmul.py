"""The CUDA grouped matmul: CUTLASS's SM90 grouped GEMM (cuda/grouped_matmul/) as two
custom calls, ``jax_ep_grouped_matmul`` (rows times each group's matrix, or its
transpose) and ``jax_ep_grouped_matmul_weight_grad`` (each group's rows^T times rows).
Each call's second result is the kernel's workspace (its per-group tables), sized here by
the extension so that it lives as long as the kernels that read it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import _native
from jax_ep.backends import vma

FORWARD, TRANSPOSED_RHS, WEIGHT_GRAD = 0, 1, 2  # cuda/grouped_matmul/grouped_matmul.h


def available() -> bool:
    """The extension was built with the grouped matmul and a Hopper GPU is visible."""
    ext = _native.load()
    return bool(ext is not None and getattr(ext, "with_grouped_matmul", False)
                and _native.cuda_available())


def _workspace(kind: int, groups: int, rows: int, k: int, n: int) -> jax.ShapeDtypeStruct:
    ext = _native.load()
    size = ext.grouped_matmul_workspace_bytes(kind, groups, rows, k, n)
    return jax.ShapeDtypeStruct((max(int(size), 1),), jnp.uint8)


def _vma(*arrays):
    """The manual axes any of ``arrays`` varies over (empty outside shard_map)."""
    return sorted(set().union(*[set(vma.vma_of(a) or ()) for a in arrays]))


def _call(name, result, workspace, *args, **attrs):
    _native.load()
    axes = _vma(*args)
    for axis in axes:  # ffi_call wants its operands of one vma type
        args = tuple(vma.varying(a, axis) for a in args)
    out, _ = jax.ffi.ffi_call(name, (result, workspace))(*args, **attrs)
    for axis in axes:
        out = vma.varying(out, axis)
    return out


def matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
           transpose_rhs: bool = False) -> jax.Array:
    """``x [M, K] @ w[g] [K, N]`` per group (``transpose_rhs``: ``x [M, N] @ w[g]^T``)."""
    G, K, N = w.shape
    M = x.shape[0]
    kind = TRANSPOSED_RHS if transpose_rhs else FORWARD
    out = jax.ShapeDtypeStruct((M, K if transpose_rhs else N), jnp.bfloat16)
    return _call("jax_ep_grouped_matmul", out, _workspace(kind, G, M, K, N), x, w,
                 group_sizes, transpose_rhs=bool(transpose_rhs))


def weight_grad(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x[rows of g]^T @ dy[rows of g]`` per group: ``[G, K, N]``."""
    M, K = x.shape
    N = dy.shape[1]
    G = group_sizes.shape[0]
    out = jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16)
    return _call("jax_ep_grouped_matmul_weight_grad", out, _workspace(WEIGHT_GRAD, G, M, K, N),
                 x, dy, group_sizes)
