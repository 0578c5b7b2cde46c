"""jax_ep.flax.MoE on 4 simulated CPU devices against a dense per-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_ep.flax import MoE, linen_moe, route
from tests import harness

R = 4
H, F, E, K, FS = 32, 48, 8, 3, 16


def _mesh(explicit=False):
    if explicit:
        return jax.make_mesh((R,), (harness.AXIS,), devices=jax.devices()[:R],
                             axis_types=(jax.sharding.AxisType.Explicit,))
    return harness.mesh(R)


def _layer(mesh=None, **kw):
    args = dict(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh or _mesh(),
                shared_ffn_hidden=FS, backend="reference", rngs=nnx.Rngs(0))
    args.update(kw)
    return MoE(**args)


def _tokens(n=64, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, H), jnp.float32)


def _dense_reference(p, x, top_k=K, score_func="softmax"):
    """Loop-free per-token MoE: out[t] = sum_k w[t,k] * SwiGLU_{e_k}(x[t]) + shared(x[t]).

    Routing written independently of jax_ep.flax.route (softmax, no groups, no bias)."""
    hp = jax.lax.Precision.HIGHEST
    logits = jnp.dot(x, p["router"], precision=hp)
    scores = jax.nn.softmax(logits) if score_func == "softmax" else jax.nn.sigmoid(logits)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), top_k)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if score_func == "sigmoid":
        w = w / jnp.sum(w, axis=1, keepdims=True)
    dense_w = jnp.sum(jax.nn.one_hot(idx, E) * w[:, :, None], axis=1)  # [T, E]
    gate = jnp.einsum("th,ehf->tef", x, p["w_gate"], precision=hp)
    up = jnp.einsum("th,ehf->tef", x, p["w_up"], precision=hp)
    y = jnp.einsum("tef,efh->teh", jax.nn.silu(gate) * up, p["w_down"], precision=hp)
    out = jnp.einsum("te,teh->th", dense_w, y, precision=hp)
    if "shared_gate" in p:
        s = jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])
        out = out + jnp.dot(s, p["shared_down"], precision=hp)
    return out


def _params(moe):
    return {k: jnp.asarray(v[...]) for k, v in nnx.state(moe, nnx.Param).items()}


@pytest.mark.parametrize("explicit", [False, True])
def test_forward_matches_dense_reference(explicit):
    mesh = _mesh(explicit)
    moe = _layer(mesh)
    x = _tokens()
    out, stats = nnx.jit(lambda m, x: m(x))(moe, x)
    want = _dense_reference(_params(moe), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    # [B, S, H] input sharded over the sequence dim: same tokens, same result
    xs = jax.device_put(x.reshape(2, 32, H), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, harness.AXIS)))
    out3, _ = nnx.jit(lambda m, x: m(x))(moe, xs)
    assert out3.shape == (2, 32, H)
    np.testing.assert_allclose(np.asarray(out3).reshape(-1, H), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    # stats: every (token, slot) counted once, nothing dropped with the default capacity
    idx = np.asarray(moe.route(x).topk_idx)
    np.testing.assert_array_equal(np.asarray(stats.load), np.bincount(idx.ravel(), minlength=E))
    assert int(stats.load.sum()) == x.shape[0] * K
    assert int(stats.dropped) == 0
    assert np.isfinite(float(stats.aux_loss)) and float(stats.aux_loss) > 0


def test_sigmoid_batched_input_and_low_latency_match_reference():
    moe = _layer(score_func="sigmoid", shared_ffn_hidden=0)
    x = _tokens(48).reshape(4, 12, H)
    want = _dense_reference(_params(moe), x.reshape(-1, H), score_func="sigmoid")
    out, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out).reshape(-1, H), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    ll, stats = nnx.jit(lambda m, x: m(x, low_latency=True, max_tokens_per_rank=16))(moe, x)
    np.testing.assert_allclose(np.asarray(ll).reshape(-1, H), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    assert int(stats.load.sum()) == 48 * K


def test_gradients_reach_every_parameter_and_match_reference():
    moe = _layer()
    x = _tokens()
    target = jax.random.normal(jax.random.key(7), x.shape)

    def layer_loss(m, x):
        out, _ = m(x)
        return jnp.mean((out - target) ** 2)

    def ref_loss(p, x):
        return jnp.mean((_dense_reference(p, x) - target) ** 2)

    (gm, gx) = nnx.jit(nnx.grad(layer_loss, argnums=(0, 1)))(moe, x)
    ref_gp, ref_gx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(_params(moe), x)
    got = {k: np.asarray(v[...]) for k, v in gm.items()}
    assert set(got) == set(ref_gp) == {"router", "w_gate", "w_up", "w_down", "shared_gate",
                                        "shared_up", "shared_down"}
    for name, g in got.items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), f"no gradient for {name}"
        np.testing.assert_allclose(g, np.asarray(ref_gp[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), rtol=1e-4, atol=1e-6)
    # every routed expert got tokens, so each expert's slice of the weights has a gradient
    for name in ("w_gate", "w_up", "w_down"):
        assert np.all(np.abs(got[name]).reshape(E, -1).max(axis=1) > 0), name


def test_training_lowers_loss():
    moe = _layer(score_func="sigmoid", n_groups=4, topk_groups=2, rngs=nnx.Rngs(3))
    x = _tokens(64, seed=4)
    teacher = _layer(shared_ffn_hidden=0, rngs=nnx.Rngs(11))
    target, _ = teacher(x)
    opt = nnx.Optimizer(moe, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(moe, opt, x, target):
        def loss_fn(m):
            out, stats = m(x)
            return jnp.mean((out - target) ** 2), stats
        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(moe)
        opt.update(moe, grads)
        moe.update_bias(stats.load, 1e-3)
        return loss

    losses = [float(step(moe, opt, x, target)) for _ in range(50)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert np.any(np.asarray(moe.expert_bias[...]) != 0)  # bias balancing state moved


def _check_valid_topk(r, n_groups, topk_groups, normalized):
    idx = np.asarray(r.topk_idx)
    w = np.asarray(r.topk_weights)
    scores = np.asarray(r.scores)
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < E
    assert all(len(set(row)) == idx.shape[1] for row in idx), "experts repeat within a token"
    groups = idx // (E // n_groups)
    assert all(len(set(row)) <= topk_groups for row in groups)
    np.testing.assert_allclose(w, np.take_along_axis(scores, idx, 1) /
                               (np.take_along_axis(scores, idx, 1).sum(1, keepdims=True)
                                if normalized else 1.0), rtol=1e-6)
    if normalized:
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    assert np.all(w > 0)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_gives_valid_topk(score_func):
    logits = jax.random.normal(jax.random.key(2), (200, E)) * 3
    r = route(logits, top_k=K, score_func=score_func, n_groups=4, topk_groups=2)
    _check_valid_topk(r, 4, 2, normalized=score_func == "sigmoid")
    # with one group allowed, all K experts come from the best group (group size 2 < K fails)
    with pytest.raises(ValueError, match="topk_groups"):
        route(logits, top_k=K, n_groups=4, topk_groups=1)
    r1 = route(logits, top_k=2, score_func=score_func, n_groups=4, topk_groups=1)
    assert np.all(np.asarray(r1.topk_idx)[:, 0] // 2 == np.asarray(r1.topk_idx)[:, 1] // 2)
    # plain top-k (no groups) picks the largest scores
    r2 = route(logits, top_k=K, score_func=score_func)
    want = np.argsort(-np.asarray(r2.scores), axis=1)[:, :K]
    np.testing.assert_array_equal(np.sort(np.asarray(r2.topk_idx), 1), np.sort(want, 1))


def test_bias_steers_selection_not_weights():
    logits = jax.random.normal(jax.random.key(3), (100, E))
    bias = jnp.zeros((E,)).at[5].set(10.0)
    r = route(logits, top_k=2, score_func="sigmoid", bias=bias)
    assert np.all(np.any(np.asarray(r.topk_idx) == 5, axis=1))
    _check_valid_topk(r, 1, 1, normalized=True)  # weights from unbiased scores
    moe = _layer()
    moe.update_bias(jnp.array([10, 0, 0, 0, 0, 0, 0, 6]), rate=0.5)
    np.testing.assert_allclose(np.asarray(moe.expert_bias[...]),
                               [-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5])


def test_layer_group_limited_sigmoid_routing_is_valid():
    moe = _layer(score_func="sigmoid", n_groups=4, topk_groups=2)
    x = _tokens()
    _check_valid_topk(moe.route(x), 4, 2, normalized=True)
    out, stats = moe(x)
    assert np.all(np.isfinite(np.asarray(out))) and int(stats.load.sum()) == 64 * K


def test_data_and_expert_axes_match_dense_reference():
    devices = np.array(jax.devices()[:R]).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", harness.AXIS))
    moe = _layer(mesh, token_axes=("data",))
    x = _tokens()
    out, stats = nnx.jit(lambda m, x: m(x))(moe, x.reshape(8, 8, H))
    np.testing.assert_allclose(np.asarray(out).reshape(-1, H),
                               np.asarray(_dense_reference(_params(moe), x)),
                               rtol=1e-5, atol=1e-5)
    assert int(stats.load.sum()) == 64 * K  # counted over both axes, once
    with pytest.raises(ValueError, match="token_axes"):
        _layer(mesh, token_axes=("ep",))


def test_bf16_and_expert_alignment():
    moe = _layer(dtype=jnp.bfloat16, expert_alignment=8)
    x = _tokens()
    out, stats = nnx.jit(lambda m, x: m(x))(moe, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and int(stats.dropped) == 0
    want = _dense_reference(_params(moe), x)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), rtol=0.05,
                               atol=0.05)


def test_small_capacity_reports_dropped_rows():
    moe = _layer(capacity=4)
    x = _tokens()
    out, stats = nnx.jit(lambda m, x: m(x))(moe, x)
    # 16 tokens per rank x 3 slots = 48 rows per rank on average; only 4 fit
    assert int(stats.dropped) > 0
    assert int(stats.dropped) == 64 * K - 4 * R
    assert np.all(np.isfinite(np.asarray(out)))
    full, full_stats = _layer()(x)
    assert int(full_stats.dropped) == 0
    assert not np.allclose(np.asarray(out), np.asarray(full))


def test_linen_wrapper_matches_dense_reference():
    layer = linen_moe(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=_mesh(),
                      backend="reference")
    x = _tokens()
    variables = layer.init(jax.random.key(0), x)
    out, stats = jax.jit(layer.apply)(variables, x)
    p = {k: jnp.asarray(getattr(v, "value", v)) for k, v in variables["params"].items()}
    np.testing.assert_allclose(np.asarray(out), np.asarray(_dense_reference(p, x)),
                               rtol=1e-5, atol=1e-5)
    assert int(stats.load.sum()) == 64 * K


def test_bad_arguments_raise_clear_errors():
    mesh = _mesh()
    with pytest.raises(ValueError, match="not divisible by the 4 ranks"):
        _layer(num_experts=6)
    with pytest.raises(ValueError, match="top_k"):
        _layer(top_k=E + 1)
    with pytest.raises(ValueError, match="hidden=30 must be a multiple of 4"):
        _layer(hidden=30)
    with pytest.raises(ValueError, match="score_func"):
        _layer(score_func="relu")
    with pytest.raises(ValueError, match="n_groups"):
        _layer(n_groups=3)
    with pytest.raises(ValueError, match="axis_name"):
        _layer(mesh=mesh, axis_name="tp")
    with pytest.raises(ValueError, match="capacity"):
        _layer(capacity=0)
    moe = _layer()
    with pytest.raises(ValueError, match="hidden"):
        moe(jnp.ones((8, H + 4)))
    with pytest.raises(ValueError, match="6 tokens are not divisible by the 4 shards"):
        moe(jnp.ones((6, H)))
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        moe(jnp.ones((16, H)), low_latency=True, max_tokens_per_rank=2)
    with pytest.raises(ValueError, match="load must have shape"):
        moe.update_bias(jnp.ones((3,)))


def test_expert_capacity_batched_path_matches_reference_and_gradients():
    # 64 tokens x 3 slots spread over 8 experts on 4 ranks: at most 64 rows per expert
    moe = _layer(expert_capacity=64, expert_alignment=4)
    x = _tokens()
    target = jax.random.normal(jax.random.key(8), x.shape)
    out, stats = nnx.jit(lambda m, x: m(x))(moe, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_dense_reference(_params(moe), x)),
                               rtol=1e-5, atol=1e-5)
    assert int(stats.dropped) == 0

    def layer_loss(m, x):
        return jnp.mean((m(x)[0] - target) ** 2)

    def ref_loss(p, x):
        return jnp.mean((_dense_reference(p, x) - target) ** 2)

    gm = nnx.jit(nnx.grad(layer_loss))(moe, x)
    ref = jax.jit(jax.grad(ref_loss))(_params(moe), x)
    for name, g in gm.items():
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(ref[name]), rtol=1e-4,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rank_exchange_matches_expert_exchange_and_reference(dtype):
    # exchange="rank": one row per (token, rank) each way, slots filled on the expert's rank
    rank = _layer(expert_capacity=64)
    expert = _layer(expert_capacity=64, exchange="expert")
    assert (rank.exchange, expert.exchange) == ("rank", "expert")
    x = _tokens(seed=3).astype(dtype)
    target = jax.random.normal(jax.random.key(9), x.shape, jnp.float32)
    fwd = nnx.jit(lambda m, x: m(x))
    out_r, st_r = fwd(rank, x)
    out_e, st_e = fwd(expert, x)
    assert out_r.dtype == dtype and int(st_r.dropped) == 0
    np.testing.assert_array_equal(np.asarray(st_r.load), np.asarray(st_e.load))
    ref = _dense_reference(_params(rank), x.astype(jnp.float32))
    tol = 1e-5 if dtype == jnp.float32 else 3e-2  # bf16: the per-rank partial sums round
    np.testing.assert_allclose(np.asarray(out_r, np.float32), np.asarray(ref), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(out_r, np.float32), np.asarray(out_e, np.float32),
                               rtol=tol, atol=tol)

    def loss(m, x):
        return jnp.mean((m(x)[0].astype(jnp.float32) - target) ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    (gm_r, gx_r), (gm_e, gx_e) = grad(rank, x), grad(expert, x)
    gtol = 1e-4 if dtype == jnp.float32 else 5e-2
    scale = float(jnp.max(jnp.abs(gx_e.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(gx_r, np.float32), np.asarray(gx_e, np.float32),
                               rtol=gtol, atol=gtol * scale)
    for name, g in gm_r.items():
        ge = np.asarray(gm_e[name][...], np.float32)
        assert np.any(ge != 0), name
        np.testing.assert_allclose(np.asarray(g[...], np.float32), ge, rtol=gtol,
                                   atol=gtol * float(np.max(np.abs(ge))), err_msg=name)


def test_rank_exchange_counts_the_same_dropped_rows_as_expert_exchange():
    x = _tokens(seed=4)
    stats = [nnx.jit(lambda m, x: m(x))(_layer(expert_capacity=2, exchange=ex), x)[1]
             for ex in ("rank", "expert")]
    assert int(stats[0].dropped) > 0
    assert int(stats[0].dropped) == int(stats[1].dropped)


def test_rank_exchange_lowers_capacity_to_what_a_rank_layout_holds():
    # capacity counts (token, rank) rows: a rank receives each source token at most once,
    # so anything above R*T is lowered to R*T (same output, no zero rows carried along)
    x = _tokens(n=64, seed=5)
    big = _layer(expert_capacity=64, capacity=1000)
    out_big, st_big = nnx.jit(lambda m, x: m(x))(big, x)
    out_none, st_none = nnx.jit(lambda m, x: m(x))(_layer(expert_capacity=64), x)
    np.testing.assert_array_equal(np.asarray(out_big), np.asarray(out_none))
    assert int(st_big.dropped) == int(st_none.dropped) == 0
    jaxpr = str(jax.make_jaxpr(lambda x: big(x))(x))
    rows = 64  # R * T: 4 ranks x 16 local tokens
    assert f"[{rows},{H}]" in jaxpr.replace(" ", "") and "[1000," not in jaxpr


@pytest.mark.parametrize("exchange", ["rank", "expert"])
def test_slot_layouts_have_no_while_loops(exchange):
    # a while loop's predicate goes device -> host on every step on GPUs: the slot
    # arithmetic must be loop-free (searchsorted's default method is a while loop)
    moe = _layer(expert_capacity=16, exchange=exchange)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x)[0])

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, _tokens()).as_text()
    assert "while" not in hlo


@pytest.mark.parametrize("dtype,shape", [
    (jnp.bfloat16, (7, 16)), (jnp.float32, (5, 3)), (jnp.int8, (6, 2, 4)),
    (jnp.bfloat16, (4, 3)),  # odd row of 2-byte elements: element gather
    (jnp.bfloat16, (0, 8)),  # nothing to read: every index is out of range
])
def test_take_rows_equals_take_with_zero_fill(dtype, shape):
    from jax_ep.moe import take_rows
    a = (jax.random.normal(jax.random.key(0), shape) * 50).astype(dtype)
    idx = jnp.array([0, shape[0] - 1, -1, shape[0], 2, 2, shape[0] + 7], jnp.int32)
    got = jax.jit(take_rows)(a, idx)
    a_np = np.asarray(a.astype(jnp.float32))
    want = np.stack([a_np[i] if 0 <= i < shape[0] else np.zeros(shape[1:], np.float32)
                     for i in np.asarray(idx)])
    assert got.dtype == a.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_ragged_experts_on_gpus_warn_once(monkeypatch):
    import warnings
    import jax_ep.moe.experts as jf
    x = _tokens()
    monkeypatch.setattr(jf, "_on_gpus", lambda mesh: True)
    jf._warn_ragged_dot_on_gpus.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a small dense lowering is fine: no warning
        _layer()(x)
    monkeypatch.setattr(jf, "_RAGGED_DENSE_WARN_BYTES", 1)
    with pytest.warns(RuntimeWarning, match="expert_capacity=ceil"):
        _layer()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per local-expert count, not per call
        _layer()(x)
        _layer(expert_capacity=16)(x)  # capacity layout: nothing to warn about
    monkeypatch.setattr(jf, "_on_gpus", lambda mesh: False)
    jf._warn_ragged_dot_on_gpus.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not on GPUs: no warning
        _layer()(x)
    # where the grouped-matmul kernel runs the experts (bf16, H and F multiples of 8)
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm
    monkeypatch.setattr(jf, "_on_gpus", lambda mesh: True)
    monkeypatch.setattr(cuda_gm, "available", lambda: True)
    jf._warn_ragged_dot_on_gpus.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jf._check_ragged_dot_cost(None, 8, 1 << 20, 1024, 1024, jnp.bfloat16)
    with pytest.warns(RuntimeWarning, match="needs bfloat16"):
        jf._check_ragged_dot_cost(None, 8, 1 << 20, 1024, 1024, jnp.float32)


def test_rank_exchange_argument_errors():
    with pytest.raises(ValueError, match="exchange must be one of"):
        _layer(expert_capacity=8, exchange="ranks")
    with pytest.raises(ValueError, match="pass expert_capacity"):
        _layer(exchange="rank")
    with pytest.raises(ValueError, match="expert_alignment"):
        _layer(expert_capacity=8, expert_alignment=4, exchange="rank")


def test_small_expert_capacity_reports_dropped_rows():
    moe = _layer(expert_capacity=2)
    x = _tokens()
    _, stats = nnx.jit(lambda m, x: m(x))(moe, x)
    load = np.bincount(np.asarray(moe.route(x).topk_idx).ravel(), minlength=E)
    assert int(stats.dropped) == int(np.maximum(load - 2, 0).sum()) > 0
    with pytest.raises(ValueError, match="expert_capacity must be None or a positive int"):
        _layer(expert_capacity=0)


def _scatter_slots_reference(recv_x, group_sizes, real_sizes, C):
    """The previous expert-slot code (gather in, scatter back), kept as the reference."""
    cap = recv_x.shape[0]
    start = jnp.cumsum(group_sizes) - group_sizes
    col = jnp.arange(C, dtype=jnp.int32)
    src = jnp.where(col[None, :] < group_sizes[:, None], start[:, None] + col[None, :], cap)
    padded = jnp.concatenate([recv_x, jnp.zeros((1, recv_x.shape[1]), recv_x.dtype)])
    dropped = jnp.sum(jnp.maximum(real_sizes - C, 0))

    def back(y_slots):
        flat = y_slots.reshape(-1, y_slots.shape[-1])
        return jnp.zeros((cap, flat.shape[1]), flat.dtype).at[src.reshape(-1)].set(
            flat, mode="drop")
    return padded[src], back, dropped


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sizes,C", [
    ((5, 0, 9, 3), 6),     # one group over C (3 rows dropped), an empty group, padding
    ((2, 4, 1, 0), 8),     # all fit, trailing padding rows
    ((7, 7, 7, 3), 7),     # exactly full groups, no padding
    ((0, 0, 24, 0), 5),    # one group holds every row, far over C
    ((0, 0, 0, 0), 3),     # nothing received
])
def test_expert_slots_by_gathers_equal_scatter_version_exactly(sizes, C, dtype):
    from jax_ep.moe import from_expert_slots, to_expert_slots
    cap, hid = 24, 8
    gs = jnp.asarray(sizes, jnp.int32)
    real = jnp.maximum(gs - 1, 0)  # as if each group had one row of alignment padding
    x = jax.random.normal(jax.random.key(0), (cap, hid), jnp.float32).astype(dtype)
    g_back = jax.random.normal(jax.random.key(1), (cap, hid), jnp.float32).astype(dtype)
    g_slots = jax.random.normal(jax.random.key(2), (len(sizes), C, hid),
                                jnp.float32).astype(dtype)

    def new(x, y):
        slots, smap, dropped = to_expert_slots(x, gs, real, C)
        return slots, from_expert_slots(y, smap), dropped

    def old(x, y):
        slots, back, dropped = _scatter_slots_reference(x, gs, real, C)
        return slots, back(y), dropped

    y = jax.random.normal(jax.random.key(3), (len(sizes), C, hid), jnp.float32).astype(dtype)
    for fn in (new, old):
        assert jax.jit(fn)(x, y)[0].shape == (len(sizes), C, hid)
    got, want = jax.jit(new)(x, y), jax.jit(old)(x, y)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert int(got[2]) == int(np.maximum(np.asarray(real) - C, 0).sum())

    def vjp(fn):
        out, pullback = jax.vjp(lambda x, y: fn(x, y)[:2], x, y)
        return pullback((g_slots, g_back))

    for a, b in zip(jax.jit(lambda: vjp(new))(), jax.jit(lambda: vjp(old))()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # forward and backward are gathers only: no scatter(-add) in the program
    assert "scatter" not in jax.jit(lambda: vjp(new)).lower().as_text()
    assert "scatter" in jax.jit(lambda: vjp(old)).lower().as_text()
    # rows past C or past the groups come back as zeros; the others round-trip
    rt = np.asarray(jax.jit(lambda x: new(x, new(x, y)[0])[1])(x), np.float32)
    starts = np.cumsum(sizes) - np.asarray(sizes)
    keep = np.zeros(cap, bool)
    for s0, n in zip(starts, sizes):
        keep[s0:s0 + min(n, C)] = True
    np.testing.assert_array_equal(rt[keep], np.asarray(x, np.float32)[keep])
    assert not np.any(rt[~keep])


def _dot_operand_dtypes(fn, *args):
    """Dtypes of the operands of every matmul (dot_general / ragged_dot) in fn's jaxpr."""
    from jax.extend.core import jaxprs_in_params
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if "dot" in eqn.primitive.name:
                found.append((eqn.primitive.name,
                              tuple(str(v.aval.dtype) for v in eqn.invars[:2])))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_expert_ffn_backward_matmuls_stay_bf16():
    from jax_ep.moe import batched_swiglu, ragged_swiglu, swiglu
    bf = jnp.bfloat16
    ks = jax.random.split(jax.random.key(0), 4)
    L, M, F_ = 2, 8, 16
    x = jax.random.normal(ks[0], (L, M, H)).astype(bf)
    wg = jax.random.normal(ks[1], (L, H, F_)).astype(bf)
    wu = jax.random.normal(ks[2], (L, H, F_)).astype(bf)
    wd = jax.random.normal(ks[3], (L, F_, H)).astype(bf)
    gs = jnp.asarray([5, 11], jnp.int32)
    cases = {
        "batched": (lambda *a: batched_swiglu(*a), (x, wg, wu, wd)),
        "ragged": (lambda x, wg, wu, wd: ragged_swiglu(x, wg, wu, wd, gs),
                   (x.reshape(L * M, H), wg, wu, wd)),
        "dense": (swiglu, (x[0], wg[0], wu[0], wd[0])),
    }
    for name, (fn, args) in cases.items():
        assert fn(*args).dtype == bf, name

        def loss(*a, fn=fn):
            return jnp.sum(fn(*a).astype(jnp.float32))

        dots = _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
        assert len(dots) >= 9, (name, dots)  # 3 forward + 6 backward matmuls
        assert all(d == ("bfloat16", "bfloat16") for _, d in dots), (name, dots)
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
        assert all(g.dtype == bf and np.all(np.isfinite(np.asarray(g, np.float32)))
                   for g in grads), name


@pytest.mark.parametrize("expert_capacity", [None, 64])
def test_bf16_layer_matmuls_are_bf16_except_the_router(expert_capacity):
    moe = _layer(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 expert_capacity=expert_capacity)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x)[0].astype(jnp.float32))

    dots = _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), params,
                               _tokens().astype(jnp.bfloat16))
    f32_dots = [d for d in dots if d[1] != ("bfloat16", "bfloat16")]
    # the router (f32 by design): logits forward, its x and router gradients
    assert f32_dots == [("dot_general", ("float32", "float32"))] * 3, dots
    assert len(dots) == 3 + 9 + 9  # + routed experts and shared expert, fwd and bwd


def _rank_slots_oracle(idx, num_local, C):
    """NumPy: pairs (j, k) of each local expert in (j, k) order take its first C slots."""
    cap, K = idx.shape
    pair_slot = np.full((cap, K), num_local * C, np.int64)
    slot_pair = np.full((num_local * C,), cap * K, np.int64)
    fill = np.zeros(num_local, np.int64)
    dropped = 0
    for j in range(cap):
        for k in range(K):
            e = idx[j, k]
            if 0 <= e < num_local:
                if fill[e] < C:
                    s = e * C + fill[e]
                    pair_slot[j, k], slot_pair[s] = s, j * K + k
                else:
                    dropped += 1
                fill[e] += 1
    return pair_slot, slot_pair, dropped


@pytest.mark.parametrize("cap,K,L,C,mask", [
    (13, 3, 4, 5, 0.3),   # some experts over C, masked pairs
    (1, 2, 2, 1, 0.0),    # one received row
    (6, 4, 3, 8, 1.0),    # every pair masked (-1): nothing to do
    (20, 2, 1, 40, 0.1),  # one local expert, room for all
])
def test_rank_slots_fan_out_and_reduce_match_numpy(cap, K, L, C, mask):
    from jax_ep.moe import fan_out, rank_slots, reduce_to_rows
    rng = np.random.default_rng(cap * 100 + K)
    idx = rng.integers(0, L, (cap, K)).astype(np.int32)
    idx[rng.random((cap, K)) < mask] = -1
    plan, dropped = jax.jit(rank_slots, static_argnums=(1, 2))(jnp.asarray(idx), L, C)
    want_ps, want_sp, want_drop = _rank_slots_oracle(idx, L, C)
    np.testing.assert_array_equal(np.asarray(plan.pair_slot), want_ps)
    np.testing.assert_array_equal(np.asarray(plan.slot_pair), want_sp)
    np.testing.assert_array_equal(np.asarray(plan.slot_row),
                                  np.where(want_sp < cap * K, want_sp // K, cap))
    assert int(dropped) == want_drop

    hid = 8
    rows = rng.standard_normal((cap, hid)).astype(np.float32)
    w = rng.random((cap, K)).astype(np.float32)
    y = rng.standard_normal((L * C, hid)).astype(np.float32)
    g_slots = rng.standard_normal((L * C, hid)).astype(np.float32)
    g_rows = rng.standard_normal((cap, hid)).astype(np.float32)
    # forward: data movement is exact, the reduction is a k-ordered f32 sum
    slots = np.asarray(fan_out(jnp.asarray(rows), plan.slot_row, plan.pair_slot))
    want_slots = np.zeros((L * C, hid), np.float32)
    valid = want_sp < cap * K
    want_slots[valid] = rows[want_sp[valid] // K]
    np.testing.assert_array_equal(slots, want_slots)
    red = np.asarray(reduce_to_rows(jnp.asarray(y), jnp.asarray(w), plan.pair_slot,
                                     plan.slot_pair))
    has = want_ps < L * C
    want_red = np.zeros((cap, hid), np.float32)
    for k in range(K):
        want_red += np.where(has[:, k, None], w[:, k, None] * y[np.minimum(want_ps[:, k],
                                                                           L * C - 1)], 0)
    np.testing.assert_allclose(red, want_red, rtol=1e-6, atol=1e-6)
    # backward: the gather-only VJPs equal autodiff of the scatter formulation
    _, vjp_fan = jax.vjp(lambda r: fan_out(r, plan.slot_row, plan.pair_slot), jnp.asarray(rows))
    (d_rows,) = vjp_fan(jnp.asarray(g_slots))
    want_d_rows = np.zeros((cap, hid), np.float32)
    np.add.at(want_d_rows, want_sp[valid] // K, g_slots[valid])
    np.testing.assert_allclose(np.asarray(d_rows), want_d_rows, rtol=1e-6, atol=1e-6)
    _, vjp_red = jax.vjp(lambda y, w: reduce_to_rows(y, w, plan.pair_slot, plan.slot_pair),
                         jnp.asarray(y), jnp.asarray(w))
    d_y, d_w = vjp_red(jnp.asarray(g_rows))
    want_d_y = np.zeros((L * C, hid), np.float32)
    want_d_y[valid] = w.reshape(-1)[want_sp[valid], None] * g_rows[want_sp[valid] // K]
    np.testing.assert_allclose(np.asarray(d_y), want_d_y, rtol=1e-6, atol=1e-6)
    want_d_w = np.where(has, np.einsum("jh,jkh->jk", g_rows,
                                       y[np.minimum(want_ps, L * C - 1)]), 0)
    np.testing.assert_allclose(np.asarray(d_w), want_d_w, rtol=1e-5, atol=1e-5)
