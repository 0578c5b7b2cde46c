"""bench/trace_summary.py on a hand-made profile: span, busy time (overlaps merged),
categories, matched-kernel gaps, cross-GPU skew and the communication timeline."""

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import trace_summary  # noqa: E402


def _event(name, start_ns, duration_ns):
    return types.SimpleNamespace(name=name, start_ns=start_ns, duration_ns=duration_ns)


def _plane(name, events, other_lines=()):
    lines = [types.SimpleNamespace(name="Stream #7", events=events)]
    lines += [types.SimpleNamespace(name=n, events=ev) for n, ev in other_lines]
    return types.SimpleNamespace(name=name, lines=lines)


@pytest.fixture
def fake_profile(monkeypatch):
    planes = [
        _plane("/device:GPU:0", [_event("jax_ep::ll_dispatch", 1000, 1000),
                                 _event("nvjet_gemm", 1500, 1000),  # overlaps the first
                                 _event("jax_ep::ll_dispatch", 4000, 1000)],
               other_lines=[("XLA Ops", [_event("not a kernel", 0, 99999)])]),
        _plane("/device:GPU:1", [_event("jax_ep::ll_dispatch", 1300, 900),
                                 _event("ncclDevKernel_SendRecv", 2500, 100),
                                 _event("jax_ep::ll_dispatch", 4500, 500)]),
        _plane("/host:CPU", [_event("python", 0, 10)]),
    ]
    import jax.profiler

    class FakeProfileData:
        @staticmethod
        def from_file(path):
            return types.SimpleNamespace(planes=planes)

    monkeypatch.setattr(jax.profiler, "ProfileData", FakeProfileData, raising=False)


def test_concurrent_time_of_two_kernel_kinds():
    comm = [(0, 10), (5, 10), (30, 5)]      # union [0, 15) and [30, 35)
    other = [(10, 25), (40, 1)]             # [10, 35) and [40, 41)
    assert trace_summary.concurrent_ns(comm, other) == 5 + 5
    assert trace_summary.concurrent_ns(comm, []) == 0
    assert trace_summary.concurrent_ns(other, comm) == 10


def test_summary_numbers(fake_profile):
    s = trace_summary.summarize("unused.xplane.pb", match="ll_dispatch")
    assert set(s["gpus"]) == {"/device:GPU:0", "/device:GPU:1"}  # host plane ignored
    g0, g1 = s["gpus"]["/device:GPU:0"], s["gpus"]["/device:GPU:1"]
    assert g0["kernels"] == 3 and g0["span_us"] == 4.0
    assert g0["busy_us"] == 2.5  # [1.0, 2.5) merged with [4.0, 5.0)
    assert g0["category_us"] == {"jax_ep": 2.0, "matmul": 1.0}
    assert g1["category_us"] == {"jax_ep": 1.4, "nccl": 0.1}
    # the gemm [1.5, 2.5) overlaps the first jax_ep kernel [1.0, 2.0) by 0.5 us
    assert g0["jax_ep_concurrent_us"] == 0.5 and g0["jax_ep_busy_us"] == 2.0
    assert g0["streams"] == {"jax_ep": ["Stream #7"], "matmul": ["Stream #7"]}
    assert g1["jax_ep_concurrent_us"] == 0.0
    assert g0["matched"] == {"count": 2, "median_us": 1.0, "median_start_gap_us": 3.0}
    assert g1["matched"]["median_start_gap_us"] == 3.2
    # the i-th matched kernel's start across GPUs: 0.3 and 0.5 us apart
    assert s["matched_start_skew_us"] == {"median": 0.4, "max": 0.5}
    # communication kernels on the common clock (t0: the earliest kernel on any GPU)
    assert g1["comm_timeline"] == [("jax_ep::ll_dispatch", 0.3, 0.9),
                                   ("ncclDevKernel_SendRecv", 1.5, 0.1),
                                   ("jax_ep::ll_dispatch", 3.5, 0.5)]
    assert [k["name"] for k in g0["top"]] == ["jax_ep::ll_dispatch", "nvjet_gemm"]


def test_category_names():
    assert trace_summary.category("ncclDevKernel_AllReduce") == "nccl"
    assert trace_summary.category("void jax_ep::(anonymous)::combine") == "jax_ep"
    assert trace_summary.category("nvjet_sm90_tst_128x160") == "matmul"
    assert trace_summary.category("loop_add_fusion") == "xla_fusion_or_other"
