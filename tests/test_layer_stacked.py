"""Stacked MoE layers: ragged_dot under vmap says to use expert_capacity; a model of user
and jax_ep layers compiles its train step once after place_on_mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep.flax import MoE, place_on_mesh
from jax_ep.moe import ragged_swiglu

H = 32


def test_ragged_dot_under_vmap_names_expert_capacity():
    x, gs = jnp.ones((3, 8, 16)), jnp.array([4, 4], jnp.int32)
    w, wd = jnp.ones((2, 16, 8)), jnp.ones((2, 8, 16))
    with pytest.raises(NotImplementedError, match="expert_capacity"):
        jax.vmap(ragged_swiglu, in_axes=(0, None, None, None, None))(x, w, w, wd, gs)


@pytest.mark.parametrize("placed", [True, False])
def test_train_step_compiles_once_with_place_on_mesh(placed):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(H, H, rngs=rngs)
            self.moe = MoE(hidden=H, ffn_hidden=32, num_experts=8, top_k=2, mesh=mesh,
                           backend="reference", rngs=rngs)

        def __call__(self, x):
            return self.moe(self.inp(x))[0]

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
    if placed:
        place_on_mesh(mesh, model, optimizer)

    traces = []

    @nnx.jit
    def step(model, optimizer, x):
        traces.append(1)  # once per trace: each new set of input shardings compiles anew
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    x = jax.device_put(jnp.ones((32, H)), NamedSharding(mesh, P("ep")))
    for _ in range(3):
        step(model, optimizer, x)
    # unplaced user layers: the first step's inputs are single-device arrays, later ones
    # come back from the step replicated on the mesh: a second compilation
    assert len(traces) == (1 if placed else 2)
