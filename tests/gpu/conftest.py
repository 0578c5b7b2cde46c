"""GPU tests: CUDA backend vs the reference backend on the real GPUs of this process.

Run with ``JAX_EP_REAL_DEVICES=1 pytest -m gpu tests/gpu`` (the root conftest otherwise
forces simulated CPU devices). Every test here is skipped when the jax_ep CUDA extension
is missing or JAX sees no CUDA GPU, so CPU CI skips them.
"""

import pytest


def _cuda_ready():
    try:
        from jax_ep import _native
        return _native.cuda_available(), _native.why_unavailable()
    except Exception as e:  # pragma: no cover - defensive
        return False, str(e)


def pytest_collection_modifyitems(config, items):
    ok, why = _cuda_ready()
    for item in items:
        if "tests/gpu" not in str(item.fspath).replace("\\", "/"):
            continue
        if item.get_closest_marker("gpu") is None:
            continue
        if not ok:
            item.add_marker(pytest.mark.skip(reason=f"needs the CUDA backend: {why}"))
