"""The benchmarks' inputs: DeepEP's setting (top-k of |randn|+1 scores, random weights,
normal bf16 tokens), built the same on every process, one block per device."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def deepep_inputs(R: int, T: int, H: int, K: int, E: int, seed: int = 0):
    """Host arrays x [R, T, H] bf16, idx [R, T, K] int32, w [R, T, K] f32."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal((R, T, E))) + 1
    idx = np.argsort(-scores, axis=-1)[..., :K].astype(np.int32)
    w = rng.random((R, T, K)).astype(np.float32)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    return x, idx, w


def put_global(mesh, axis: str, *arrays):
    """[R, ...] host arrays -> global arrays sharded on the leading axis; works with one
    process per GPU too (each process keeps its own devices' blocks)."""
    sharding = NamedSharding(mesh, P(axis))
    return tuple(jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                 for v in arrays)
