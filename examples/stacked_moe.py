"""Stacked MoE layers: nnx.vmap to create them, nnx.scan to run them, orbax to save them.

A model of ``--layers`` residual MoE blocks whose parameters are stacked on a leading
layer dim (``[L, E, H, F]`` experts, sharded over "ep" on the expert dim), between two
user layers (``nnx.Linear``), trained for a few steps on a toy regression task. It shows:

- ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: None})`` to create the stack:
  the layer dim is added unsharded to each parameter's sharding names, so the stacked
  experts are ``P(None, "ep", None, None)``. Without it the names still say
  ``P("ep", None, None)`` for the 4-D arrays and restoring the model fails (orbax:
  ``IndivisibleError``, the layer dim sharded over "ep").
- ``nnx.scan`` over the stack. The layers use ``expert_capacity`` (dense batched matmuls);
  ``jax.lax.ragged_dot`` (``expert_capacity=None``) cannot be vmapped.
- ``jax_ep.flax.place_on_mesh``: the user layers are replicated on the mesh before the
  first step, so the train step compiles once (it counts its traces).
- an orbax save/restore round trip: the restore target is ``nnx.eval_shape`` of the model
  with ``nnx.get_named_sharding``'s shardings, so each process reads its own shards.

Run::

    PYTHONPATH=. python3 examples/stacked_moe.py              # 8 simulated CPU devices
    PYTHONPATH=. python3 examples/stacked_moe.py --steps 3 --layers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="stacked MoE blocks")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--tokens", type=int, default=256, help="tokens per step")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--checkpoint-dir", help="where orbax writes (default: a temporary dir)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jax_ep.flax import MoE, place_on_mesh

    devices = jax.devices()[: args.devices]
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    R, H, E, K = len(devices), args.dim, args.experts, 2
    # rows per local expert: 1.5x the balanced load (see MoE's expert_capacity)
    capacity = -(-3 * R * (args.tokens // R) * K // (2 * E))

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(H, H, rngs=rngs)        # user layers, not on the mesh
            self.out = nnx.Linear(H, H, rngs=rngs)

            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def make(rngs):
                return MoE(hidden=H, ffn_hidden=2 * H, num_experts=E, top_k=K, mesh=mesh,
                           expert_capacity=capacity, backend="reference", rngs=rngs)

            self.moe = make(rngs.split(args.layers))

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            def blocks(moe, h):
                y, stats = moe(h)
                return h + y, stats.dropped

            h, dropped = blocks(self.moe, self.inp(x))
            return self.out(h), dropped.sum()

    model = Stacked(nnx.Rngs(0))
    print(f"devices: {R}; {args.layers} stacked MoE layers, w_gate "
          f"{model.moe.w_gate.shape} sharded {model.moe.w_gate[...].sharding.spec}")
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    place_on_mesh(mesh, model, optimizer)  # without it: two compilations of the step

    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(1)  # runs once per trace (= compilation)

        def loss_fn(model):
            pred, dropped = model(x)
            return jnp.mean((pred - y) ** 2), dropped

        (loss, dropped), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, dropped

    rng = np.random.default_rng(0)
    target = rng.standard_normal((H, H)).astype(np.float32) / np.sqrt(H)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))
    losses = []
    for _ in range(args.steps):
        x = rng.standard_normal((args.tokens, H)).astype(np.float32)
        y = np.tanh(x @ target)
        loss, dropped = train_step(model, optimizer, jax.device_put(x, sharding),
                                   jax.device_put(y, sharding))
        losses.append(float(loss))
    print(f"{args.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}, dropped rows "
          f"{int(dropped)}, train step compiled {len(traces)} time(s)")

    # orbax: save the model's state, restore it into an abstract model with the shardings
    import orbax.checkpoint as ocp
    folder = args.checkpoint_dir or tempfile.mkdtemp(prefix="jax_ep_stacked_")
    path = os.path.join(os.path.abspath(folder), "state")
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        abstract = nnx.eval_shape(lambda: Stacked(nnx.Rngs(1)))
        graphdef, target_state = nnx.split(abstract)
        shardings = nnx.get_named_sharding(target_state, mesh)  # from the sharding names
        target_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            target_state, shardings)
        restored = nnx.merge(graphdef, ckpt.restore(path, target_state))
    x = jax.device_put(rng.standard_normal((args.tokens, H)).astype(np.float32), sharding)
    fwd = nnx.jit(lambda m, x: m(x)[0])
    same = bool(np.array_equal(np.asarray(fwd(model, x)), np.asarray(fwd(restored, x))))
    print(f"orbax checkpoint {path}: restored w_gate sharded "
          f"{restored.moe.w_gate[...].sharding.spec}; outputs "
          f"{'bitwise equal' if same else 'DIFFER'}")
    if not same or len(traces) != 1:
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
