"""What a new user hits first (issue 20): meshes from jax.make_mesh (Explicit and Auto axes,
with and without jax.set_mesh), checks inside jit, and input handling."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import _native

R, T, H, E, K = 4, 8, 32, 16, 2
AXIS = "ep"
KINDS = [(AxisType.Explicit, False), (AxisType.Explicit, True), (AxisType.Auto, False),
         (AxisType.Auto, True)]
IDS = ["explicit", "explicit-set_mesh", "auto", "auto-set_mesh"]


def _mesh(kind):
    return jax.make_mesh((R,), (AXIS,), axis_types=(kind,), devices=jax.devices("cpu")[:R])


def _inputs(mesh, *, bad_id=False):
    x = jax.random.normal(jax.random.PRNGKey(0), (R * T, H), jnp.float32)
    scores = jax.random.uniform(jax.random.PRNGKey(1), (R * T, E))
    w, idx = jax.lax.top_k(scores, K)
    idx = idx.astype(jnp.int32)
    if bad_id:
        idx = idx.at[3, 0].set(E + 5)  # a 32-way router feeding 16 experts
    w = w / w.sum(-1, keepdims=True)
    sh = NamedSharding(mesh, P(AXIS))
    return tuple(jax.device_put(a, sh) for a in (x, idx, w))


def _ctx(mesh, set_mesh):
    return jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()


def _expert(x, idx, w):
    r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS, layout="expert")
    return jax_ep.combine(r.recv_x * 2, r.handle, r.recv_topk_weights)


def _rank(x, idx, w):
    r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS)
    return jax_ep.combine(r.recv_x * 2, r.handle)


def _ll(x, idx, w):
    r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=T,
                                    axis_name=AXIS)
    return jax_ep.low_latency_combine(r.recv_x * 2, idx, w, r.handle)


def _ll_split(x, idx, w):
    p = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, max_tokens_per_rank=T,
                                         axis_name=AXIS)
    r = jax_ep.low_latency_dispatch_recv(p)
    c = jax_ep.low_latency_combine_send(r.recv_x * 2, idx, w, r.handle)
    return jax_ep.low_latency_combine_recv(c)


def _sm(mesh, f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


# ----------------------------------------------------------------------------- item 1: meshes

@pytest.mark.parametrize("kind,set_mesh", KINDS, ids=IDS)
def test_ops_on_every_mesh_kind_forward_and_grad(kind, set_mesh):
    mesh = _mesh(kind)
    x, idx, w = _inputs(mesh)
    with _ctx(mesh, set_mesh):
        for f in (_expert, _rank, _ll, _ll_split):
            run = _sm(mesh, f)
            out = run(x, idx, w)
            want = 2 * np.asarray(x) if f is not _rank else None
            if want is not None:  # weights sum to 1: the experts' factor 2 comes back
                np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
            gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(run(x, idx, w) ** 2),
                                      argnums=(0, 1)))(x, w)
            assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gw)).all()
        lay = _sm(mesh, lambda i: jax_ep.get_dispatch_layout(i, E, axis_name=AXIS)
                  .num_tokens_per_rank[None])(idx)
        assert lay.shape == (R, R)


# ----------------------------------------------------------------------------- item 2: checks

def _small(mesh, **kw):
    def f(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS, max_recv_tokens=4, **kw)
        jax_ep.check(r)
        return r.recv_x
    return jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))


@pytest.mark.parametrize("kind,set_mesh", KINDS, ids=IDS)
def test_check_inside_jit_raises_on_every_mesh_kind(kind, set_mesh):
    mesh = _mesh(kind)
    x, idx, w = _inputs(mesh)
    with _ctx(mesh, set_mesh):
        with pytest.raises(Exception, match=r"set max_recv_tokens >= \d+"):
            jax.block_until_ready(jax.jit(_small(mesh))(x, idx, w))
        # and check_inputs=True catches an id >= E the same way
        f = jax.shard_map(
            lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name=AXIS,
                                            check_inputs=True).recv_x,
            mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
        xb, ib, wb = _inputs(mesh, bad_id=True)
        with pytest.raises(Exception, match=r"expert id\(s\) outside \[-1, 16\)"):
            jax.block_until_ready(jax.jit(f)(xb, ib, wb))
        jax.block_until_ready(jax.jit(f)(x, idx, w))  # valid ids: no error
        jax.effects_barrier()


def test_check_under_checkify_keeps_err_throw():
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh)
    err, _ = jax.jit(checkify.checkify(_small(mesh)))(x, idx, w)
    with pytest.raises(checkify.JaxRuntimeError, match="set max_recv_tokens >="):
        err.throw()


def test_check_mode_checkify_without_wrapper_names_the_fix():
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh)

    def f(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS)
        jax_ep.check(r, mode="checkify")
        return r.recv_x

    run = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    with pytest.raises(ValueError, match=r"wrap the step in jax.experimental.checkify"):
        run(x, idx, w)
    with pytest.raises(ValueError, match="mode must be one of"):
        jax_ep.check(num_recv_tokens=np.zeros(2), num_overflow=np.zeros(2), mode="x")


def test_invalid_expert_ids_are_counted_and_reported():
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh, bad_id=True)

    def f(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=AXIS)
        ll = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=T,
                                         axis_name=AXIS)
        return (r.num_recv_tokens[None], r.num_overflow[None], r.num_invalid_ids[None],
                ll.num_invalid_ids[None])

    n, over, bad, bad_ll = _sm(mesh, f)(x, idx, w)
    assert list(np.asarray(bad)) == [1, 0, 0, 0] and list(np.asarray(bad_ll)) == [1, 0, 0, 0]
    with pytest.raises(jax_ep.ExpertIdError, match=r"1 expert id\(s\) outside"):
        jax_ep.check(num_recv_tokens=n, num_overflow=over, num_invalid_ids=bad)
    jax_ep.check(num_recv_tokens=n, num_overflow=over)  # capacity alone is fine
    with pytest.raises(jax_ep.ExpertIdError):
        jax_ep.check(num_invalid_ids=bad_ll)


# ----------------------------------------------------------------------------- item 5: inputs

def test_integer_like_num_experts_and_low_precision_weights():
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh)
    want = np.asarray(_sm(mesh, _expert)(x, idx, w))

    def f(x, idx, w):
        r = jax_ep.dispatch(x, idx, w.astype(jnp.bfloat16), num_experts=np.int64(E),
                            axis_name=AXIS, layout="expert", max_recv_tokens=np.int32(R * T * K))
        return jax_ep.combine(r.recv_x * 2, r.handle, r.recv_topk_weights)

    got = np.asarray(_sm(mesh, f)(x, idx, w.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_array_equal(got, np.asarray(_sm(mesh, f)(x, idx, w)))
    assert got.shape == want.shape

    def g(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=np.int64(E),
                                        max_tokens_per_rank=np.int64(T), axis_name=AXIS)
        return jax_ep.low_latency_combine(r.recv_x, idx, w.astype(jnp.float16), r.handle)

    assert _sm(mesh, g)(x, idx, w).shape == x.shape
    # gradients flow back to bf16 weights in their dtype
    gw = jax.grad(lambda w: jnp.sum(_sm(mesh, f)(x, idx, w)))(w.astype(jnp.bfloat16))
    assert gw.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        _sm(mesh, lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=16.0,
                                                  axis_name=AXIS).recv_x)(x, idx, w)


def test_buffer_for_another_axis_or_mesh_is_refused():
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh)
    two = jax.make_mesh((1, R), ("dp", AXIS), devices=jax.devices("cpu")[:R])
    other_axis = jax_ep.Buffer(jax.make_mesh((R,), ("tp",), devices=jax.devices("cpu")[:R]),
                               "tp")
    other_mesh = jax_ep.Buffer(two, AXIS)
    small = jax_ep.Buffer(jax.make_mesh((2,), (AXIS,), devices=jax.devices("cpu")[:2]), AXIS)

    def with_buf(buf, ll=False):
        if ll:
            return lambda x, i, w: jax_ep.low_latency_dispatch(
                x, i, num_experts=E, max_tokens_per_rank=T, axis_name=AXIS, buffer=buf).recv_x
        return lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name=AXIS,
                                               buffer=buf).recv_x

    with pytest.raises(ValueError, match=r"made for axis 'tp' of size 4 .* axis 'ep' of size 4"):
        _sm(mesh, with_buf(other_axis))(x, idx, w)
    with pytest.raises(ValueError, match=r"made for axis 'ep' of size 2 .* size 4"):
        _sm(mesh, with_buf(small, ll=True))(x, idx, w)
    with pytest.raises(ValueError, match=r"made for the mesh \{'dp': 1, 'ep': 4\}"):
        jax.jit(jax.shard_map(with_buf(other_mesh), mesh=_mesh(AxisType.Auto),
                              in_specs=P(AXIS), out_specs=P(AXIS)))(x, idx, w)
    good = jax_ep.Buffer(mesh, AXIS)
    _sm(mesh, with_buf(good))(x, idx, w)
    for b in (other_axis, other_mesh, small, good):
        b.close()


def test_cuda_status_names_the_reason(monkeypatch):
    status = jax_ep.cuda_status()
    assert isinstance(status, str) and status
    assert jax_ep.cuda_available() == (status == "ok")

    class Ext:
        with_cuda = False

    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_ext", Ext())
    assert "built without CUDA kernels (JAX_EP_CUDA=OFF, or no working nvcc" in \
        _native.cuda_status()
    mesh = _mesh(AxisType.Auto)
    x, idx, w = _inputs(mesh)
    with pytest.raises(RuntimeError, match="JAX_EP_CUDA=OFF"):
        _sm(mesh, lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name=AXIS,
                                                  backend="cuda").recv_x)(x, idx, w)

    class Dev:
        platform = "gpu"
        device_kind = "NVIDIA A100-SXM4-80GB"
        compute_capability = "8.0"

    Ext.with_cuda = True
    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_register_error", None)
    monkeypatch.setattr(jax, "devices", lambda *a: [Dev()])
    assert "not a Hopper" in _native.cuda_status() and "8.0" in _native.cuda_status()
    Dev.compute_capability = "9.0"
    monkeypatch.setattr(_native, "_status", None)
    assert _native.cuda_status() == "ok"
    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_register_error", "the CUDA kernels are built but not loaded")
    assert "not loaded" in _native.cuda_status()
    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(jax, "devices", lambda *a: [])
    monkeypatch.setattr(_native, "_register_error", None)
    assert _native.cuda_status() == "JAX sees no CUDA GPU"
