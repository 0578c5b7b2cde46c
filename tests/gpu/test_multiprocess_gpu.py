"""One process per GPU (jax.distributed over loopback, CUDA IPC between the processes):
the intranode and low-latency kernels == reference backend in 2 and 4 processes, buffer
create/close without leaks, and a failing rank that makes the others fail fast.

Fresh random routing every run; replay a failure with JAX_EP_TEST_SEED.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.gpu import harness as h
from tests.multiprocess import RankFailure, launch

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
BODIES = "tests.gpu.multiprocess_bodies"
# Combine reduces in fp32 and rounds to bf16: allow 2 bf16 ulps of the largest output.
BF16_TOL = 2.0 ** -7


def _procs(n):
    if h.num_gpus() < n:
        pytest.skip(f"needs {n} GPUs, have {h.num_gpus()}")
    return n


@pytest.mark.parametrize("num_processes", [2, 4])
def test_dispatch_combine_match_reference(num_processes):
    """Rank and expert layouts, BF16, FP8 and FP8 cast in the kernel: dispatch bitwise,
    combine within 2 bf16 ulps."""
    n = _procs(num_processes)
    results = launch(f"{BODIES}:dispatch_combine_variants", n, platform="gpu", timeout=400,
                     args={"seed": SEED})
    assert len(results) == n
    for variants in results:
        assert sorted(variants) == ["expert-bf16", "expert-cast", "expert-fp8", "rank-bf16",
                                    "rank-cast", "rank-fp8"]
        for name, r in variants.items():
            assert r["mismatched_leaves"] == [], f"seed {SEED}: {name}: rank {r['rank']}: {r}"
            assert r["combine_max_rel"] <= BF16_TOL, (name, r)
            assert r["num_recv"] > 0, (name, r)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_low_latency_matches_reference(num_processes):
    """BF16 and FP8 low-latency dispatch (rows that carry data, bitwise) and combine."""
    n = _procs(num_processes)
    results = launch(f"{BODIES}:low_latency_variants", n, platform="gpu", timeout=400,
                     args={"seed": SEED})
    for variants in results:
        for name, r in variants.items():
            assert r["rows_equal"] and r["counts_equal"] and r["handle_equal"], \
                f"seed {SEED}: {name}: rank {r['rank']}: {r}"
            assert r["combine_max_rel"] <= BF16_TOL, (name, r)
            assert r["valid_rows"] > 0, (name, r)


def test_buffer_create_close_20_times_does_not_leak():
    n = _procs(2)
    results = launch(f"{BODIES}:buffer_lifecycle", n, platform="gpu", timeout=300,
                     args={"rounds": 20})
    for r in results:
        leaked = r["free_before"] - r["free_after"]
        assert leaked < (64 << 20), f"rank {r['rank']} lost {leaked} bytes over 20 buffers"


def test_a_failing_rank_makes_the_others_fail_fast():
    n = _procs(2)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="planted failure on rank 1"):
        launch(f"{BODIES}:fail_before_buffer", n, platform="gpu", timeout=240)
    assert time.monotonic() - t0 < 120
