"""jax_ep.grouped_matmul on CPU: the reference path against the NumPy oracle (values and
gradients), the argument checks, and how the CUDA path lowers (three custom calls under
jax.grad), checked through the lowered StableHLO text."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import grouped_oracle as go


@pytest.mark.parametrize("case", ["random", "one_group", "all_empty", "aligned"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_oracle(case, dtype):
    rng = np.random.default_rng([len(case), 7])
    G, M, K, N = 5, 300 if case == "aligned" else 37, 24, 16
    sizes = go.sizes_for(rng, case, G, M)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((G, K, N)).astype(np.float32)
    xd, wd = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    got = jax.jit(jax_ep.grouped_matmul)(xd, wd, jnp.asarray(sizes))
    assert got.shape == (M, N) and got.dtype == dtype
    want = go.grouped_matmul(np.asarray(xd, np.float32), np.asarray(wd, np.float32), sizes)
    go.close(got, want, "out", rel=1e-5 if dtype == jnp.float32 else 1e-2)
    assert not np.asarray(got[int(sizes.sum()):]).any()  # rows past the groups are zeros


def test_reference_gradients_match_oracle():
    rng = np.random.default_rng(3)
    G, M, K, N = 4, 29, 16, 8
    sizes = go.sizes_for(rng, "random", G, M)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((G, K, N)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(jax_ep.grouped_matmul(x, w, jnp.asarray(sizes)) * dy),
                      argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    want_dx, want_dw = go.grads(x, w, sizes, dy)
    go.close(dx, want_dx, "dx", rel=1e-5)
    go.close(dw, want_dw, "dw", rel=1e-5)


def test_under_scan_and_shard_map():
    """Traced group sizes (no host read), inside lax.scan within shard_map."""
    mesh = jax.make_mesh((2,), ("ep",), devices=jax.devices("cpu")[:2])
    rng = np.random.default_rng(5)
    G, M, K, N = 3, 20, 8, 8
    x = rng.standard_normal((2 * M, K)).astype(np.float32)
    w = rng.standard_normal((2 * G, K, N)).astype(np.float32)
    sizes = np.concatenate([go.sizes_for(rng, "random", G, M) for _ in range(2)])

    def per_rank(x, w, s):
        def step(carry, i):
            return carry, jax_ep.grouped_matmul(x * (1.0 + i), w, s)
        return jax.lax.scan(step, 0, jnp.arange(2.0))[1]

    f = jax.shard_map(per_rank, mesh=mesh, in_specs=jax.P("ep"),
                      out_specs=jax.P(None, "ep"))
    shard = jax.sharding.NamedSharding(mesh, jax.P("ep"))
    got = np.asarray(jax.jit(f)(*[jax.device_put(a, shard) for a in (x, w, sizes)]))
    for r in range(2):
        for i in range(2):
            want = go.grouped_matmul(x[r * M:(r + 1) * M] * (1.0 + i), w[r * G:(r + 1) * G],
                                     sizes[r * G:(r + 1) * G])
            go.close(got[i, r * M:(r + 1) * M], want, f"rank {r} step {i}", rel=1e-5)


@pytest.mark.parametrize("args,err,match", [
    (((6, 8), (2, 4, 8), [3, 3]), ValueError, r"w.shape\[1\] = 4 != K = 8"),
    (((6, 8), (2, 8, 8), [3, 3, 0]), ValueError, r"group_sizes must be \[G\] = \[2\]"),
    (((6, 8), (2, 8, 8), [5, 3]), ValueError, "sum to 8 rows but x has 6"),
    (((6, 8), (2, 8, 8), [-1, 3]), ValueError, "must be >= 0"),
    (((6, 8), (2, 8, 8), [3.0, 3.0]), TypeError, "group_sizes must be integers"),
    (((6,), (2, 8, 8), [3, 3]), ValueError, "x must be 2-D"),
])
def test_bad_arguments_name_the_argument(args, err, match):
    xs, ws, sizes = args
    with pytest.raises(err, match=match):
        jax_ep.grouped_matmul(jnp.zeros(xs), jnp.zeros(ws), jnp.asarray(sizes))


def test_dtype_mismatch_and_backends():
    x, w, s = jnp.zeros((4, 8)), jnp.zeros((2, 8, 8), jnp.bfloat16), jnp.array([2, 2])
    with pytest.raises(TypeError, match="w has dtype bfloat16 but x has float32"):
        jax_ep.grouped_matmul(x, w, s)
    with pytest.raises(ValueError, match="backend must be one of"):
        jax_ep.grouped_matmul(x, w.astype(x.dtype), s, backend="triton")
    if not jax_ep.cuda_available():
        with pytest.raises(RuntimeError, match="backend='cuda' needs the extension built"):
            jax_ep.grouped_matmul(x, w.astype(x.dtype), s, backend="cuda")


@pytest.fixture
def cuda_lowering(monkeypatch):
    """Lowers the CUDA path on any machine: the kernel counts as available and the
    workspace size is a stand-in (lowering never runs it)."""
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    monkeypatch.setattr(cuda_gm, "available", lambda: True)
    monkeypatch.setattr(cuda_gm, "_workspace",
                        lambda kind, *a: jax.ShapeDtypeStruct((4096 + kind,), jnp.uint8))


def test_cuda_path_lowers_to_one_call_forward_and_two_backward(cuda_lowering):
    M, G, K, N = 64, 4, 32, 16
    x = jnp.zeros((M, K), jnp.bfloat16)
    w = jnp.zeros((G, K, N), jnp.bfloat16)
    s = jnp.array([10, 0, 30, 20], jnp.int32)
    fwd = jax.jit(jax_ep.grouped_matmul).lower(x, w, s).as_text()
    calls = re.findall(r"stablehlo\.custom_call @(jax_ep_grouped_\w+)\(.*", fwd)
    assert calls == ["jax_ep_grouped_matmul"], calls
    assert "transpose_rhs = false" in fwd

    def loss(x, w):
        return jnp.sum(jax_ep.grouped_matmul(x, w, s).astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    lines = [l for l in text.splitlines() if "stablehlo.custom_call @jax_ep_grouped" in l]
    names = sorted(re.search(r"@(jax_ep_grouped_\w+)\(", l).group(1) for l in lines)
    assert names == ["jax_ep_grouped_matmul", "jax_ep_grouped_matmul",
                     "jax_ep_grouped_matmul_weight_grad"], names
    assert sum("transpose_rhs = true" in l for l in lines) == 1
    # the workspaces are results of the calls, sized per kind (forward, transposed, wgrad)
    assert "4096xui8" in text and "4097xui8" in text and "4098xui8" in text


def test_auto_uses_the_reference_where_the_kernel_does_not_apply(cuda_lowering):
    x = jnp.zeros((8, 12), jnp.bfloat16)  # K = 12: not a multiple of 8
    w = jnp.zeros((2, 12, 8), jnp.bfloat16)
    text = jax.jit(jax_ep.grouped_matmul).lower(x, w, jnp.array([4, 4])).as_text()
    assert "jax_ep_grouped" not in text
    with pytest.raises(ValueError, match="K and N multiples of 8"):
        jax_ep.grouped_matmul(x, w, jnp.array([4, 4]), backend="cuda")


def test_auto_says_once_when_it_uses_ragged_dot_on_a_gpu(monkeypatch):
    import importlib

    from jax_ep import backends
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    gm = importlib.import_module("jax_ep.grouped_matmul")  # the module, not the function

    monkeypatch.setattr(backends, "_default_platform_is_gpu", lambda: True)
    x, w, s = jnp.zeros((4, 8)), jnp.zeros((2, 8, 8)), jnp.array([2, 2])
    for built, match in [(False, "built without it"), (True, "takes bfloat16")]:
        monkeypatch.setattr(cuda_gm, "available", lambda built=built: built)
        gm._say_reference_on_gpu.cache_clear()
        with pytest.warns(UserWarning, match=match):
            jax_ep.grouped_matmul(x, w, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per case, not per call
            jax_ep.grouped_matmul(x, w, s)
    gm._say_reference_on_gpu.cache_clear()
