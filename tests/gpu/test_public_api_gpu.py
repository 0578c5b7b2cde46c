"""The public API picks the CUDA kernels on GPUs and agrees with the reference backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import jax_ep
from tests import harness as h

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("T", [0, 1, 257])
def test_get_dispatch_layout_auto_uses_cuda_and_matches_reference(R, T):
    E, K = 8 * R, 4
    idx, _ = h.routing(np.random.default_rng(T), R, T, K, E)
    assert jax_ep.backends.resolve("auto", None, "get_dispatch_layout", needs_buffer=False) \
        == "cuda"
    got = h.run(lambda i: jax_ep.get_dispatch_layout(i, E, axis_name=h.AXIS), R, idx)
    want = h.run_reference(lambda i: jax_ep.get_dispatch_layout(i, E, axis_name=h.AXIS,
                                                                backend="reference"), R, idx)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("R", h.RANKS)
def test_auto_dispatch_with_cuda_buffer_resolves_to_cuda(R):
    assert h.buffer(R).backend == "cuda"
    assert jax_ep.backends.resolve("auto", h.buffer(R), "dispatch") == "cuda"


def test_example_runs_on_gpus():
    proc = subprocess.run([sys.executable, "examples/dispatch_combine.py", "--gpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "backend: cuda" in proc.stdout, proc.stdout
