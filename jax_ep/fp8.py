"""FP8 (e4m3) payload helpers: one f32 scale per token per 128 channels.

The same recipe as DeepEP / DeepSeek-V3: ``scale = max(amax, 1e-4) / 448`` and
``q = x * (448 / max(amax, 1e-4))`` rounded to e4m3. The CUDA kernels that cast
inside the kernel compute exactly this, so both backends agree bitwise.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

BLOCK = 128
E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-4


def _check_hidden(x: jax.Array, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [tokens, hidden], got shape {x.shape}")
    if x.shape[1] % BLOCK:
        raise ValueError(
            f"{name}.shape[1] (hidden={x.shape[1]}) must be a multiple of {BLOCK} for FP8 "
            f"per-{BLOCK}-channel scales; pad the hidden dimension")


def cast_shapes(x: jax.Array) -> Tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of :func:`per_token_cast`'s result for ``x [T, H]``, without
    computing it.

    Example::

        q_spec, s_spec = jax_ep.fp8.cast_shapes(x)   # ([T, H] e4m3, [T, H/128] f32)
    """
    _check_hidden(x, "x")
    t, h = x.shape
    return (jax.ShapeDtypeStruct((t, h), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((t, h // BLOCK), jnp.float32))


def per_token_cast(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Casts ``x [T, H]`` to ``(e4m3 [T, H], f32 scales [T, H/128])``.

    Example::

        q, s = jax_ep.fp8.per_token_cast(x)          # x: bf16 [T, 7168]
        x_back = jax_ep.fp8.per_token_cast_back(q, s)
    """
    _check_hidden(x, "x")
    t, h = x.shape
    blocks = x.astype(jnp.float32).reshape(t, h // BLOCK, BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), _AMAX_FLOOR)
    q = (blocks * (E4M3_MAX / amax)[..., None]).astype(jnp.float8_e4m3fn)
    return q.reshape(t, h), amax / E4M3_MAX


def per_token_cast_back(q: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Inverse of :func:`per_token_cast`: ``q * scale`` per 128-channel block, in ``dtype``."""
    _check_hidden(q, "q")
    t, h = q.shape
    if scales.shape != (t, h // BLOCK):
        raise ValueError(f"scales must have shape {(t, h // BLOCK)} for q of shape {q.shape}, "
                         f"got {scales.shape}")
    blocks = q.astype(jnp.float32).reshape(t, h // BLOCK, BLOCK) * scales[..., None]
    return blocks.reshape(t, h).astype(dtype)


def is_fp8_pair(x) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 2
            and getattr(x[0], "dtype", None) == jnp.float8_e4m3fn)
