"""The EP axis's nodes: ``Buffer.node_size`` from the topology, and the reference combine's
sum order (each node's ranks, then the nodes: the internode kernels' order), bitwise
against a NumPy oracle, unchanged for one node."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import distributed

R, T, H, E, K = 4, 64, 32, 8, 4


def _mesh():
    return jax.make_mesh((R,), ("ep",), devices=jax.devices("cpu")[:R])


def test_buffer_node_size_follows_hosts_and_the_override(monkeypatch):
    mesh = _mesh()
    monkeypatch.delenv(distributed.NODE_SIZE_ENV, raising=False)
    assert jax_ep.Buffer(mesh, "ep", backend="reference").node_size == R  # one host
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "2")
    assert jax_ep.Buffer(mesh, "ep", backend="reference").node_size == 2
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "3")
    with pytest.raises(ValueError, match="node size 3 must divide the 4 ranks"):
        jax_ep.Buffer(mesh, "ep", backend="reference")


def test_node_size_needs_equal_node_major_domains():
    devs = [type("D", (), {"process_index": p})() for p in (0, 1, 0, 1)]
    mesh = type("M", (), {"devices": np.array(devs, dtype=object), "axis_names": ("ep",)})()
    with pytest.raises(ValueError, match="consecutive ranks"):
        distributed.node_size_of(mesh, "ep", hosts=["a", "b"])
    devs = [type("D", (), {"process_index": p})() for p in (0, 0, 1, 1)]
    mesh.devices = np.array(devs, dtype=object)
    assert distributed.node_size_of(mesh, "ep", hosts=["a", "b"]) == 2


def _combine(buffer):
    mesh = _mesh()

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    def run(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout="rank",
                            buffer=buffer)
        # one row per (token, rank), weighted by the token's slot on this rank
        weights = jnp.sum(jnp.where(r.recv_topk_idx >= 0, r.recv_topk_weights, 0.0), axis=1)
        return jax_ep.combine(r.recv_x, r.handle, weights)
    return run


def test_reference_combine_sums_node_by_node(monkeypatch):
    rng = np.random.default_rng(0)
    scale = (10.0 ** rng.integers(-3, 4, (R * T, 1))).astype(np.float32)
    x = rng.standard_normal((R * T, H)).astype(np.float32) * scale
    # slot r of every token is expert 2r, which lives on rank r: every rank sends one
    # partial row back per token, w[t, r] * x[t]
    idx = np.tile(np.arange(0, E, E // R, dtype=np.int32)[None], (R * T, 1))
    w = rng.random((R * T, K)).astype(np.float32)
    sharding = NamedSharding(_mesh(), P("ep"))
    args = [jax.device_put(a, sharding) for a in (x, idx, w)]
    monkeypatch.delenv(distributed.NODE_SIZE_ENV, raising=False)
    one_node = np.asarray(_combine(jax_ep.Buffer(_mesh(), "ep", backend="reference"))(*args))
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "2")
    two_nodes = np.asarray(_combine(jax_ep.Buffer(_mesh(), "ep", backend="reference"))(*args))

    p = [w[:, r:r + 1] * x for r in range(R)]  # float32 products, as the combine forms them
    want_one = ((p[0] + p[1]) + p[2]) + p[3]
    want_two = (p[0] + p[1]) + (p[2] + p[3])
    np.testing.assert_array_equal(one_node, want_one)
    np.testing.assert_array_equal(two_nodes, want_two)
    assert np.any(want_one != want_two)  # the data tells the two orders apart
