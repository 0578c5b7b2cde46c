"""jax_ep.moe, the functional core of the MoE layer: the per-rank function inside a
user's own shard_map, the mesh-level forward, the config, and the expert FFNs."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep.flax
import jax_ep.moe
from jax_ep.moe import (MoEConfig, MoEParams, batched_swiglu, moe_forward, moe_per_rank,
                        ragged_swiglu)
from tests import harness

R = 4
H, F, E, K, FS = 32, 48, 8, 3, 16


def _layer(**kw):
    args = dict(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=harness.mesh(R),
                shared_ffn_hidden=FS, backend="reference", rngs=nnx.Rngs(0))
    args.update(kw)
    moe = jax_ep.flax.MoE(**args)
    # a bias that changes the selection, so that it is part of what is compared
    moe.expert_bias[...] = jax.device_put(jnp.linspace(-0.05, 0.05, E),
                                          NamedSharding(moe.mesh, P()))
    return moe


def _specs(params):
    espec = P(harness.AXIS)
    return MoEParams(router=P(), w_gate=espec, w_up=espec, w_down=espec,
                     expert_bias=None if params.expert_bias is None else P(),
                     shared=tuple(P() for _ in params.shared))


def _user_block(moe, **call_kw):
    """The user's own per-rank code around the MoE, under their own shard_map."""
    def body(x, params):
        out, stats = moe_per_rank(x, params, moe.config, **call_kw)
        return out, stats

    params = moe.moe_params()
    return jax.jit(jax.shard_map(body, mesh=moe.mesh, in_specs=(P(harness.AXIS), _specs(params)),
                                 out_specs=(P(harness.AXIS), P())))


@pytest.mark.parametrize("kw", [dict(), dict(expert_capacity=16),
                                dict(expert_capacity=16, exchange="expert"),
                                dict(score_func="sigmoid", n_groups=4, topk_groups=2,
                                     capacity=40)],
                         ids=["ragged", "rank", "expert_slots", "sigmoid_groups"])
def test_per_rank_inside_user_shard_map_matches_the_module(kw):
    moe = _layer(**kw)
    x = jax.random.normal(jax.random.key(1), (R * 16, H), jnp.float32)
    want, want_stats = nnx.jit(lambda m, x: m(x))(moe, x)
    got, stats = _user_block(moe)(x, moe.moe_params())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.load), np.asarray(want_stats.load))
    assert int(stats.dropped) == int(want_stats.dropped)
    np.testing.assert_allclose(float(stats.aux_loss), float(want_stats.aux_loss), rtol=1e-6)


def test_per_rank_gradients_and_low_latency_match_the_module():
    moe = _layer()
    x = jax.random.normal(jax.random.key(2), (R * 8, H), jnp.float32)
    cot = jax.random.normal(jax.random.key(3), (R * 8, H), jnp.float32)
    block = _user_block(moe)

    def user_loss(params, x):
        out, stats = block(x, params)
        return jnp.sum(out * cot) + 0.1 * stats.aux_loss

    def module_loss(m, x):
        out, stats = m(x)
        return jnp.sum(out * cot) + 0.1 * stats.aux_loss

    g_user = jax.jit(jax.grad(user_loss))(moe.moe_params(), x)
    g_mod = nnx.jit(nnx.grad(module_loss))(moe, x)
    for name in ("router", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(np.asarray(getattr(g_user, name)),
                                   np.asarray(g_mod[name][...]), rtol=1e-5, atol=1e-6)
    for got, name in zip(g_user.shared, ("shared_gate", "shared_up", "shared_down")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(g_mod[name][...]),
                                   rtol=1e-5, atol=1e-6)

    ll_want, _ = nnx.jit(lambda m, x: m(x, low_latency=True, max_tokens_per_rank=12))(moe, x)
    ll_got, _ = _user_block(moe, low_latency=True, max_tokens_per_rank=12)(x, moe.moe_params())
    np.testing.assert_allclose(np.asarray(ll_got), np.asarray(ll_want), rtol=1e-6, atol=1e-6)


def test_moe_forward_is_the_module_bitwise_and_casts_to_dtype():
    moe = _layer(dtype=jnp.bfloat16, expert_capacity=12)
    x = jax.random.normal(jax.random.key(4), (2, R * 8, H), jnp.float32)
    want, want_stats = nnx.jit(lambda m, x: m(x))(moe, x)
    fwd = jax.jit(moe_forward, static_argnums=(2, 3), static_argnames="dtype")
    got, stats = fwd(x, moe.moe_params(), moe.config, moe.mesh, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(stats.load), np.asarray(want_stats.load))


def test_moe_per_rank_docstring_example_runs():
    finder = doctest.DocTestFinder()
    (test,) = finder.find(moe_per_rank, "moe_per_rank", globs={})
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.attempted > 5 and result.failed == 0


def test_moe_per_rank_argument_errors():
    moe = _layer()
    params = moe.moe_params()
    x = jnp.ones((R * 4, H))
    with pytest.raises(ValueError, match="inside jax.shard_map over the mesh axis"):
        moe_per_rank(x, params, moe.config)
    with pytest.raises(TypeError, match="config must be a jax_ep.moe.MoEConfig"):
        moe_per_rank(x, params, {"num_experts": E})

    def run(body, in_params):
        return jax.shard_map(body, mesh=moe.mesh, in_specs=(P(harness.AXIS), _specs(in_params)),
                             out_specs=P(harness.AXIS))(x, in_params)

    replicated = _specs(params)._replace(w_gate=P(), w_up=P(), w_down=P())
    with pytest.raises(ValueError, match="w_gate must have 2 experts on its first dim"):
        jax.shard_map(lambda x, p: moe_per_rank(x, p, moe.config)[0], mesh=moe.mesh,
                      in_specs=(P(harness.AXIS), replicated), out_specs=P(harness.AXIS))(x, params)
    with pytest.raises(ValueError, match="max_tokens_per_rank must be an int >= the 4"):
        run(lambda x, p: moe_per_rank(x, p, moe.config, low_latency=True,
                                      max_tokens_per_rank=2)[0], params)
    with pytest.raises(ValueError, match="router must be"):
        run(lambda x, p: moe_per_rank(x, p._replace(router=p.router[:, :4]),
                                      moe.config)[0], params)


def test_config_resolves_and_checks_its_fields():
    c = MoEConfig(num_experts=16, top_k=2, expert_capacity=8, token_axes="data",
                  score_func="sigmoid")
    assert (c.exchange, c.token_axes, c.normalize_weights) == ("rank", ("data",), True)
    assert MoEConfig(num_experts=16, top_k=2).exchange == "expert"
    assert hash(c) == hash(MoEConfig(num_experts=16, top_k=2, expert_capacity=8,
                                     token_axes=("data",), score_func="sigmoid"))
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="pass expert_capacity"):
        MoEConfig(num_experts=4, top_k=1, exchange="rank")
    with pytest.raises(ValueError, match="token_axes must be distinct"):
        MoEConfig(num_experts=4, top_k=1, token_axes=("ep",))


def test_ragged_and_batched_swiglu_match_per_expert_dense_swiglu():
    k = jax.random.split(jax.random.key(5), 4)
    L, M = 3, 10
    x = jax.random.normal(k[0], (M, H))
    wg = jax.random.normal(k[1], (L, H, F)) / H ** 0.5
    wu = jax.random.normal(k[2], (L, H, F)) / H ** 0.5
    wd = jax.random.normal(k[3], (L, F, H)) / F ** 0.5
    sizes = np.array([4, 0, 5])  # the last row is in no group
    got = ragged_swiglu(x, wg, wu, wd, jnp.asarray(sizes, jnp.int32))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for e in range(L):
        rows = slice(starts[e], starts[e + 1])
        np.testing.assert_allclose(np.asarray(got[rows]),
                                   np.asarray(jax_ep.moe.swiglu(x[rows], wg[e], wu[e], wd[e])),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[starts[-1]:]), 0)
    xb = jnp.stack([x[:4], x[4:8], x[6:10]])
    got_b = batched_swiglu(xb, wg, wu, wd)
    for e in range(L):
        np.testing.assert_allclose(np.asarray(got_b[e]),
                                   np.asarray(jax_ep.moe.swiglu(xb[e], wg[e], wu[e], wd[e])),
                                   rtol=1e-5, atol=1e-5)


def test_place_on_mesh_replicates_unplaced_arrays_and_keeps_the_experts():
    mesh = harness.mesh(R)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(H, H, rngs=rngs)  # a user layer: not on the mesh
            self.moe = jax_ep.flax.MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K,
                                       mesh=mesh, backend="reference", rngs=rngs)

    model = Model(nnx.Rngs(0))
    assert not isinstance(model.proj.kernel[...].sharding, NamedSharding)
    jax_ep.flax.place_on_mesh(mesh, model)
    assert model.proj.kernel[...].sharding == NamedSharding(mesh, P())
    assert model.moe.w_gate[...].sharding.spec == P(harness.AXIS, None, None)
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh


def test_flax_reexports_the_functional_core():
    assert jax_ep.flax.route is jax_ep.moe.route
    assert jax_ep.flax.MoEStats is jax_ep.moe.MoEStats
    assert jax_ep.flax.swiglu is jax_ep.moe.swiglu
    moe = _layer(expert_capacity=8)
    assert moe.config.exchange == moe.exchange == "rank"
    assert moe.num_experts == E and moe.normalize_weights is False
