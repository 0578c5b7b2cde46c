"""Overlap on CPU: what the side stream lowers to, jax_ep.beside against calling the two
parts one after the other, the micro-batched layer against the serial one, and the decode
path's shared expert between the dispatch's send and receive.

The GPU side (kernels on the side stream, a profile showing the overlap) is
tests/gpu/test_overlap_gpu.py and bench/overlap_probe.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep.backends.cuda import low_latency as cuda_ll
from jax_ep.backends.cuda import normal as cuda_normal
from jax_ep.flax import MoE
from jax_ep.types import DispatchConfig, LowLatencyConfig
from tests import harness as h

R, T, K, E, H = 4, 8, 2, 8, 32


def _mesh():
    return jax.make_mesh((R,), ("ep",), devices=jax.devices("cpu")[:R])


def _lowered_text(fn, *shapes):
    """StableHLO of ``fn`` per rank under shard_map (lowered only: no kernel runs)."""
    mesh = _mesh()
    wrapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                                    check_vma=False))
    args = [jax.ShapeDtypeStruct((R * s[0],) + s[1:], d, sharding=NamedSharding(mesh, P("ep")))
            for s, d in shapes]
    return wrapped.lower(*args).as_text()


def _calls(text):
    """(target, side_slot or None) of every jax_ep custom call, in program order."""
    out = []
    for line in text.splitlines():
        m = re.search(r"custom_call @(jax_ep_\w+)\(", line)
        if m:
            slot = re.search(r"side_slot = (-?\d+)", line)
            out.append((m.group(1), int(slot.group(1)) if slot else None))
    return out


def _normal_cfg(side_stream, layout="rank"):
    return DispatchConfig(num_experts=E, num_ranks=R, axis_name="ep", layout=layout,
                          capacity=R * T * (K if layout == "expert" else 1),
                          expert_alignment=1, num_tokens=T, num_topk=K, backend="cuda",
                          buffer_id=1, side_stream=side_stream)


def _normal_ops(side_stream):
    cfg = _normal_cfg(side_stream)

    def ops(x, idx):
        out = cuda_normal.dispatch((x,), idx, jnp.ones(idx.shape, jnp.float32), cfg)
        recv_x, handle = out[0][0], out[-1]
        again = cuda_normal.cached_dispatch(x, handle, cfg)
        return cuda_normal.combine(recv_x + again, None, handle, cfg)
    return ops


def test_side_stream_launches_each_normal_op_and_joins_it():
    shapes = [((T, H), jnp.bfloat16), ((T, K), jnp.int32)]
    calls = _calls(_lowered_text(_normal_ops(True), *shapes))
    ops = ["jax_ep_dispatch", "jax_ep_cached_dispatch", "jax_ep_combine"]
    launches = [(n, s) for n, s in calls if n.endswith("_on_side_stream")]
    joins = [(n, s) for n, s in calls if n == "jax_ep_side_stream_join"]
    assert [n for n, _ in launches] == [o + "_on_side_stream" for o in ops]
    slots = [s for _, s in launches]
    assert len(set(slots)) == 3 and min(slots) >= 0  # one slot per call site
    # every launch is joined, before the next op is launched (program order)
    assert calls == [c for s in slots for c in ((launches[slots.index(s)][0], s),
                                                 ("jax_ep_side_stream_join", s))]
    assert [s for _, s in joins] == slots
    # on XLA's stream: the plain handlers with slot -1, no joins
    assert _calls(_lowered_text(_normal_ops(False), *shapes)) == [(o, -1) for o in ops]


def test_low_latency_ops_stay_on_xla_stream():
    """Their overlap is the split form (compute between *_send and *_recv)."""
    cfg = LowLatencyConfig(num_experts=E, num_ranks=R, axis_name="ep", max_tokens_per_rank=T,
                           num_tokens=T, num_topk=K, hidden=H, use_fp8=False,
                           backend="cuda", buffer_id=1)

    def ops(x, idx):
        w = jnp.ones(idx.shape, jnp.float32)
        recv_x, count, handle = cuda_ll.ll_dispatch(x, idx, None, cfg)
        y = cuda_ll.ll_combine(recv_x, idx, w, handle, cfg)
        sent = cuda_ll.ll_dispatch_send(y, idx, cfg)
        recv_x, count, handle = cuda_ll.ll_dispatch_recv(sent, cfg, x.dtype, hidden=H)
        sent_y = cuda_ll.ll_combine_send(recv_x, handle, cfg)
        return cuda_ll.ll_combine_recv(sent_y, idx, w, handle, cfg, x.dtype, H)
    calls = _calls(_lowered_text(ops, ((T, H), jnp.bfloat16), ((T, K), jnp.int32)))
    assert len(calls) == 6 and all(s is None for _, s in calls)
    assert not any("side_stream" in n for n, _ in calls)


def test_buffer_side_stream_is_checked_and_reaches_the_configs():
    mesh = _mesh()
    with pytest.raises(ValueError, match="side_stream must be True or False"):
        jax_ep.Buffer(mesh, "ep", backend="reference", side_stream=1)
    buf = jax_ep.Buffer(mesh, "ep", backend="reference", side_stream=True)
    assert "side_stream=True" in repr(buf)
    seen = {}

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("ep"), P("ep")),
                       out_specs=P("ep"))
    def run(x, idx):
        r = jax_ep.dispatch(x, idx, num_experts=E, axis_name="ep", buffer=buf)
        seen["cfg"] = r.handle.config
        return jax_ep.combine(r.recv_x, r.handle)

    sharded = NamedSharding(mesh, P("ep"))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (R * T, H)), sharded)
    idx = jax.device_put(jnp.zeros((R * T, K), jnp.int32), sharded)
    np.testing.assert_array_equal(jax.jit(run)(x, idx), x)  # one row per (token, rank)
    # the reference backend's exchanges are XLA collectives: the option does not apply
    assert seen["cfg"].side_stream is False


# jax_ep.beside on the CUDA backend's custom calls (lowered only): the compute sits
# between the launch and the join, pinned there by optimization barriers, in the forward
# pass and, with the op's backward exchange, in the backward pass.

def _between(text, slot):
    """The lines of ``text`` between the launch and the join of side-stream ``slot``."""
    lines = text.splitlines()
    at = [i for i, ln in enumerate(lines) if f"side_slot = {slot} :" in ln]
    assert len(at) == 2, (slot, at)
    return lines[at[0] + 1:at[1]]


def _beside_dispatch_program(differentiate):
    def fn(x, idx, m):
        def loss(x, m):
            def exchange():
                return jax_ep.dispatch(x, idx, num_experts=E, axis_name="ep", layout="expert",
                                       backend="cuda", buffer=_FakeBuffer()).recv_x
            recv, y = jax_ep.beside(exchange, lambda z: jnp.tanh(z @ m), x)
            return jnp.sum(recv.astype(jnp.float32)) + jnp.sum(y.astype(jnp.float32))
        if not differentiate:
            return loss(x, m)[None]
        return jax.grad(loss, argnums=(0, 1))(x, m)[0]
    return fn


class _FakeBuffer:
    """What the ops read of a side-stream jax_ep.Buffer, for lowering without GPUs."""
    buffer_id, num_sms, side_stream, axis_name, num_ranks, node_size = 1, 24, True, "ep", R, R
    multi_process = False

    def check_fits(self, cfg, wire):
        pass


def test_beside_puts_the_compute_between_launch_and_join(monkeypatch):
    monkeypatch.setattr(jax_ep.backends, "resolve", lambda backend, buffer, op, **kw: "cuda")
    shapes = [((T, H), jnp.bfloat16), ((T, K), jnp.int32), ((H, H), jnp.bfloat16)]
    text = _lowered_text(_beside_dispatch_program(False), *shapes)
    (launch,) = [s for n, s in _calls(text) if n == "jax_ep_dispatch_on_side_stream"]
    between = "\n".join(_between(text, launch))
    assert between.count("optimization_barrier") == 2
    assert "dot_general" in between and "tanh" in between
    # backward: the dispatch's backward combine is launched, the compute's backward runs,
    # then the combine is joined (one combine per differentiable input: x and the weights)
    text = _lowered_text(_beside_dispatch_program(True), *shapes)
    combines = [s for n, s in _calls(text) if n == "jax_ep_combine_on_side_stream"]
    assert len(combines) == 2
    first = "\n".join(_between(text, combines[0]))
    assert first.count("optimization_barrier") >= 2 and "dot_general" in first


# jax_ep.beside on the reference backend: the same values and gradients as the two parts
# one after the other, with closures, nesting and exchanges that make no op.

def _two_micro_batches(x, idx, w, m, use_beside):
    half = x.shape[0] // 2
    xa, xb, ia, ib, wa, wb = x[:half], x[half:], idx[:half], idx[half:], w[:half], w[half:]
    kw = dict(num_experts=E, axis_name="ep", layout="expert", backend="reference")
    experts = lambda r: jnp.tanh(r @ m)  # noqa: E731  (closes over m: it gets gradients)
    da = jax_ep.dispatch(xa, ia, wa, **kw)
    if use_beside:
        db, ya = jax_ep.beside(lambda: jax_ep.dispatch(xb, ib, wb, **kw), experts, da.recv_x)
        oa, yb = jax_ep.beside(lambda: jax_ep.combine(ya, da.handle, da.recv_topk_weights),
                               experts, db.recv_x)
    else:
        db, ya = jax_ep.dispatch(xb, ib, wb, **kw), experts(da.recv_x)
        oa, yb = jax_ep.combine(ya, da.handle, da.recv_topk_weights), experts(db.recv_x)
    return jnp.concatenate([oa, jax_ep.combine(yb, db.handle, db.recv_topk_weights)])


def _value_and_grad(f):
    def per_rank(x, idx, w, m):
        loss = lambda x, w, m: jnp.sum(f(x, idx, w, m) ** 2)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, m)
    return per_rank


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    idx, w = h.routing(rng, R, T, K, E)
    m = np.stack([rng.standard_normal((H, H)).astype(np.float32) / 8] * R)
    return x, idx, w, m


def test_beside_equals_the_parts_one_after_the_other():
    args = _inputs(5)
    want = h.run_reference(_value_and_grad(
        functools.partial(_two_micro_batches, use_beside=False)), R, *args)
    got = h.run_reference(_value_and_grad(
        functools.partial(_two_micro_batches, use_beside=True)), R, *args)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_beside_under_remat_equals_the_parts_one_after_the_other():
    args = _inputs(7)
    want = h.run_reference(_value_and_grad(
        functools.partial(_two_micro_batches, use_beside=False)), R, *args)
    rematted = jax.checkpoint(functools.partial(_two_micro_batches, use_beside=True))
    got = h.run_reference(_value_and_grad(rematted), R, *args)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_nested_beside_and_an_exchange_without_an_op():
    x, idx, w, m = _inputs(6)

    def f(x, idx, w, m, nested):
        kw = dict(num_experts=E, axis_name="ep", layout="rank", backend="reference")
        d = jax_ep.dispatch(x, idx, w, **kw)
        if not nested:
            c = jax_ep.combine(d.recv_x, d.handle)
            return c + jnp.sin(x @ m) + 2.0 * x
        # the outer compute is itself a beside; the inner exchange makes no jax_ep op
        c, (doubled, s) = jax_ep.beside(
            lambda: jax_ep.combine(d.recv_x, d.handle),
            lambda v: jax_ep.beside(lambda: 2.0 * x, lambda u: jnp.sin(u @ m), v), x)
        return c + s + doubled
    want = h.run_reference(_value_and_grad(functools.partial(f, nested=False)), R, x, idx, w, m)
    got = h.run_reference(_value_and_grad(functools.partial(f, nested=True)), R, x, idx, w, m)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_beside_checks_its_arguments():
    with pytest.raises(TypeError, match="must be callables"):
        jax_ep.beside(jnp.zeros(3), lambda: 0)
    out, res = jax_ep.beside(lambda: 1.0, lambda a: a * 3, jnp.ones(2))  # outside shard_map
    assert out == 1.0
    np.testing.assert_array_equal(res, 3 * np.ones(2))


def _overlap_probe():
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).parents[1] / "bench"
    sys.path.insert(0, str(bench))  # the probe imports trace_summary from beside it
    spec = importlib.util.spec_from_file_location("overlap_probe", bench / "overlap_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Compiled GPU HLO as XLA prints a scheduled module (shapes shortened): a GEMM in a command
# buffer before the launch, the launch (inside the dynamic-slice fusion XLA makes of a
# custom call whose operand is a slice), a Triton GEMM fusion, the join, another GEMM.
_SCHEDULED_HLO = """HloModule jit_body, is_scheduled=true, entry_computation_layout={()->()}

%gemm_fusion_dot.1_computation (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%dynamic-slice-fusion (p0: bf16[16,8]) -> (bf16[8,8]) {
  %p0 = bf16[16,8]{1,0} parameter(0)
  %slice.1 = bf16[8,8]{1,0} slice(%p0), slice={[0:8], [0:8]}
  ROOT %custom-call.1 = (bf16[8,8]{1,0}) custom-call(%slice.1), custom_call_target="jax_ep_dispatch_on_side_stream", api_version=API_VERSION_TYPED_FFI, backend_config={buffer_id = 1 : i64, side_slot = 3 : i64}
}

%command_buffer (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %cublas.5 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  ROOT %gte.5 = bf16[8,8]{1,0} get-tuple-element(%cublas.5), index=0
}

ENTRY %main.9 (a.1: bf16[8,8], b.1: bf16[8,8], c.1: bf16[16,8]) -> (bf16[8,8], bf16[8,8], s32[]) {
  %a.1 = bf16[8,8]{1,0} parameter(0)
  %b.1 = bf16[8,8]{1,0} parameter(1)
  %c.1 = bf16[16,8]{1,0} parameter(2)
  %early = bf16[8,8]{1,0} call(%a.1, %b.1), to_apply=%command_buffer
  %address_computation = (bf16[8,8]{1,0}) fusion(%c.1), kind=kCustom, calls=%dynamic-slice-fusion
  %gemm_fusion_dot.1 = bf16[8,8]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.2 = s32[] custom-call(%address_computation, %a.1), custom_call_target="jax_ep_side_stream_join", custom_call_has_side_effect=true, api_version=API_VERSION_TYPED_FFI, backend_config={side_slot = 3 : i64}
  %late = bf16[8,8]{1,0} call(%a.1, %b.1), to_apply=%command_buffer
  ROOT %tuple = (bf16[8,8]{1,0}, bf16[8,8]{1,0}, s32[]) tuple(%gemm_fusion_dot.1, %late, %custom-call.2)
}
"""


def test_overlap_probe_reads_the_schedule_of_compiled_hlo():
    probe = _overlap_probe()
    report = probe.schedule_report(_SCHEDULED_HLO)
    assert report["scheduled"] and report["entry_instructions"] == 9
    assert report["pairs"] == [dict(op="jax_ep_dispatch", slot=3, launch_at=4, join_at=6)]
    where = {g["name"]: g["where"] for g in report["gemms"]}
    assert where == {"early": ["before jax_ep_dispatch launch"],
                     "gemm_fusion_dot.1": ["between jax_ep_dispatch launch and join"],
                     "late": ["after jax_ep_dispatch join"]}
    kernels = [("gemm", 0.0, 10.0, "Stream #14"), ("gemm", 4.0, 10.0, "Stream #67"),
               ("fusion", 20.0, 1.0, "Stream #14")]
    assert probe.cross_stream_us(kernels) == 6.0


def _layer(micro_batches, **kw):
    return MoE(hidden=H, ffn_hidden=64, num_experts=E, top_k=3, mesh=_mesh(),
               micro_batches=micro_batches, backend="reference", rngs=nnx.Rngs(0), **kw)


def _value_and_grads(moe, x):
    def loss(m, x):
        out, stats = m(x)
        return jnp.sum(out * jnp.cos(out)), (out, stats)
    (_, (out, stats)), grads = nnx.jit(
        lambda m, x: nnx.value_and_grad(loss, has_aux=True, argnums=(0, 1))(m, x))(moe, x)
    return out, stats, grads


@pytest.mark.parametrize("kw,bitwise", [
    (dict(), True),                                    # expert layout, ragged experts
    (dict(shared_ffn_hidden=32), True),
    (dict(expert_capacity=64), False),                 # rank layout, dense slots
    (dict(expert_capacity=64, exchange="expert"), False),
])
@pytest.mark.parametrize("tokens", [4 * 13, 4 * 1])    # odd split; one token per rank
def test_micro_batched_layer_equals_the_serial_layer(kw, bitwise, tokens):
    x = jax.random.normal(jax.random.key(1), (tokens, H))
    out1, stats1, (gm1, gx1) = _value_and_grads(_layer(1, **kw), x)
    out2, stats2, (gm2, gx2) = _value_and_grads(_layer(2, **kw), x)
    for a, b in zip(stats1, stats2):
        np.testing.assert_array_equal(a, b)
    assert int(stats2.dropped) == 0
    if bitwise:  # the same rows meet the same experts; each token sums in the same order
        np.testing.assert_array_equal(out1, out2)
    # dense slots change the matmuls' M, and weight gradients sum over the micro-batches
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(gm1, nnx.Param)),
                    jax.tree.leaves(nnx.state(gm2, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_micro_batches_split_the_capacities_and_count_drops():
    x = jax.random.normal(jax.random.key(2), (4 * 16, H))
    out, stats, _ = _value_and_grads(_layer(2, expert_capacity=4), x)
    assert int(stats.dropped) > 0  # 2 rows per expert per micro-batch cannot hold them
    assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="micro_batches must be a positive int"):
        _layer(0)


def test_decode_layer_runs_the_shared_expert_between_send_and_receive():
    moe = _layer(1, shared_ffn_hidden=32)
    x = jax.random.normal(jax.random.key(3), (4 * 4, H))
    want, _ = nnx.jit(lambda m, x: m(x))(moe, x)
    got, _ = nnx.jit(lambda m, x: m(x, low_latency=True, max_tokens_per_rank=4))(moe, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # In the program: two barriers around the shared expert's matmuls, the first after the
    # dispatch's send, the second before its receive.
    text = str(jax.make_jaxpr(lambda m, x: m(x, low_latency=True, max_tokens_per_rank=4))(
        moe, x))
    body = text[text.index("optimization_barrier"):]
    between = body[:body.index("optimization_barrier", 1)]
    assert between.count("dot_general") == 3  # gate, up, down of the shared expert



def test_decode_overlap_bench_runs_and_records_its_figures(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "bench" / "decode_overlap.py"
    spec = importlib.util.spec_from_file_location("decode_overlap", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--small", "--iters", "3", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("decode_overlap-*.json")
    record = json.loads(result.read_text())
    assert set(record["median_us"]) == {"step_with_shared_expert", "step_without_shared_expert",
                                        "shared_expert_alone", "serial_sum"}
    assert record["serial_over_overlapped"] > 0
    # the kernel list between send and receive (GPU profiles only; CPU runs have none)
    kernels = [("ll_dispatch_kernel", 0.0, 1.0), ("gemm", 10.0, 1.0),
               ("ll_dispatch_kernel", 20.0, 1.0)]
    assert [k[0] for k in bench.between_send_and_recv(kernels)] == ["gemm"]
    assert bench.between_send_and_recv(kernels[:1]) is None
