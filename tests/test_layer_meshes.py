"""jax_ep.flax.MoE inside a user's model on every mesh kind a JAX user makes.

``jax.make_mesh`` gives Explicit axes by default; older code uses Auto axes; either may run
with or without ``jax.set_mesh(mesh)``. The layer's forward pass, ``nnx.grad`` of a model
around it and an optax training step must work in all four, with the same numbers.
"""

import contextlib

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep.flax import MoE, place_on_mesh

R, H, F, E, K = 4, 32, 48, 8, 2
AT = jax.sharding.AxisType


def _mesh(kind):
    return jax.make_mesh((R,), ("ep",), devices=jax.devices()[:R],
                         axis_types=(AT.Explicit if kind == "explicit" else AT.Auto,))


class _Model(nnx.Module):
    """User layers (not placed on the mesh) around the MoE layer."""

    def __init__(self, mesh, rngs):
        self.inp = nnx.Linear(H, H, rngs=rngs)
        self.moe = MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
                       shared_ffn_hidden=16, backend="reference", rngs=rngs)
        self.head = nnx.Linear(H, 5, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        y, stats = self.moe(h)
        return self.head(h + y), stats


def _loss(model, x, t):
    logits, stats = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean() + \
        1e-2 * stats.aux_loss


def _data():
    x = jax.random.normal(jax.random.key(1), (4, 16, H))
    t = jax.random.randint(jax.random.key(2), (4, 16), 0, 5)
    return x, t


def _run(kind, use_set_mesh):
    """Forward, nnx.grad and two optax steps; returns their results as numpy."""
    mesh = _mesh(kind)
    ctx = jax.set_mesh(mesh) if use_set_mesh else contextlib.nullcontext()
    with ctx:
        model = _Model(mesh, nnx.Rngs(0))
        x, t = _data()
        out, stats = nnx.jit(lambda m, x: m(x))(model, x)
        grads = nnx.jit(nnx.grad(_loss))(model, x, t)
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, t):
            loss, g = nnx.value_and_grad(_loss)(model, x, t)
            optimizer.update(model, g)
            return loss

        losses = [float(step(model, optimizer, x, t)) for _ in range(2)]
    g = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(grads)}
    return np.asarray(out), np.asarray(stats.load), g, losses


_RUNS = {}  # each configuration compiles once per session


def _cached(kind, use_set_mesh):
    if (kind, use_set_mesh) not in _RUNS:
        _RUNS[kind, use_set_mesh] = _run(kind, use_set_mesh)
    return _RUNS[kind, use_set_mesh]


def _baseline():
    return _cached("auto", False)


@pytest.mark.parametrize("use_set_mesh", [False, True], ids=["no_set_mesh", "set_mesh"])
@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_forward_grad_and_train_step_on_every_mesh_kind(kind, use_set_mesh):
    out, load, grads, losses = _cached(kind, use_set_mesh)
    want_out, want_load, want_grads, want_losses = _baseline()
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(load, want_load)
    assert set(grads) == set(want_grads)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), name
        np.testing.assert_allclose(g, want_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[1] < losses[0]


def test_explicit_mesh_output_takes_the_input_sharding():
    """An input on no mesh gets a replicated output (so the user's unplaced layers can take
    gradients through it); an input on the mesh gets its own spec back."""
    mesh = _mesh("explicit")
    moe = MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
              backend="reference", rngs=nnx.Rngs(0))
    x, _ = _data()
    fwd = nnx.jit(lambda m, x: m(x)[0])
    free = fwd(moe, x)
    assert free.sharding.spec == P() or all(s is None for s in free.sharding.spec)
    for spec in (P("ep"), P(None, "ep")):
        placed = fwd(moe, jax.device_put(x, NamedSharding(mesh, spec)))
        assert placed.sharding.spec == P(*spec, *([None] * (3 - len(spec))))
        np.testing.assert_array_equal(np.asarray(placed), np.asarray(free))


def test_explicit_mesh_sharded_batch_with_placed_user_layers():
    """The data-parallel way on an Explicit mesh without set_mesh: the batch is sharded
    over the EP axis and place_on_mesh puts the user's layers on the mesh."""
    mesh = _mesh("explicit")
    model = _Model(mesh, nnx.Rngs(0))
    place_on_mesh(mesh, model)
    x, t = _data()
    x, t = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, t))
    grads = nnx.jit(nnx.grad(_loss))(model, x, t)
    _, _, want, _ = _baseline()
    for k, v in nnx.to_flat_state(grads):
        name = "/".join(map(str, k))
        np.testing.assert_allclose(np.asarray(v[...]), want[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
