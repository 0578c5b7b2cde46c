"""The native extension loads and its FFI targets register (runs on CPU CI too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep import _native


def test_native_import_never_raises():
    _native.load()
    assert isinstance(_native.cuda_available(), bool)
    assert isinstance(_native.why_unavailable(), str)


def test_cpu_ffi_target_runs_through_ffi_call():
    if _native.load() is None:
        pytest.skip("the jax_ep extension is not built (pure-Python install)")
    _native.load_testing()  # registers the probe's CPU target
    cpu = jax.devices("cpu")[0]
    call = jax.ffi.ffi_call("jax_ep_cpu_add_one", jax.ShapeDtypeStruct((2, 3), jnp.float32))
    with jax.default_device(cpu):  # the probe is a CPU target, also on GPU machines
        x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
        out = jax.jit(call)(x)
    np.testing.assert_array_equal(np.asarray(out), np.arange(6, dtype=np.float32).reshape(2, 3) + 1)


def test_size_hint_is_small_and_monotonic():
    from jax_ep.backends import cuda
    small = cuda.nvl_bytes_hint(128, 7168, 4)
    big = cuda.nvl_bytes_hint(4096, 7168, 4)
    assert 0 < small <= big < (256 << 20)
