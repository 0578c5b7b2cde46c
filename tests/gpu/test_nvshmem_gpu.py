"""NVSHMEM on real GPUs: unique-id bootstrap over jax.distributed, the symmetric heap, and
the device-side ring (proof that the device library is linked and initialised).

One process per PE through tests/multiprocess.py (PEs share the GPUs there are, round-robin:
NVSHMEM runs several PEs on one GPU); skipped without NVSHMEM.
Run: JAX_EP_REAL_DEVICES=1 NVSHMEM_DISABLE_NVLS=1 pytest -m gpu tests/gpu/test_nvshmem_gpu.py
"""

import os

import pytest

from jax_ep import nvshmem
from tests.multiprocess import launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvshmem.is_available(), reason=nvshmem.why_unavailable()),
]

# The parent pytest process may hold most of each GPU (XLA preallocates 75%); the ranks
# only need NVSHMEM's heap, so they allocate on demand. Never NVLink multicast.
ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "NVSHMEM_DISABLE_NVLS": "1"}
BODIES = "tests.gpu.nvshmem_bodies"


@pytest.mark.parametrize("num_processes", [1, 2, 4])
def test_ring_across_processes(num_processes):
    results = launch(f"{BODIES}:ring", num_processes, platform="gpu", env=ENV, timeout=300)
    assert sorted(r["rank"] for r in results) == list(range(num_processes))
    for r in results:
        assert r["info"]["pe"] == r["rank"] and r["info"]["num_pes"] == num_processes
        assert all(res["ok"] and res["mismatched_bytes"] == 0 and res["bad_ids"] == 0
                   for res in r["results"].values()), r
    # Round-robin: each process on its own GPU, or all on the one there is.
    assert len({r["cuda_device"] for r in results}) in (1, num_processes)


def test_init_alloc_free_finalize_repeated():
    results = launch(f"{BODIES}:lifecycle", 2, platform="gpu", env=ENV, timeout=300)
    assert all(r.get("reinit") for r in results), results


def test_a_process_may_exit_without_finalize():
    results = launch(f"{BODIES}:exit_without_finalize", 2, platform="gpu", env=ENV,
                     timeout=180)
    assert sorted(r["rank"] for r in results) == [0, 1]


def test_one_process_driving_several_gpus_gets_a_clear_error(monkeypatch):
    import jax

    gpu = jax.local_devices()[0]
    if len(jax.local_devices()) == 1:  # a one-GPU machine: the process shows it twice
        monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [gpu, gpu])
    assert len(jax.local_devices()) > 1
    with pytest.raises(nvshmem.ProcessModelError, match="one process per GPU") as info:
        nvshmem.initialize()
    assert "local_device_ids=[i]" in str(info.value)
    assert not nvshmem.is_initialized()


def test_nvls_stays_off():
    assert os.environ.get("NVSHMEM_DISABLE_NVLS", "1") == "1"
    assert nvshmem.ENV_DEFAULTS["NVSHMEM_DISABLE_NVLS"] == "1"
