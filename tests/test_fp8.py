"""FP8 per-token cast: round trip accuracy and the exact recipe the kernels follow."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_error_is_within_e4m3_precision(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((33, 512)) * 3, dtype)
    q, s = jax_ep.fp8.per_token_cast(x)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (33, 4) and s.dtype == jnp.float32
    back = np.asarray(jax_ep.fp8.per_token_cast_back(q, s, jnp.float32))
    ref = np.asarray(x.astype(jnp.float32))
    blocks = np.abs(ref).reshape(33, 4, 128).max(-1, keepdims=True)
    err = np.abs(back - ref).reshape(33, 4, 128)
    assert np.all(err <= blocks * 2.0 ** -3 + 1e-6)  # e4m3 has 3 mantissa bits
    assert np.linalg.norm(back - ref) / np.linalg.norm(ref) < 0.05


def test_scale_recipe_and_zero_rows():
    x = np.zeros((2, 256), np.float32)
    x[1, :128] = np.linspace(-2, 2, 128)
    q, s = jax_ep.fp8.per_token_cast(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(s), [[1e-4 / 448, 1e-4 / 448], [2 / 448, 1e-4 / 448]],
                               rtol=1e-6)
    assert float(jnp.max(jnp.abs(q[1].astype(jnp.float32)))) == 448.0
    assert np.all(np.asarray(q[0].astype(jnp.float32)) == 0)
