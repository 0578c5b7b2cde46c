"""Every validated argument fails with an error that names it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from tests import harness

R, E, T, K, H = 2, 4, 3, 2, 16


def _trace(fn, *arrays):
    """Traces ``fn`` per rank under shard_map (errors are raised at trace time)."""
    m = harness.mesh(R)
    sh = NamedSharding(m, P(harness.AXIS))
    args = [jax.device_put(jnp.asarray(np.concatenate([a] * R)), sh) for a in arrays]
    f = jax.shard_map(fn, mesh=m, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS))
    return jax.jit(f)(*args)


X = np.ones((T, H), np.float32)
IDX = np.zeros((T, K), np.int32)
W = np.ones((T, K), np.float32)


def _dispatch(**kw):
    args = dict(num_experts=E, axis_name=harness.AXIS)
    args.update(kw)
    return lambda x, idx, w: jax_ep.dispatch(x, idx, w, **args).recv_x


@pytest.mark.parametrize("kw,arrays,match", [
    (dict(), (X[0], IDX, W), "x must be 2-D"),
    (dict(), (X.astype(np.int32), IDX, W), "x must have dtype"),
    (dict(), (X, IDX.astype(np.float32), W), "topk_idx must have dtype int32"),
    (dict(), (X, IDX[:2], W[:2]), "topk_idx has 2 rows but x has 3 tokens"),
    (dict(), (X, IDX, W.astype(np.int32)), "topk_weights must have dtype"),
    (dict(), (X, IDX, W[:, :1]), "topk_weights shape"),
    (dict(num_experts=5), (X, IDX, W), "num_experts=5 is not divisible"),
    (dict(num_experts=0), (X, IDX, W), "num_experts must be a positive int"),
    (dict(layout="ranks"), (X, IDX, W), "layout must be one of"),
    (dict(max_recv_tokens=-1), (X, IDX, W), "max_recv_tokens must be an int >= 0"),
    (dict(layout="expert", expert_alignment=0), (X, IDX, W), "expert_alignment must be"),
    (dict(expert_alignment=4), (X, IDX, W), "expert_alignment applies to layout='expert'"),
    (dict(), (X[:, :6], IDX, W), r"hidden=6\) must be a multiple of 4"),
    (dict(backend="tpu"), (X, IDX, W), "backend must be one of"),
    (dict(backend="cuda"), (X, IDX, W), "backend='cuda' needs"),
    (dict(axis_name="tp"), (X, IDX, W), "inside jax.shard_map over a mesh with axis 'tp'"),
])
def test_dispatch_rejects(kw, arrays, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _trace(lambda x, idx, w: _dispatch(**kw)(x, idx, w)[None], *arrays)


def test_dispatch_outside_shard_map():
    with pytest.raises(ValueError, match="must be called inside jax.shard_map"):
        jax_ep.dispatch(jnp.asarray(X), jnp.asarray(IDX), num_experts=E, axis_name="ep")


def test_fp8_pair_validation():
    q, s = jax_ep.fp8.per_token_cast(jnp.ones((T, 128), jnp.float32))
    with pytest.raises(ValueError, match="scales of shape"):
        _trace(lambda q, s, idx: jax_ep.dispatch((q, s[:, :0]), idx, num_experts=E,
                                                  axis_name=harness.AXIS).recv_x[0][None],
               np.asarray(q), np.asarray(s), IDX)


def test_expert_ids_out_of_range_are_caught_by_check_inputs():
    from jax.experimental import checkify
    bad = IDX.copy()
    bad[0, 0] = E  # one past the last expert
    m = harness.mesh(R)
    sh = NamedSharding(m, P(harness.AXIS))

    def fn(x, idx):
        return jax_ep.dispatch(x, idx, num_experts=E, axis_name=harness.AXIS,
                               check_inputs=True).num_recv_tokens[None]

    f = jax.shard_map(fn, mesh=m, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS))
    args = [jax.device_put(jnp.asarray(np.concatenate([a] * R)), sh) for a in (X, bad)]
    err, _ = jax.jit(checkify.checkify(f))(*args)
    with pytest.raises(checkify.JaxRuntimeError, match=r"expert ids outside \[-1, 4\)"):
        err.throw()
    good = [jax.device_put(jnp.asarray(np.concatenate([a] * R)), sh) for a in (X, IDX)]
    err, _ = jax.jit(checkify.checkify(f))(*good)
    err.throw()  # no error for valid ids


def test_combine_rejects_wrong_rows_and_weights():
    def fn(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS)
        return jax_ep.combine(r.recv_x[:-1], r.handle)

    with pytest.raises(ValueError, match="y has 5 rows but the dispatch produced 6"):
        _trace(fn, X, IDX, W)

    def fn2(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS)
        return jax_ep.combine(r.recv_x, r.handle, r.recv_topk_weights)

    with pytest.raises(ValueError, match="weights must be 1-D"):
        _trace(fn2, X, IDX, W)

    def fn3(x, idx, w):
        return jax_ep.combine(x, "not a handle")

    with pytest.raises(TypeError, match="handle must be DispatchResult.handle"):
        _trace(fn3, X, IDX, W)


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens_per_rank=2), "raise max_tokens_per_rank to at least 3"),
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank must be an int >= 1"),
    (dict(use_fp8=True), "use_fp8=True needs hidden % 128 == 0"),
    (dict(num_experts=3), "num_experts=3 is not divisible"),
])
def test_low_latency_rejects(kw, match):
    args = dict(num_experts=E, max_tokens_per_rank=8, axis_name=harness.AXIS)
    args.update(kw)

    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, **args).recv_count

    with pytest.raises((ValueError, TypeError), match=match):
        _trace(fn, X, IDX)


def test_low_latency_combine_rejects_wrong_layout():
    def fn(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=8,
                                        axis_name=harness.AXIS)
        return jax_ep.low_latency_combine(r.recv_x[:, :4], idx, w, r.handle)

    with pytest.raises(ValueError, match=r"y must have shape \(2, 16, 'H'\)"):
        _trace(fn, X, IDX, W)


def test_buffer_validation():
    m = harness.mesh(R)
    with pytest.raises(ValueError, match="axis_name 'tp' is not an axis"):
        jax_ep.Buffer(m, "tp")
    with pytest.raises(ValueError, match="num_sms must be a positive int"):
        jax_ep.Buffer(m, harness.AXIS, num_sms=0)
    buf = jax_ep.Buffer(m, harness.AXIS)
    assert buf.backend == "reference" and buf.num_ranks == R
    buf.close()


def test_fp8_helpers_validate():
    with pytest.raises(ValueError, match="must be a multiple of 128"):
        jax_ep.fp8.per_token_cast(jnp.ones((2, 100)))
    q, s = jax_ep.fp8.per_token_cast(jnp.ones((2, 128)))
    with pytest.raises(ValueError, match="scales must have shape"):
        jax_ep.fp8.per_token_cast_back(q, s[:1])


def test_fallback_limits_mirror_the_extension():
    """The pure-Python install's limits are the kernels' (where the extension is built)."""
    from jax_ep import _native
    from jax_ep.backends.cuda import _ffi

    ext = _native.load()
    if ext is None or getattr(ext, "limits", None) is None:
        pytest.skip("the jax_ep extension is not built (pure-Python install)")
    assert dict(ext.limits) == _ffi.FALLBACK_LIMITS
