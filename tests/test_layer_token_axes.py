"""token_axes: a (data, ep) mesh without token_axes would run the MoE layer replicated over
"data"; the layer says so (UserWarning) and names the fix."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ep.flax import MoE
from jax_ep.moe import MoEConfig, MoEParams, moe_forward

H, F, E, K = 32, 32, 8, 2


def _mesh(data, ep=4):
    devices = np.array(jax.devices()[: data * ep]).reshape(data, ep)
    return jax.sharding.Mesh(devices, ("data", "ep"))


def _moe(mesh, **kw):
    return MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh, backend="reference",
               rngs=nnx.Rngs(0), **kw)


def test_a_data_axis_outside_token_axes_warns_and_names_the_fix():
    with pytest.warns(UserWarning, match=r"\('data',\).*token_axes=\('data',\)"):
        _moe(_mesh(2))


def test_moe_forward_warns_too():
    mesh = _mesh(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = _moe(mesh)
    x = jnp.ones((16, H))
    with pytest.warns(UserWarning, match="runs replicated"):
        moe_forward(x, moe.moe_params(), moe.config, mesh)


@pytest.mark.parametrize("data, kw", [(2, dict(token_axes=("data",))), (1, dict())],
                         ids=["token_axes", "size_one_axis"])
def test_no_warning_when_every_axis_shards_the_tokens(data, kw):
    mesh = _mesh(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe = _moe(mesh, **kw)
        out, stats = nnx.jit(lambda m, x: m(x))(moe, jnp.ones((data * 4 * 4, H)))
    assert out.shape == (data * 16, H) and int(stats.load.sum()) == data * 16 * K


def test_moe_config_and_params_are_documented_with_token_axes():
    for obj in (MoE, MoEConfig, MoE.__call__):
        assert "token_axes" in obj.__doc__
    assert MoEParams.__doc__
