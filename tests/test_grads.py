"""Custom VJPs: numerical checks (check_grads) and equality with a dense MoE's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
from tests import harness

R, E, T, K, H = 4, 8, 5, 3, 16
L = E // R


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate(harness.random_tokens(rng, R, T, H))
    idx = np.concatenate(harness.random_routing(rng, R, T, K, E, mask_prob=0.2))
    w = np.concatenate(harness.random_weights(rng, R, T, K))
    return x, idx, w


def _sharded(fn, num_args):
    m = harness.mesh(R)
    return jax.jit(jax.shard_map(fn, mesh=m, in_specs=(P(harness.AXIS),) * num_args,
                                 out_specs=P(harness.AXIS)))


def _put(*arrays):
    sh = NamedSharding(harness.mesh(R), P(harness.AXIS))
    return [jax.device_put(jnp.asarray(a), sh) for a in arrays]


def _expert_scale():
    return jnp.linspace(0.5, 1.5, E, dtype=jnp.float32)


def _moe_expert_layout(x, idx, w):
    r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="expert")
    me = jax.lax.axis_index(harness.AXIS)
    e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * L, 0)
    y = jnp.sin(r.recv_x * _expert_scale()[e][:, None])
    return jax_ep.combine(y, r.handle, r.recv_topk_weights)


def _moe_rank_layout(x, idx, w):
    r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="rank")
    me = jax.lax.axis_index(harness.AXIS)
    e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * L, 0)
    f = jnp.sin(r.recv_x[:, None, :] * _expert_scale()[e][..., None])
    y = jnp.sum(f * r.recv_topk_weights[..., None], axis=1)
    return jax_ep.combine(y, r.handle)


def _moe_dense(x, idx, w):
    e = jnp.where(idx >= 0, idx, 0)
    f = jnp.sin(x[:, None, :] * _expert_scale()[e][..., None])
    return jnp.sum(f * jnp.where(idx >= 0, w, 0.0)[..., None], axis=1)


@pytest.mark.parametrize("moe", [_moe_expert_layout, _moe_rank_layout])
def test_moe_grads_equal_dense_moe(moe):
    x, idx, w = _inputs(1)
    cot = np.random.default_rng(2).standard_normal((R * T, H)).astype(np.float32)
    f = _sharded(moe, 3)
    xs, idxs, ws = _put(x, idx, w)

    def loss_ep(x, w):
        return jnp.sum(f(x, idxs, w) * cot)

    def loss_dense(x, w):
        return jnp.sum(_moe_dense(x, jnp.asarray(idx), w) * cot)

    gx, gw = jax.grad(loss_ep, argnums=(0, 1))(xs, ws)
    rx, rw = jax.grad(loss_dense, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(gw)).sum() > 0 and np.abs(np.asarray(gx)).sum() > 0


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_check_grads_dispatch(layout):
    x, idx, w = _inputs(3)
    _, idxs, _ = _put(x, idx, w)

    def body(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout=layout)
        # a scalar per rank that depends on both outputs
        wsum = r.recv_topk_weights if layout == "expert" else jnp.sum(r.recv_topk_weights, 1)
        return (jnp.sum(jnp.sin(r.recv_x) * (1.0 + wsum[:, None])))[None]

    f = _sharded(body, 3)
    check_grads(lambda x, w: f(x, idxs, w), _put(x, w), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2, eps=1e-2)


def test_check_grads_combine():
    x, idx, w = _inputs(4)
    _, idxs, _ = _put(x, idx, w)
    cap = jax_ep.default_capacity(T, R, K, L, "expert")
    rng = np.random.default_rng(5)
    y = rng.standard_normal((R * cap, H)).astype(np.float32)
    rw = rng.random(R * cap).astype(np.float32)

    def body(x, idx, w, y, rw):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="expert")
        return jnp.sin(jax_ep.combine(y, r.handle, rw)) + jax_ep.combine(y, r.handle) ** 2

    f = _sharded(body, 5)
    xs, _, ws = _put(x, idx, w)
    check_grads(lambda y, rw: f(xs, idxs, ws, y, rw), _put(y, rw), order=1, modes=["rev"],
                atol=2e-2, rtol=2e-2, eps=1e-2)


def test_fp8_dispatch_gives_weight_grads_and_no_value_grads():
    x, idx, w = _inputs(6)
    xs, idxs, ws = _put(np.repeat(x, 8, axis=1), idx, w)  # hidden 128 for FP8

    def body(x, idx, w):
        r = jax_ep.dispatch(jax_ep.fp8.per_token_cast(x), idx, w, num_experts=E,
                            axis_name=harness.AXIS, layout="expert")
        vals = jax_ep.fp8.per_token_cast_back(*r.recv_x, dtype=jnp.float32)
        return jnp.sum(vals * r.recv_topk_weights[:, None])[None]

    f = _sharded(body, 3)
    gw = jax.grad(lambda w: jnp.sum(f(xs, idxs, w)))(ws)
    # d/dw[t,k] of sum(row * w_row) = sum of token t's dequantised values, for live slots
    row_sums = jnp.sum(jax_ep.fp8.per_token_cast_back(
        *jax_ep.fp8.per_token_cast(jnp.repeat(jnp.asarray(x), 8, axis=1)), dtype=jnp.float32),
        axis=1)
    want = np.where(idx >= 0, np.asarray(row_sums)[:, None], 0.0)
    np.testing.assert_allclose(gw, want, rtol=1e-5, atol=1e-4)
    gx = jax.grad(lambda x: jnp.sum(f(x, idxs, ws)))(xs)
    assert np.all(np.asarray(gx) == 0)  # FP8 values are documented as non-differentiable
