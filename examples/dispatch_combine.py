"""Smallest end-to-end jax_ep run: dispatch -> per-expert function -> combine.

Runs on 8 simulated CPU devices by default (reference backend), or on the GPUs
of the machine with the CUDA kernels when they are built. Checks the result
against a dense computation and prints it.

    python examples/dispatch_combine.py
    python examples/dispatch_combine.py --gpu       # the GPUs and the CUDA kernels
"""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true",
                   help="use the machine's GPUs (default: 8 simulated CPU devices)")
    return p.parse_args(argv)


# Parsed before jax is imported: --help prints and exits without starting anything, and
# the simulated devices must be requested before jax starts.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.gpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402


def main():
    num_ranks = len(jax.devices())
    tokens, hidden, num_experts, top_k = 64, 256, 4 * num_ranks, 4
    local = num_experts // num_ranks
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("ep",))
    buffer = jax_ep.Buffer(mesh, "ep")
    key = jax.random.PRNGKey(0)
    kx, kr, ks = jax.random.split(key, 3)
    x = jax.random.normal(kx, (num_ranks * tokens, hidden), jnp.float32).astype(jnp.bfloat16)
    scores = jax.nn.softmax(jax.random.normal(kr, (num_ranks * tokens, num_experts)), axis=-1)
    topk_weights, topk_idx = jax.lax.top_k(scores, top_k)
    topk_idx = topk_idx.astype(jnp.int32)
    expert_scale = jax.random.uniform(ks, (num_experts,), minval=0.5, maxval=2.0)

    def moe(x, topk_idx, topk_weights):
        r = jax_ep.dispatch(x, topk_idx, topk_weights, num_experts=num_experts, axis_name="ep",
                            layout="expert", buffer=buffer)
        # "experts": row i belongs to local expert recv_topk_idx[i]
        first = jax.lax.axis_index("ep") * local
        e = jnp.where(r.recv_topk_idx >= 0, first + r.recv_topk_idx, 0)
        y = (r.recv_x.astype(jnp.float32) * expert_scale[e][:, None]).astype(x.dtype)
        out = jax_ep.combine(y, r.handle, r.recv_topk_weights)
        return out, r.num_recv_tokens[None], r.num_overflow[None]

    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.device_put(a, sharding) for a in (x, topk_idx, topk_weights)]
    step = jax.jit(jax.shard_map(moe, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    out, received, overflow = step(*args)

    out = np.asarray(out.astype(jnp.float32))
    dense = np.sum(np.asarray(topk_weights)[..., None] *
                   np.asarray(expert_scale)[np.asarray(topk_idx)][..., None] *
                   np.asarray(x.astype(jnp.float32))[:, None, :], axis=1)
    err = float(np.max(np.abs(out - dense)))
    print(f"backend: {buffer.backend}, ranks: {num_ranks}, devices: {jax.devices()[0].platform}")
    print(f"rows received per rank: {np.asarray(received).tolist()}, "
          f"dropped: {int(np.sum(overflow))}")
    print(f"out[0, :4] = {out[0, :4].round(4).tolist()}")
    print(f"max |jax_ep - dense| = {err:.4f} (bf16 output)")
    buffer.close()
    if err > 0.05 or int(np.sum(overflow)):
        sys.exit("result does not match the dense computation")


if __name__ == "__main__":
    main()
