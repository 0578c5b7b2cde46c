"""Runs one per-rank function on both backends over a mesh of the first R local GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep

AXIS = "ep"
_buffers = {}


def num_gpus() -> int:
    return len([d for d in jax.devices() if d.platform == "gpu"])


def mesh(num_ranks: int):
    return jax.sharding.Mesh(np.array(jax.devices()[:num_ranks]), (AXIS,))


def buffer(num_ranks: int) -> jax_ep.Buffer:
    """One CUDA buffer per EP size, shared by the tests (as a training job would)."""
    if num_ranks not in _buffers:
        _buffers[num_ranks] = jax_ep.Buffer(mesh(num_ranks), AXIS, backend="cuda",
                                            num_nvl_bytes=64 << 20)
    return _buffers[num_ranks]


def shard(per_rank, num_ranks):
    """[R, ...] host array (or tuple of them) -> global array sharded on the leading axis."""
    m = mesh(num_ranks)
    put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(m, P(AXIS)))
    return jax.tree.map(put, per_rank)


def run(fn, num_ranks, *args, jit=True):
    """fn(*per_rank_args) -> pytree; args are [R, ...] sharded arrays. Returns host [R, ...]."""
    def body(*xs):
        xs = jax.tree.map(lambda a: a[0], xs)
        return jax.tree.map(lambda a: jnp.asarray(a)[None], fn(*xs))

    f = jax.shard_map(body, mesh=mesh(num_ranks), in_specs=P(AXIS), out_specs=P(AXIS))
    f = jax.jit(f) if jit else f
    return jax.tree.map(np.asarray, f(*args))


def routing(rng, num_ranks, num_tokens, num_topk, num_experts, mask_prob=0.1):
    """DeepEP-style random top-k (|randn|+1 scores), distinct experts, some -1 slots."""
    scores = np.abs(rng.standard_normal((num_ranks, num_tokens, num_experts))) + 1
    idx = np.argsort(-scores, axis=-1)[..., :num_topk].astype(np.int32)
    if mask_prob:
        idx[rng.random(idx.shape) < mask_prob] = -1
    weights = rng.random((num_ranks, num_tokens, num_topk)).astype(np.float32)
    return idx, weights


def bits(a):
    """Floats (bf16/f8 included) as unsigned ints of the same width: bitwise comparisons."""
    a = np.asarray(a)
    if a.dtype.kind == "f" or a.dtype.name.startswith(("float8", "bfloat16")):
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom else float(np.linalg.norm(a - b))


def ep_size() -> int:
    """EP size of the single-configuration GPU tests: every local GPU, up to the kernels'
    8 ranks (so the same tests run at EP 2, 4 or 8 with the machine); skips below 2."""
    import pytest

    n = min(8, num_gpus())
    if n < 2:
        pytest.skip("needs at least 2 GPUs")
    return n
