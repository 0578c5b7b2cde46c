"""Exchanges on the side stream (``Buffer(side_stream=True)``) on the GPUs.

The normal ops give bitwise the results they give on XLA's compute stream (with their
VJPs), and so does a chain of ``jax_ep.beside`` calls (forward and backward, also inside
``lax.scan``), at every EP size the run has (ranks sharing a GPU included); the compiled
program puts the compute placed beside an exchange between its launch and its join; the
micro-batched layer on the side stream equals the serial layer. Fresh random routing with
-1 slots, uneven per rank, 0, 1, 2 and 96 tokens.
"""

from __future__ import annotations

import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness as h

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"tests/gpu overlap seed: JAX_EP_TEST_SEED={SEED}")

_side_buffers = {}


def _side_buffer(R):
    """One side-stream Buffer per EP size."""
    if R not in _side_buffers:
        _side_buffers[R] = h.new_buffer(R, num_nvl_bytes=64 << 20, side_stream=True)
    return _side_buffers[R]


def _bits_equal(name, got, want):
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        assert g.shape == w.shape, (name, i, g.shape, w.shape)
        assert np.array_equal(h.bits(g), h.bits(w)), f"{name}: leaf {i} differs"


def _normal_chain(buf, E):
    """Dispatch (expert layout) -> a matmul -> weighted combine, and the VJP of the chain
    (dispatch's backward is a combine, combine's a cached dispatch): every normal op."""
    def f(x, idx, w, m):
        def chain(x):
            r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=h.AXIS, layout="expert",
                                buffer=buf, backend="cuda")
            y = jnp.dot(r.recv_x, m).astype(x.dtype)
            return jax_ep.combine(y, r.handle, r.recv_topk_weights), r
        out, vjp, r = jax.vjp(chain, x, has_aux=True)
        (dx,) = vjp(jnp.ones_like(out))
        return out, dx, r.recv_x, r.group_sizes, r.handle.arrays
    return f


@pytest.mark.parametrize("T", [0, 1, 96])
@pytest.mark.parametrize("R", h.RANKS)
def test_normal_ops_on_the_side_stream_equal_the_compute_stream(R, T):
    H, K, E = 256, 4, 8 * R
    rng = h.rng(SEED, "side-normal", R, T)
    idx, w = h.routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    m = np.stack([rng.standard_normal((H, H)).astype(jnp.bfloat16) / 16] * R)
    want = h.run(_normal_chain(h.buffer(R), E), R, x, idx, w, m)
    got = h.run(_normal_chain(_side_buffer(R), E), R, x, idx, w, m)
    _bits_equal("side vs compute stream", got, want)
    if T:
        assert np.any(np.asarray(got[0], np.float32) != 0)


def _beside_chain(buf, E, use_beside, matmul=False):
    """Two micro-batches: B's dispatch beside A's experts, A's combine beside B's experts,
    B's combine; the output and the gradients of ``sum(out * c)`` (the backward exchanges
    beside the experts' backward). The experts scale each row by ``m[0]`` (one rounding per
    element, so the two programs must agree bitwise outside reductions) or, with
    ``matmul``, multiply by ``m`` (whose split-K XLA tunes per program)."""
    def f(x, idx, w, m, c):
        def experts(r):
            if matmul:
                return jnp.dot(r, m).astype(r.dtype)
            return r * m[0]

        def loss(x, w, m):
            half = x.shape[0] // 2
            kw = dict(num_experts=E, axis_name=h.AXIS, layout="expert", buffer=buf,
                      backend="cuda")
            da = jax_ep.dispatch(x[:half], idx[:half], w[:half], **kw)

            def dispatch_b():
                return jax_ep.dispatch(x[half:], idx[half:], w[half:], **kw)

            def combine_a(ya):
                return jax_ep.combine(ya, da.handle, da.recv_topk_weights)
            if use_beside:
                db, ya = jax_ep.beside(dispatch_b, experts, da.recv_x)
                oa, yb = jax_ep.beside(lambda: combine_a(ya), experts, db.recv_x)
            else:
                db, ya = dispatch_b(), experts(da.recv_x)
                oa, yb = combine_a(ya), experts(db.recv_x)
            ob = jax_ep.combine(yb, db.handle, db.recv_topk_weights)
            out = jnp.concatenate([oa, ob]).astype(jnp.float32)
            return jnp.sum(out * c), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, m)
        return out, grads
    return f


def _compare(name, got, want):
    """Bitwise for what only moves and scales rows (the output, the gradient of x);
    tolerance for the weights' and m's gradients (sums XLA may order per program)."""
    (out, (dx, dw, dm)), (out_w, (dx_w, dw_w, dm_w)) = got, want
    _bits_equal(name, (out, dx), (out_w, dx_w))
    for label, g, w in (("d topk_weights", dw, dw_w), ("d m", dm, dm_w)):
        assert h.rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) < 1e-5, label


def _beside_inputs(R, T, tag):
    H, K, E = 256, 4, 8 * R
    rng = h.rng(SEED, tag, R, T)
    idx, w = h.routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    m = np.stack([rng.standard_normal((H, H)).astype(jnp.bfloat16) / 16] * R)
    c = rng.standard_normal((R, T, H)).astype(np.float32)
    return E, (x, idx, w, m, c)


@pytest.mark.parametrize("T", [2, 96])
@pytest.mark.parametrize("R", h.RANKS)
def test_beside_on_the_side_stream_equals_the_serial_chain(R, T):
    E, args = _beside_inputs(R, T, "beside")
    want = h.run(_beside_chain(h.buffer(R), E, False), R, *args)
    got = h.run(_beside_chain(_side_buffer(R), E, True), R, *args)
    _compare("beside on the side stream vs serial", got, want)
    assert np.any(np.asarray(got[0]) != 0) and np.any(np.asarray(got[1][0], np.float32) != 0)
    want = h.run(_beside_chain(h.buffer(R), E, False, matmul=True), R, *args)
    got = h.run(_beside_chain(_side_buffer(R), E, True, matmul=True), R, *args)
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        assert h.rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) < 1e-2, i


@pytest.mark.parametrize("R", h.RANKS)
def test_beside_in_a_scanned_loop_reuses_its_slots(R):
    """A launch and its join alternate at run time on one slot, step after step."""
    E, (x, idx, w, m, c) = _beside_inputs(R, 32, "beside-scan")

    def steps(buf, use_beside):
        chain = _beside_chain(buf, E, use_beside)

        def f(x, idx, w, m, c):
            def step(carry, _):
                out, grads = chain(carry, idx, w, m, c)
                return out.astype(jnp.bfloat16) / 4, (out, grads)
            return jax.lax.scan(step, x, None, length=5)[1]
        return f
    want = h.run(steps(h.buffer(R), False), R, x, idx, w, m, c)
    got = h.run(steps(_side_buffer(R), True), R, x, idx, w, m, c)
    _compare("beside in lax.scan vs serial", got, want)


def test_compiled_schedule_puts_the_matmul_between_launch_and_join():
    """In the compiled program each side-stream launch is joined, and the matmul placed
    beside it sits between the two in XLA's schedule, forward and backward."""
    import importlib.util
    import pathlib
    import sys

    if h.distributed():
        pytest.skip("one process: the compiled HLO of a local mesh")
    bench = pathlib.Path(__file__).parents[2] / "bench"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("overlap_probe", bench / "overlap_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    R = 1
    E, args = _beside_inputs(R, 64, "hlo")
    mesh = h.mesh(R)
    f = _beside_chain(_side_buffer(R), E, True, matmul=True)
    pspec = jax.sharding.PartitionSpec(h.AXIS)
    sm = jax.jit(jax.shard_map(
        lambda *a: jax.tree.map(lambda v: v[None], f(*[v[0] for v in a])), mesh=mesh,
        in_specs=pspec, out_specs=pspec))
    text = sm.lower(*[h.put(mesh, a) for a in args]).compile().as_text()
    out_dir = os.environ.get("JAX_EP_HLO_DIR")  # the run's evidence (bench/run_gpu.sh)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "hlo_beside_chain.txt"), "w") as fh:
            fh.write(text)
    report = probe.schedule_report(text)
    pairs = report["pairs"]
    print(f"compiled: {len(pairs)} side-stream launches "
          f"{[(p['op'], p['launch_at'], p['join_at']) for p in pairs]}; matmuls "
          f"{[(g['name'], g['at']) for g in report['gemms']]}")
    assert pairs and all(p["join_at"] is not None and p["join_at"] > p["launch_at"]
                         for p in pairs)
    # forward: dispatch B and combine A each with a matmul inside; backward: the combine of
    # B's dispatch backward and the cached dispatch of A's combine backward as well
    holding = {i for i, p in enumerate(pairs)
               if any(p["launch_at"] < g["at"] < p["join_at"] for g in report["gemms"])}
    ops = sorted({pairs[i]["op"] for i in holding})
    assert len(holding) >= 4 and ops == ["jax_ep_cached_dispatch", "jax_ep_combine",
                                         "jax_ep_dispatch"], (holding, pairs)


def test_a_dispatch_of_sliced_operands_is_compiled_once():
    """XLA wraps a custom call whose operands are slices into a dynamic-slice fusion; the
    side-stream launch must not leave its original behind (a second launch)."""
    if h.distributed():
        pytest.skip("one process: the compiled HLO of a local mesh")
    R, T, H, K, E = 1, 64, 256, 4, 8
    mesh = h.mesh(R)
    rng = h.rng(SEED, "sliced")
    idx, w = h.routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    pspec = jax.sharding.PartitionSpec(h.AXIS)
    counts = {}
    for label, buf in (("xla stream", h.buffer(R)), ("side stream", _side_buffer(R))):
        def f(x, idx, w, buf=buf):
            r = jax_ep.dispatch(x[0, 16:48], idx[0, 16:48], w[0, 16:48], num_experts=E,
                                axis_name=h.AXIS, layout="expert", buffer=buf, backend="cuda")
            return r.recv_x[None]
        sm = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=pspec, out_specs=pspec))
        text = sm.lower(*[h.put(mesh, a) for a in (x, idx, w)]).compile().as_text()
        counts[label] = len(re.findall(r'custom_call_target="jax_ep_dispatch(_on_side_stream)?"',
                                       text))
    print(f"dispatch custom calls in the compiled program: {counts}")
    out_dir = os.environ.get("JAX_EP_HLO_DIR")  # the run's evidence (bench/run_gpu.sh)
    if out_dir:  # the XLA-stream count too: a 2 there is the same exchange run twice
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sliced_dispatch_counts.txt"), "w") as fh:
            fh.write(f"{counts}\n")
    assert counts["side stream"] == 1, counts


@pytest.mark.parametrize("exchange,expert_capacity", [("expert", None), ("rank", 256)])
def test_micro_batched_layer_on_the_side_stream_equals_the_serial_layer(exchange,
                                                                        expert_capacity):
    from flax import nnx

    from jax_ep.flax import MoE

    R = 1  # the layer's statistics are XLA psums: one rank (NCCL refuses shared GPUs)
    if h.distributed():
        pytest.skip("one process")
    T, H, F, E, K = 256, 256, 128, 8, 4
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((R * T, H)).astype(jnp.bfloat16)
    results = []
    for micro_batches, buf in ((1, h.buffer(R)), (2, _side_buffer(R))):
        layer = MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=h.mesh(R),
                    exchange=exchange, expert_capacity=expert_capacity,
                    micro_batches=micro_batches, buffer=buf, backend="cuda",
                    dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

        def loss(m, x):
            out, stats = m(x)
            return jnp.sum(out.astype(jnp.float32) ** 2), (out, stats)
        (_, (out, stats)), (gm, gx) = nnx.jit(
            nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, h.put(h.mesh(R), x))
        results.append(h.fetch((out, stats, gx, {k: v[...] for k, v in gm.items()})))
    (o1, s1, gx1, gm1), (o2, s2, gx2, gm2) = results
    assert int(s1.dropped) == int(s2.dropped) == 0
    np.testing.assert_array_equal(s1.load, s2.load)
    if exchange == "expert":  # same rows, same experts, same order of each token's sum
        _bits_equal("micro-batched vs serial layer", o2, o1)
    assert h.rel_err(np.asarray(o2, np.float32), np.asarray(o1, np.float32)) < 1e-2
    assert h.rel_err(np.asarray(gx2, np.float32), np.asarray(gx1, np.float32)) < 2e-2
    for name, g in gm1.items():
        assert h.rel_err(np.asarray(gm2[name], np.float32), np.asarray(g, np.float32)) < 2e-2, \
            name
