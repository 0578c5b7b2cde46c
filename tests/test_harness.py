"""tests/harness.py and the multi-process mode of the suite, on CPU.

The R-parametrised tests run in one process on 8 simulated CPU devices, and again (R=2) in
the two-process job that ``test_two_pytest_processes_join_one_job`` starts: one pytest per
"host" on loopback, joined through ``jax.distributed`` as a cluster launcher would.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness, oracle
from tests.multiprocess import ROOT


@pytest.mark.parametrize("R", harness.RANKS)
def test_run_returns_every_ranks_result(R):
    x = np.arange(R * 6, dtype=np.float32).reshape(R, 2, 3)
    doubled, rank, total = harness.run(
        lambda a: (a * 2, jax.lax.axis_index(harness.AXIS), jax.lax.psum(a.sum(), harness.AXIS)),
        R, x)
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(rank, np.arange(R))
    np.testing.assert_array_equal(total, np.full(R, x.sum()))


@pytest.mark.parametrize("R", harness.RANKS)
def test_run_hands_zero_size_arrays_to_the_function_unchanged(R):
    """Zero-size operands and results cross the shard_map boundary padded (XLA on several
    GPUs rejects them there) and come back cut: the function sees and returns them as is."""
    empty = np.zeros((R, 0, 3), np.float32)
    x = np.arange(R * 2, dtype=np.float32).reshape(R, 2)
    same, doubled, shape = harness.run(
        lambda e, a: (e * 2, a * 2, jnp.array(e.shape, jnp.int32)), R, empty, x)
    assert same.shape == (R, 0, 3) and same.dtype == np.float32
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(shape, np.tile([0, 3], (R, 1)))


@pytest.mark.parametrize("R", harness.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_reference_on_the_ranks_equals_reference_on_local_cpus_and_the_oracle(R, layout):
    """The reference backend across the ranks under test (processes when distributed), the
    same on this process's CPU devices, and the NumPy oracle agree."""
    T, H, K, E = 7, 16, 3, 4 * R
    rng = np.random.default_rng([R, len(layout)])  # the same on every process
    xs = harness.random_tokens(rng, R, T, H)
    idxs = harness.random_routing(rng, R, T, K, E, skew=True)
    ws = harness.random_weights(rng, R, T, K)
    scale = np.linspace(0.5, 2.0, E).astype(np.float32)

    def moe(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout=layout,
                            backend="reference")
        me = jax.lax.axis_index(harness.AXIS)
        if layout == "expert":
            e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * (E // R), 0)
            y = r.recv_x * jnp.asarray(scale)[e][:, None]
            return jax_ep.combine(y, r.handle, r.recv_topk_weights), r.num_recv_tokens
        return jax_ep.combine(r.recv_x, r.handle), r.num_recv_tokens

    on_ranks = harness.run(moe, R, xs, idxs, ws)
    on_cpus = harness.run_reference(moe, R, xs, idxs, ws)
    for a, b in zip(on_ranks, on_cpus):
        np.testing.assert_array_equal(a, b)
    if layout == "expert":
        want = oracle.moe(xs, idxs, ws, E, lambda e, x: x * scale[e])
        np.testing.assert_allclose(on_ranks[0], np.stack(want), rtol=1e-5, atol=1e-5)
    assert int(on_ranks[1].sum()) > 0


@pytest.mark.parametrize("R", harness.RANKS)
def test_all_ranks_gathers_small_values(R):
    got = harness.all_ranks({"rank": jax.process_index()})
    assert [g["rank"] for g in got] == list(range(jax.process_count()))


def test_two_pytest_processes_join_one_job(tmp_path):
    """What a multi-host run does (e.g. one ``pytest --distributed`` per host under srun):
    two pytest processes on loopback form one job; each runs the R=2 tests of this file."""
    if harness.distributed():
        pytest.skip("already inside the job")  # never collected there (no R parameter)
    from tests.multiprocess import _free_port

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_EP_TEST_NUM_PROCESSES": "2", "JAX_EP_TEST_PROCESS_ID": str(rank),
               "JAX_EP_TEST_SHARED_DIR": str(tmp_path)}
        env.pop("JAX_EP_REAL_DEVICES", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--distributed",
             "tests/test_harness.py"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
        # R=2 of the three parametrised tests (one with 2 layouts) and the value gather
        assert "5 passed" in out and "deselected" in out, f"rank {rank}:\n{out[-2000:]}"
    assert not any(tmp_path.iterdir()), "the job left its exchange folder behind"
