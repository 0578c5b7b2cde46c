"""Exchanges on the side stream (``Buffer(side_stream=True)``) on the GPUs.

The ops give bitwise the results they give on XLA's compute stream (normal ops with their
VJPs, low-latency split and fused ops), at every EP size the run has (ranks sharing a GPU
included); the compiled program runs each exchange as an async call on another stream; the
micro-batched layer on the side stream equals the serial layer. Fresh random routing with
-1 slots, uneven per rank, 0, 1 and 96 tokens.
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
from jax_ep.backends.cuda import buffer as cuda_buffer
from tests import harness as h

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"tests/gpu overlap seed: JAX_EP_TEST_SEED={SEED}")

LL_M, LL_H, LL_E = 32, 512, 32
_side_buffers = {}


def _side_buffer(R):
    """One side-stream Buffer per EP size, sized for the normal and low-latency tests."""
    if R not in _side_buffers:
        nbytes = max(64 << 20, cuda_buffer.ll_bytes_hint(LL_M, LL_H, LL_E, R))
        _side_buffers[R] = h.new_buffer(R, num_nvl_bytes=nbytes, side_stream=True)
    return _side_buffers[R]


def _ll_buffer(R):
    """The compute-stream counterpart of :func:`_side_buffer` for the low-latency ops."""
    key = ("ll", R)
    if key not in _side_buffers:
        nbytes = max(64 << 20, cuda_buffer.ll_bytes_hint(LL_M, LL_H, LL_E, R))
        _side_buffers[key] = h.new_buffer(R, num_nvl_bytes=nbytes)
    return _side_buffers[key]


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


@pytest.mark.parametrize("R", h.RANKS)
def test_low_latency_ops_on_the_side_stream_equal_the_compute_stream(R):
    T, K = 24, 6
    rng = h.rng(SEED, "side-ll", R)
    idx, w = h.routing(rng, R, T, K, LL_E)
    x = rng.standard_normal((R, T, LL_H)).astype(jnp.bfloat16)

    def ops(buf):
        kw = dict(num_experts=LL_E, max_tokens_per_rank=LL_M, axis_name=h.AXIS,
                  zero_padding=True, buffer=buf, backend="cuda", num_sms=h.ll_num_sms())

        def f(x, idx, w):  # fused, then split with work between the halves, chained by data
            r = jax_ep.low_latency_dispatch(x, idx, **kw)
            y = (r.recv_x.astype(jnp.float32) * 3.0).astype(jnp.bfloat16)
            out = jax_ep.low_latency_combine(y, idx, w, r.handle)
            pending = jax_ep.low_latency_dispatch_send(out, idx, **kw)
            other = jnp.tanh(x.astype(jnp.float32))
            r2 = jax_ep.low_latency_dispatch_recv(pending)
            c = jax_ep.low_latency_combine_send(r2.recv_x, idx, w, r2.handle)
            return out, r2.recv_x, jax_ep.low_latency_combine_recv(c), other[:1]
        return f

    want = h.run(ops(_ll_buffer(R)), R, x, idx, w)
    got = h.run(ops(_side_buffer(R)), R, x, idx, w)
    _bits_equal("low-latency side vs compute stream", got, want)


def test_compiled_program_runs_each_exchange_as_an_async_call():
    """XLA turns each annotated region into call-start/call-done on another stream."""
    if h.distributed():
        pytest.skip("one process: the compiled HLO of a local mesh")
    R, T, H, K, E = 1, 64, 256, 4, 8
    mesh = h.mesh(R)
    f = _normal_chain(_side_buffer(R), E)
    spec = jax.sharding.PartitionSpec(h.AXIS)
    sm = jax.jit(jax.shard_map(
        lambda *a: jax.tree.map(lambda v: v[None], f(*[v[0] for v in a])), mesh=mesh,
        in_specs=spec, out_specs=spec))
    rng = h.rng(SEED, "hlo")
    idx, w = h.routing(rng, R, T, K, E)
    args = (rng.standard_normal((R, T, H)).astype(jnp.bfloat16), idx, w,
            rng.standard_normal((R, H, H)).astype(jnp.bfloat16))
    text = sm.lower(*[h.put(mesh, a) for a in args]).compile().as_text()
    out_dir = os.environ.get("JAX_EP_HLO_DIR")  # the run's evidence (bench/run_gpu.sh)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "hlo_side_stream_chain.txt"), "w") as fh:
            fh.write(text)
    targets = re.findall(r'custom_call_target="(jax_ep_\w+)"', text)
    starts = len(re.findall(r"\bcall-start\(", text))
    print(f"compiled: {len(targets)} jax_ep custom calls {sorted(set(targets))}, "
          f"{starts} call-start")
    # dispatch, combine, and the VJP's combine and cached dispatch: four exchanges
    assert sorted(set(targets)) == ["jax_ep_cached_dispatch", "jax_ep_combine",
                                    "jax_ep_dispatch"]
    assert starts >= len(targets) and len(re.findall(r"\bcall-done\(", text)) == starts


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


def test_grouped_region_call_start_carries_the_group_id():
    """``on_side_stream(f, group=g)``: XLA's stream wrapper copies the call's frontend
    attributes onto call-start and call-done, so both carry the group id and the stream;
    the matmul made under ``scheduling_group(g)`` carries it too. Where the latency-hiding
    scheduler put that matmul is printed (bench/stream_probe.py measures it)."""
    from jax_ep.backends.cuda._stream import on_side_stream, scheduling_group

    if h.distributed():
        pytest.skip("one process: the compiled HLO of one device")
    n = 1024

    def f(a, b, c, d):
        inside = on_side_stream(lambda c, d: c @ d, group=5)(c, d)
        with scheduling_group(5):
            outside = a @ b
        return outside, inside

    rng = np.random.default_rng(SEED)
    args = [jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16) for _ in range(4)]
    lowered = jax.jit(f).lower(*args)
    compiled = lowered.compile(
        compiler_options={"xla_gpu_enable_latency_hiding_scheduler": True})
    text = compiled.as_text()
    out_dir = os.environ.get("JAX_EP_HLO_DIR")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "hlo_grouped_region.txt"), "w") as fh:
            fh.write(text)
    pair = [ln for ln in text.splitlines() if re.search(r"\bcall-(start|done)\(", ln)]
    assert len(pair) == 2, pair
    for ln in pair:
        assert '_scheduling_group_id="5"' in ln and '_xla_stream_annotation="1"' in ln, ln
    order = [i for i, ln in enumerate(text.splitlines())
             if re.search(r"\bcall-(start|done)\(", ln) or (
                 '_scheduling_group_id="5"' in ln and ("__cublas" in ln or "__triton_gemm" in ln))]
    print(f"grouped region: call-start, call-done and the grouped GEMM at lines {order}")
    got = compiled(*args)
    want = (jnp.dot(args[0], args[1]), jnp.dot(args[2], args[3]))
    for g, w in zip(got, want):
        assert h.rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) < 1e-2
