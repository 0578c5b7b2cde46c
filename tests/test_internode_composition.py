"""The internode path's composition on CPU: ``jax_ep.backends.cuda.internode`` with its two
primitives (the NVSHMEM rail exchange, the NVLink node hop) replaced by pure-JAX stand-ins
with the same contracts, against the reference backend with the same node size. The GPU
tests (tests/gpu/test_internode_gpu.py) run the real kernels; this keeps the bookkeeping
around them (row merge, handles, combine order, gradients) under CPU CI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep.backends import reference
from jax_ep.backends.cuda import internode
from jax_ep.types import DispatchConfig, HandleArrays
from tests import harness

I32 = jnp.int32


def _rail_exchange(send_mask, arrays, cfg, op, per_node_rows, what):
    """The rail exchange's contract on ``all_to_all``: rows reach the rank with this local
    index on each node where ``send_mask`` says so, zeros and flag 0 elsewhere."""
    del op, what
    G = cfg.node_size
    N, T = send_mask.shape
    R = cfg.num_ranks
    me = jax.lax.axis_index(cfg.axis_name)
    dest_node = jnp.arange(R) // G
    to_rail = (jnp.arange(R) % G) == me % G  # [R]: the rail peers

    keep = (send_mask[dest_node] > 0) & to_rail[:, None]  # [R, T]

    def slab(rows):  # [R, T, ...]: what rank r gets
        return jnp.where(keep.reshape(keep.shape + (1,) * (rows.ndim - 2)), rows, 0)

    def per_rank(a):
        return a[dest_node] if per_node_rows else jnp.broadcast_to(a[None], (R,) + a.shape)

    def exchange(x):
        got = jax.lax.all_to_all(x, cfg.axis_name, 0, 0, tiled=False)
        return got[jnp.arange(N) * G + me % G]  # [N, T, ...] from the rail peers

    flags = exchange(slab(send_mask.astype(I32)[dest_node]))
    return flags, tuple(exchange(slab(per_rank(a))) for a in arrays)


def _global_cfg(node_cfg, cfg):
    return dataclasses.replace(node_cfg, num_ranks=cfg.num_ranks,
                               num_experts=cfg.num_experts, node_size=None)


def _node_base(cfg):
    G = cfg.node_size
    return (jax.lax.axis_index(cfg.axis_name) // G * G).astype(I32)


def _to_node_handle(h, cfg):
    base, G = _node_base(cfg), cfg.node_size
    send_pos = h.send_pos
    if cfg.layout == "rank":  # [T, R] -> this node's columns [T, G]
        send_pos = jax.lax.dynamic_slice_in_dim(send_pos, base, G, axis=1)
    return HandleArrays(jnp.where(h.recv_src_rank >= 0, h.recv_src_rank - base, -1),
                        h.recv_src_token, h.recv_src_slot, send_pos)


def _to_global_handle(h, cfg):
    base, R = _node_base(cfg), cfg.num_ranks
    send_pos = h.send_pos
    if cfg.layout == "rank":
        full = jnp.full((send_pos.shape[0], R), -1, I32)
        send_pos = jax.lax.dynamic_update_slice_in_dim(full, send_pos, base, axis=1)
    return HandleArrays(jnp.where(h.recv_src_rank >= 0, h.recv_src_rank + base, -1),
                        h.recv_src_token, h.recv_src_slot, send_pos)


def _node_hop_stand_ins(cfg):
    """The NVLink hop over this node's ranks, on the reference backend over the whole axis
    (a hop's experts are its own node's, so its rows stay inside the node)."""
    L = cfg.num_local_experts

    def dispatch_with_totals(payload, local_idx, w, node_cfg):
        gcfg = _global_cfg(node_cfg, cfg)
        node_expert0 = _node_base(cfg) * L
        idx = jnp.where(local_idx >= 0, local_idx + node_expert0, -1)
        outs = reference.dispatch(payload, idx, w, gcfg)
        counts = jnp.zeros((cfg.num_experts,), I32).at[jnp.where(idx >= 0, idx, cfg.num_experts)
                                                       .reshape(-1)].add(1, mode="drop")
        totals = jax.lax.psum(counts, cfg.axis_name)
        me = jax.lax.axis_index(cfg.axis_name)
        needed = jax.lax.dynamic_slice_in_dim(totals, me * L, L)
        if node_cfg.layout == "rank":
            needed = jnp.zeros_like(needed)
        return outs[:7] + (_to_node_handle(outs[7], cfg), needed)

    def cached_dispatch(x, h, node_cfg):
        return reference.cached_dispatch(x, _to_global_handle(h, cfg), _global_cfg(node_cfg, cfg))

    def combine(y, weights, h, node_cfg):
        return reference.combine(y, weights, _to_global_handle(h, cfg), _global_cfg(node_cfg, cfg))

    return dispatch_with_totals, cached_dispatch, combine


@pytest.fixture
def stand_ins(monkeypatch):
    def install(cfg):
        d, c, m = _node_hop_stand_ins(cfg)
        monkeypatch.setattr(internode, "_rail_exchange", _rail_exchange)
        monkeypatch.setattr(internode.normal, "dispatch_with_totals", d)
        monkeypatch.setattr(internode.normal, "cached_dispatch", c)
        monkeypatch.setattr(internode.normal, "combine", m)
    return install


def _cfg(R, G, T, K, E, layout, cap, align=1):
    return DispatchConfig(num_experts=E, num_ranks=R, axis_name=harness.AXIS, layout=layout,
                          capacity=cap, expert_alignment=align, num_tokens=T, num_topk=K,
                          backend="cuda", buffer_id=1, node_size=G)


CASES = [(4, 2, "rank", None, 1), (4, 2, "expert", None, 4), (4, 1, "rank", 5, 1),
         (4, 1, "expert", 7, 1), (8, 2, "expert", 12, 2), (8, 4, "rank", None, 1),
         (2, 1, "expert", None, 1)]


@pytest.mark.parametrize("R,G,layout,cap,align", CASES)
def test_dispatch_combine_and_cached_dispatch_match_the_reference(stand_ins, R, G, layout, cap, align):
    T, K, E, H = 6, 3, 4 * R, 16
    rng = np.random.default_rng(R * 100 + G * 10 + (cap or 0))
    xs = harness.random_tokens(rng, R, T, H)
    idxs = harness.random_routing(rng, R, T, K, E)
    ws = harness.random_weights(rng, R, T, K)
    if cap is None:
        from jax_ep.ops import default_capacity
        cap = default_capacity(T, R, K, E // R, layout, align)
    cfg = _cfg(R, G, T, K, E, layout, cap, align)
    stand_ins(cfg)

    def run(module):
        def fn(x, idx, w):
            outs = module.dispatch((x,), idx, w, cfg)
            (rx,), ridx, rw = outs[:3]
            handle = outs[7]
            y = jnp.tanh(rx) * 2.0
            row_w = rw if layout == "expert" else jnp.sum(rw, axis=1)
            back = module.combine(y, row_w, handle, cfg)
            again = module.cached_dispatch(x * 3.0, handle, cfg)
            fields = (handle.recv_src_rank, handle.recv_src_token, handle.recv_src_slot)
            return outs[:7], fields, back, again
        return fn

    got = harness.run(run(internode), R, xs, idxs, ws)
    want = harness.run(run(reference), R, xs, idxs, ws)
    for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[3], want[3])  # cached dispatch moves rows: bitwise
    np.testing.assert_array_equal(got[2], want[2])  # node order on both sides: bitwise here


def test_node_sums_follow_the_node_order(stand_ins):
    """Values whose sum depends on the order: the internode combine must add the nodes'
    partials as the reference's node-ordered sum does, not in rank order."""
    R, G, T, K, E, H = 4, 2, 1, 4, 4, 1
    cfg = _cfg(R, G, T, K, E, "expert", 16)
    stand_ins(cfg)
    xs = [np.zeros((T, H), np.float32)] * R
    idxs = [np.array([[0, 1, 2, 3]], np.int32)] * R  # every token on every rank's expert

    def fn(module, vals):
        def f(x, idx):
            outs = module.dispatch((x,), idx, jnp.ones((T, K), jnp.float32), cfg)
            me = jax.lax.axis_index(harness.AXIS)
            y = jnp.where(outs[1][:, None] >= 0, jnp.asarray(vals, jnp.float32)[me], 0.0)
            return module.combine(y, None, outs[7], cfg)
        return f

    vals = [1e8, 1.0, -1e8, 1.0]  # (1e8 + 1) + (-1e8 + 1) = 0; rank order gives 1
    got = harness.run(fn(internode, vals), R, xs, idxs)
    want = harness.run(fn(reference, vals), R, xs, idxs)
    np.testing.assert_array_equal(got, want)
    assert float(np.asarray(got)[0, 0, 0]) == 0.0


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_gradients_through_the_custom_vjps_match_the_reference(stand_ins, layout):
    """dispatch's backward is an internode combine, combine's a cached dispatch."""
    from jax_ep import ops

    R, G, T, K, E, H = 4, 2, 5, 2, 8, 8
    rng = np.random.default_rng(3)
    xs = harness.random_tokens(rng, R, T, H)
    idxs = harness.random_routing(rng, R, T, K, E)
    ws = harness.random_weights(rng, R, T, K)
    gs = harness.random_tokens(rng, R, T, H)
    cap = 4 * T if layout == "rank" else 2 * T * K
    cuda_cfg = _cfg(R, G, T, K, E, layout, cap)
    stand_ins(cuda_cfg)

    def grads(cfg):
        def loss(x, w, idx, g):
            outs, _ = ops._dispatch(cfg, None, (x,), idx, w, ())  # no jax_ep.beside compute
            (rx,), rw, handle = outs[0], outs[2], outs[7]
            row_w = rw if layout == "expert" else jnp.sum(rw, axis=1)
            out, _ = ops._combine_weighted(cfg, None, jnp.tanh(rx) * 1.5, row_w, handle, ())
            return jnp.sum(out * g)
        return lambda x, w, idx, g: jax.grad(loss, argnums=(0, 1))(x, w, idx, g)

    got = harness.run(grads(cuda_cfg), R, xs, ws, idxs, gs)
    want = harness.run(grads(dataclasses.replace(cuda_cfg, backend="reference")), R,
                       xs, ws, idxs, gs)
    for name, a, b in zip(("dx", "dw"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
