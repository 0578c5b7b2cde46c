"""Runs a per-rank function under shard_map on the first R devices and splits results per rank."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "ep"


def mesh(num_ranks: int):
    devices = jax.devices()[:num_ranks]
    assert len(devices) == num_ranks, f"need {num_ranks} devices, have {len(jax.devices())}"
    return jax.sharding.Mesh(np.array(devices), (AXIS,))


def _stack(arrays):
    return np.concatenate([np.asarray(a)[None] for a in arrays])


def run(fn, num_ranks: int, *per_rank_inputs, jit: bool = True):
    """``fn`` gets one rank's arrays; each input is a list (one entry per rank).

    Returns the outputs of ``fn`` as a pytree whose leaves are lists (one per rank)."""
    m = mesh(num_ranks)
    sharding = NamedSharding(m, P(AXIS))

    def put(per_rank):
        return jax.device_put(jnp.asarray(_stack(per_rank)), sharding)

    args = [jax.tree.map(lambda *leaves: put(leaves), *inp) if isinstance(inp[0], tuple)
            else put(inp) for inp in per_rank_inputs]

    def body(*xs):
        xs = jax.tree.map(lambda a: a[0], xs)
        out = fn(*xs)
        return jax.tree.map(lambda a: jnp.asarray(a)[None], out)

    f = jax.shard_map(body, mesh=m, in_specs=P(AXIS), out_specs=P(AXIS))
    if jit:
        f = jax.jit(f)
    out = f(*args)
    return jax.tree.map(lambda a: [np.asarray(a)[r] for r in range(num_ranks)], out)


def random_routing(rng, num_ranks, num_tokens, num_topk, num_experts, mask_prob=0.15,
                   skew=False):
    """Per-rank top-k ids (distinct per token) with some -1 slots; ``skew`` favours rank 0."""
    idxs = []
    for _ in range(num_ranks):
        scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1
        if skew:
            scores[:, : max(1, num_experts // num_ranks)] *= 4
        idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int32)
        idx[rng.random(idx.shape) < mask_prob] = -1
        idxs.append(idx)
    return idxs


def random_tokens(rng, num_ranks, num_tokens, hidden, dtype=np.float32):
    return [rng.standard_normal((num_tokens, hidden)).astype(dtype) for _ in range(num_ranks)]


def random_weights(rng, num_ranks, num_tokens, num_topk):
    return [rng.random((num_tokens, num_topk)).astype(np.float32) for _ in range(num_ranks)]
