"""Buffer life cycles across processes (tests/multiprocess.py ``launch``; the processes share
the GPUs there are, round-robin): create/close without leaks, and a failing rank makes the
others fail fast. The kernels across processes are tested by the whole suite in
``python -m tests.multiprocess`` jobs (tests/gpu/test_intranode.py and the others).
"""

from __future__ import annotations

import time

import pytest

from tests.multiprocess import RankFailure, launch

pytestmark = pytest.mark.gpu

BODIES = "tests.mp_bodies"


def test_buffer_create_close_20_times_does_not_leak():
    results = launch(f"{BODIES}:buffer_lifecycle", 2, platform="gpu", timeout=300,
                     args={"rounds": 20})
    for r in results:
        leaked = r["free_before"] - r["free_after"]
        assert leaked < (64 << 20), f"rank {r['rank']} lost {leaked} bytes over 20 buffers"


def test_a_failing_rank_makes_the_others_fail_fast():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="planted failure on rank 1"):
        launch(f"{BODIES}:fail_before_buffer", 2, platform="gpu", timeout=240)
    assert time.monotonic() - t0 < 120
