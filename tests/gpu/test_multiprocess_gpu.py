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
@pytest.mark.parametrize("layout,fp8", [("rank", False), ("expert", False), ("rank", True),
                                        ("expert", True)])
def test_dispatch_combine_match_reference(num_processes, layout, fp8):
    n = _procs(num_processes)
    results = launch(f"{BODIES}:dispatch_combine", n, platform="gpu", timeout=300,
                     args={"seed": SEED, "layout": layout, "fp8": fp8})
    assert sorted(r["rank"] for r in results) == list(range(n))
    for r in results:
        assert r["mismatched_leaves"] == [], f"seed {SEED}: rank {r['rank']}: {r}"
        assert r["combine_max_rel"] <= BF16_TOL, r
        assert r["num_recv"] > 0


@pytest.mark.parametrize("num_processes", [2, 4])
@pytest.mark.parametrize("fp8", [False, True])
def test_low_latency_matches_reference(num_processes, fp8):
    n = _procs(num_processes)
    results = launch(f"{BODIES}:low_latency", n, platform="gpu", timeout=300,
                     args={"seed": SEED, "fp8": fp8})
    for r in results:
        assert r["rows_equal"] and r["counts_equal"] and r["handle_equal"], \
            f"seed {SEED}: rank {r['rank']}: {r}"
        assert r["combine_max_rel"] <= BF16_TOL, r
        assert r["valid_rows"] > 0


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
