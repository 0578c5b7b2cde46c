"""Overlap on CPU: what the side stream lowers to, the micro-batched layer against the
serial one, and the decode path's shared expert between the dispatch's send and receive.

The GPU side (kernels on the side stream, a profile showing the overlap) is
tests/gpu/test_overlap_gpu.py and bench/overlap.py.
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


def _annotated_targets(text):
    """The jax_ep custom calls inside stream-annotated call regions, and all of them."""
    regions = set(re.findall(r"func\.call @(\S+)\(.*_xla_stream_annotation = \"1\"", text))
    inside, every = [], re.findall(r"custom_call @(jax_ep_\w+)", text)
    for name in regions:
        body = text.split(f"func.func private @{name}(")[1].split("\n  }\n")[0]
        inside += re.findall(r"custom_call @(jax_ep_\w+)", body)
    return sorted(inside), sorted(every)


def _normal_ops(side_stream):
    cfg = DispatchConfig(num_experts=E, num_ranks=R, axis_name="ep", layout="rank",
                         capacity=R * T, expert_alignment=1, num_tokens=T, num_topk=K,
                         backend="cuda", buffer_id=1, side_stream=side_stream)

    def ops(x, idx):
        out = cuda_normal.dispatch((x,), idx, jnp.ones(idx.shape, jnp.float32), cfg)
        recv_x, handle = out[0][0], out[-1]
        again = cuda_normal.cached_dispatch(x, handle, cfg)
        return cuda_normal.combine(recv_x + again, None, handle, cfg)
    return ops


def _low_latency_ops(side_stream):
    cfg = LowLatencyConfig(num_experts=E, num_ranks=R, axis_name="ep", max_tokens_per_rank=T,
                           num_tokens=T, num_topk=K, hidden=H, use_fp8=False,
                           backend="cuda", buffer_id=1, side_stream=side_stream)

    def ops(x, idx):
        w = jnp.ones(idx.shape, jnp.float32)
        recv_x, count, handle = cuda_ll.ll_dispatch(x, idx, None, cfg)
        y = cuda_ll.ll_combine(recv_x, idx, w, handle, cfg)
        sent = cuda_ll.ll_dispatch_send(y, idx, cfg)
        recv_x, count, handle = cuda_ll.ll_dispatch_recv(sent, cfg, x.dtype, hidden=H)
        sent_y = cuda_ll.ll_combine_send(recv_x, handle, cfg)
        return cuda_ll.ll_combine_recv(sent_y, idx, w, handle, cfg, x.dtype, H)
    return ops


@pytest.mark.parametrize("make_ops", [_normal_ops, _low_latency_ops])
def test_side_stream_puts_every_exchange_in_a_stream_region(make_ops):
    shapes = [((T, H), jnp.bfloat16), ((T, K), jnp.int32)]
    text = _lowered_text(make_ops(True), *shapes)
    inside, every = _annotated_targets(text)
    assert every and inside == every  # none left on the main stream
    # one region per op: consecutive ops stay separate async pairs in XLA's schedule
    assert len(re.findall(r"func\.call @\S+\(.*_xla_stream_annotation", text)) == len(every)
    inside, every = _annotated_targets(_lowered_text(make_ops(False), *shapes))
    assert every and inside == []


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


# Scheduling groups: the region's call op must carry the group id beside the stream
# annotation (XLA's stream wrapper copies the call's attributes onto call-start/done), the
# compute to overlap must carry the same id, and nothing inside the region may.

def _call_attrs(text):
    """{callee: frontend attributes of its func.call} in StableHLO text."""
    out = {}
    for name, attrs in re.findall(
            r"call @(\S+)\(.*\{mhlo\.frontend_attributes = \{([^}]*)\}\}", text):
        out[name] = dict(re.findall(r'(\w+) = "([^"]*)"', attrs))
    return out


def _body(text, name):
    return text.split(f"func.func private @{name}(")[1].split("\n  }\n")[0]


def test_grouped_region_call_carries_the_stream_and_the_group():
    from jax_ep.backends.cuda._stream import on_side_stream, scheduling_group

    def f(a, b, c, d):
        with scheduling_group(7):  # the region is made inside the group as well as outside
            inside = on_side_stream(lambda c, d: jnp.tanh(c @ d), group=7)(c, d)
            outside = a @ b
        return outside, inside

    x = jnp.ones((16, 16), jnp.float32)
    text = jax.jit(f).lower(x, x, x, x).as_text()
    calls = _call_attrs(text)
    assert len(calls) == 1
    (name, attrs), = calls.items()
    assert attrs == {"_scheduling_group_id": "7", "_xla_stream_annotation": "1",
                     "inlineable": "false"}
    main = text.split("func.func public @main(")[1].split("\n  }\n")[0]
    dots = [ln for ln in main.splitlines() if "dot_general" in ln]
    assert len(dots) == 1 and '_scheduling_group_id = "7"' in dots[0]
    body = _body(text, name)
    assert "dot_general" in body and "_scheduling_group_id" not in body
    want = (x @ x, jnp.tanh(x @ x))
    for got, w in zip(jax.jit(f)(x, x, x, x), want):  # a plain call on the CPU
        np.testing.assert_allclose(got, w, rtol=1e-6)


def test_ungrouped_region_keeps_the_compute_on_form():
    from jax_ep.backends.cuda._stream import on_side_stream

    x = jnp.ones((8, 8), jnp.float32)
    text = jax.jit(on_side_stream(lambda c: c * 2)).lower(x).as_text()
    attrs = list(_call_attrs(text).values())
    assert attrs and all(a.get("_xla_stream_annotation") == "1" for a in attrs)
    assert "_scheduling_group_id" not in text


def test_grouped_region_differentiates_on_the_side_stream():
    from jax.experimental import xla_metadata

    from jax_ep.backends.cuda._stream import on_side_stream

    w = jax.random.normal(jax.random.key(4), (8, 8))
    region = on_side_stream(lambda x: jnp.sin(x @ w), group=3)
    loss = lambda x: jnp.sum(region(x) ** 2)  # noqa: E731
    x = jax.random.normal(jax.random.key(5), (4, 8))
    np.testing.assert_allclose(jax.grad(loss)(x),
                               jax.grad(lambda x: jnp.sum(jnp.sin(x @ w) ** 2))(x),
                               rtol=1e-5, atol=1e-6)
    text = jax.jit(jax.value_and_grad(loss)).lower(x).as_text()
    calls = list(_call_attrs(text).values())
    assert len(calls) >= 2 and all(a.get("_xla_stream_annotation") == "1" for a in calls)
    assert sum(a.get("_scheduling_group_id") == "3" for a in calls) >= 1
    if hasattr(xla_metadata, "xla_metadata_call2"):  # jax >= 0.11: only the forward call
        assert sum("_scheduling_group_id" in a for a in calls) == 1


@pytest.mark.parametrize("make_ops", [_normal_ops, _low_latency_ops])
def test_jax_ep_ops_in_a_grouped_region(make_ops):
    from jax_ep.backends.cuda._stream import on_side_stream, scheduling_group

    ops = make_ops(False)

    def fn(x, idx):
        out = on_side_stream(ops, group=11)(x, idx)
        with scheduling_group(11):
            other = x.astype(jnp.float32) @ jnp.ones((H, H), jnp.float32)
        return out + other.astype(out.dtype)

    text = _lowered_text(fn, ((T, H), jnp.bfloat16), ((T, K), jnp.int32))
    calls = _call_attrs(text)
    grouped = [n for n, a in calls.items() if a.get("_scheduling_group_id") == "11"]
    assert len(grouped) == 1 and calls[grouped[0]]["_xla_stream_annotation"] == "1"
    every = re.findall(r"custom_call @(jax_ep_\w+)", text)
    body = _body(text, grouped[0])
    assert every and sorted(re.findall(r"custom_call @(jax_ep_\w+)", body)) == sorted(every)
    assert "_scheduling_group_id" not in body


@pytest.mark.parametrize("bad", [-1, "1", 1.0, True, None])
def test_scheduling_group_ids_are_checked(bad):
    from jax_ep.backends.cuda._stream import group_id, scheduling_group

    with pytest.raises(ValueError, match="non-negative int"):
        group_id(bad)
    with pytest.raises(ValueError, match="non-negative int"):
        with scheduling_group(bad):
            pass


def _stream_probe():
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).parents[1] / "bench"
    sys.path.insert(0, str(bench))  # the probe imports trace_summary from beside it
    spec = importlib.util.spec_from_file_location("stream_probe", bench / "stream_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Compiled GPU HLO as XLA prints a scheduled module (shapes shortened): the start, a
# Triton GEMM fusion, a command buffer holding a cuBLAS GEMM, the done.
_SCHEDULED_HLO = """HloModule jit_grouped_dots, is_scheduled=true, entry_computation_layout={()->()}

%gemm_fusion_dot.1_computation (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%xla_metadata_call.3 (c: bf16[8,8], d: bf16[8,8]) -> bf16[8,8] {
  %c = bf16[8,8]{1,0} parameter(0)
  %d = bf16[8,8]{1,0} parameter(1)
  %cublas.2 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%c, %d), custom_call_target="__cublas$gemm"
  ROOT %gte.2 = bf16[8,8]{1,0} get-tuple-element(%cublas.2), index=0
}

%command_buffer (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %cublas.5 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  ROOT %gte.5 = bf16[8,8]{1,0} get-tuple-element(%cublas.5), index=0
}

ENTRY %main.9 (a.1: bf16[8,8], b.1: bf16[8,8]) -> (bf16[8,8], bf16[8,8], bf16[8,8]) {
  %a.1 = bf16[8,8]{1,0} parameter(0)
  %b.1 = bf16[8,8]{1,0} parameter(1)
  %early = bf16[8,8]{1,0} call(%a.1, %b.1), to_apply=%command_buffer
  %call-start = ((bf16[8,8]{1,0}, bf16[8,8]{1,0}), bf16[8,8]{1,0}) call-start(%a.1, %b.1), async_execution_thread="explicit", to_apply=%xla_metadata_call.3, frontend_attributes={_scheduling_group_id="1",_xla_stream_annotation="1",inlineable="false"}
  %gemm_fusion_dot.1 = bf16[8,8]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, frontend_attributes={_scheduling_group_id="1"}, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm"}}
  %call-done = bf16[8,8]{1,0} call-done(%call-start), frontend_attributes={_scheduling_group_id="1",_xla_stream_annotation="1",inlineable="false"}
  ROOT %tuple = (bf16[8,8]{1,0}, bf16[8,8]{1,0}, bf16[8,8]{1,0}) tuple(%gemm_fusion_dot.1, %call-done, %early)
}
"""


def test_stream_probe_reads_the_schedule_of_compiled_hlo():
    probe = _stream_probe()
    report = probe.schedule_report(_SCHEDULED_HLO)
    assert report["scheduled"] and report["entry_instructions"] == 7
    (pair,) = report["pairs"]
    assert pair == dict(start="call-start", start_at=3, done_at=5, group="1", done_group="1",
                        thread="explicit")
    # a start on XLA's main thread (not printed)
    main = _SCHEDULED_HLO.replace(' async_execution_thread="explicit",', "")
    (pair,) = probe.schedule_report(main)["pairs"]
    assert pair["thread"] == "main"
    gemms = {g["name"]: g for g in report["gemms"]}
    assert set(gemms) == {"early", "gemm_fusion_dot.1"}  # not the region's own GEMM
    assert gemms["gemm_fusion_dot.1"]["where"] == ["between call-start and call-done"]
    assert gemms["gemm_fusion_dot.1"]["group"] == "1"
    assert gemms["early"]["where"] == ["before call-start"] and gemms["early"]["group"] is None
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
