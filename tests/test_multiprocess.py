"""The multi-process harness on CPU: jax.distributed over loopback, one rank per process."""

import pytest

from tests.multiprocess import RankFailure, launch


@pytest.mark.parametrize("layout", ["expert", "rank"])
def test_dispatch_combine_in_four_processes(layout):
    results = launch("tests.mp_bodies:dispatch_combine", 4, args={"layout": layout})
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert all(r["max_error"] < 1e-5 for r in results)


def test_a_failing_rank_fails_fast_with_its_traceback():
    with pytest.raises(RankFailure, match="planted failure on rank 1") as info:
        launch("tests.mp_bodies:fail_on_rank", 2, timeout=120)
    assert "rank 0 (killed after another rank failed" in str(info.value) or \
        "rank 0 (exit code" in str(info.value)


def test_a_hung_rank_times_out():
    with pytest.raises(RankFailure, match="timed out"):
        launch("tests.mp_bodies:hang_on_rank", 2, timeout=20)


def test_key_value_exchange_and_nvlink_domains():
    results = launch("tests.mp_bodies:exchange_and_domains", 4)
    for r in results:
        assert r["gathered"] == ["rank-0", "rank-1", "rank-2", "rank-3"]
        assert r["num_hosts"] == 1
        assert r["domains"] == [[0, 1, 2, 3]]  # one host: one NVLink domain
        assert r["domains_2"] == [[0, 1], [2, 3]]  # logical 2 x 2 override


def test_exchange_names_the_process_that_never_published():
    with pytest.raises(RankFailure, match="waited 2000 ms for process 1 to publish 'test/missing'"):
        launch("tests.mp_bodies:exchange_with_missing_rank", 2, timeout=60)


def test_buffer_exchange_shares_exports_or_everyone_fails_with_the_cause():
    ok = launch("tests.mp_bodies:buffer_exchange", 3)
    assert all(r["data"] == {"0": "000000", "1": "010101", "2": "020202"} for r in ok)
    failed = launch("tests.mp_bodies:buffer_exchange", 3, args={"fail_rank": 2})
    for r in failed:  # no process hangs waiting, each names the process and its error
        assert "failed on process 2: planted export failure on 2" in r["error"], r
