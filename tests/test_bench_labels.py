"""The benchmarks label timings that are not exchange figures (bench/processes.py)."""

import importlib.util
import types

from tests.multiprocess import ROOT


def _processes():
    path = ROOT / "bench" / "processes.py"
    spec = importlib.util.spec_from_file_location("bench_processes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_rank_and_shared_gpus_are_fixed_costs_with_their_own_names():
    p = _processes()
    one_process = types.SimpleNamespace(processes=0, gpus=None)
    assert "no exchange" in p.fixed_cost_reason(1, one_process)
    assert p.fixed_cost_reason(4, one_process) is None  # 4 GPUs in one process
    assert p.device_name(4, "NVIDIA H200", one_process) == "4xNVIDIA-H200"
    shared = types.SimpleNamespace(processes=4, gpus=1)
    assert "share 1 GPU" in p.fixed_cost_reason(4, shared)
    assert p.device_name(4, "NVIDIA H200", shared) == "1xNVIDIA-H200-4ranks-shared"
    own = types.SimpleNamespace(processes=4, gpus=4)
    assert p.fixed_cost_reason(4, own) is None
    assert p.device_name(4, "NVIDIA H200", own) == "4xNVIDIA-H200-4proc"
