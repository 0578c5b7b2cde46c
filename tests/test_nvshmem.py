"""jax_ep.nvshmem on CPU: availability flags, lazy loading and the error paths.

The GPU side (bootstrap across processes, the device ring test) is tests/gpu/test_nvshmem_gpu.py.
"""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import pytest

from jax_ep import nvshmem
from tests.multiprocess import ROOT


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_flags_are_consistent():
    assert isinstance(nvshmem.is_available(), bool)
    why = nvshmem.why_unavailable()
    assert isinstance(why, str) and why
    info = nvshmem.info()
    assert info["available"] is nvshmem.is_available()
    assert info["initialized"] is False
    if nvshmem.is_available():
        assert why == "NVSHMEM is available"
        assert len(info["version"]) == 3 and info["version"] >= (3, 0, 0)
    elif not nvshmem._extension_built():
        assert "built without NVSHMEM" in why and "nvidia-nvshmem-cu13" in why


def test_importing_loads_no_nvshmem_and_the_ffi_extension_never_does():
    proc = _run("""
        import sys
        import jax_ep, jax_ep.nvshmem, jax_ep._native as n
        n.load()  # the main extension, with its FFI targets
        maps = open("/proc/self/maps").read()
        assert "libnvshmem_host" not in maps, "NVSHMEM loaded by import"
        assert "jax_ep._jax_ep_nvshmem" not in sys.modules
        print("flags", jax_ep.nvshmem.is_available())
        print("loaded", "libnvshmem_host" in open("/proc/self/maps").read())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    available = "flags True" in proc.stdout
    assert ("loaded True" in proc.stdout) == available  # loaded on first use, only then


def test_a_missing_host_library_is_reported(monkeypatch):
    def no_library():
        raise ImportError("libnvshmem_host.so.3: cannot open shared object file")

    monkeypatch.setattr(nvshmem, "_loaded", False)
    monkeypatch.setattr(nvshmem, "_ext", None)
    monkeypatch.setattr(nvshmem, "_load_error", None)
    monkeypatch.setattr(nvshmem, "_extension_built", lambda: True)
    monkeypatch.setattr(nvshmem, "_preload_host_library", lambda: None)
    monkeypatch.setattr(nvshmem, "_import_extension", no_library)
    assert nvshmem.is_available() is False
    why = nvshmem.why_unavailable()
    assert "host library could not be loaded" in why and "cannot open shared object" in why
    assert "NVSHMEM_DIR" in why
    monkeypatch.setattr(nvshmem, "check_process_model", lambda devices=None: 0)
    with pytest.raises(nvshmem.NvshmemUnavailableError, match="RDMA .NVSHMEM. path is "
                       "unavailable.*could not be loaded"):
        nvshmem.initialize()
    assert not nvshmem.is_initialized()


def test_a_build_without_nvshmem_is_reported(monkeypatch):
    monkeypatch.setattr(nvshmem, "_loaded", False)
    monkeypatch.setattr(nvshmem, "_ext", None)
    monkeypatch.setattr(nvshmem, "_load_error", None)
    monkeypatch.setattr(nvshmem, "_extension_built", lambda: False)
    assert not nvshmem.is_available()
    assert "built without NVSHMEM" in nvshmem.why_unavailable()
    assert nvshmem.info() == {"available": False, "initialized": False,
                              "why": nvshmem.why_unavailable()}


def _gpu(i):
    return SimpleNamespace(platform="gpu", local_hardware_id=i, id=i)


def test_one_process_driving_several_gpus_is_a_clear_error():
    with pytest.raises(nvshmem.ProcessModelError) as info:
        nvshmem.check_process_model([_gpu(0), _gpu(1), _gpu(2), _gpu(3)])
    msg = str(info.value)
    assert "one process per GPU" in msg and "drives 4 local devices" in msg
    assert "local_device_ids=[i]" in msg and "CUDA_VISIBLE_DEVICES" in msg


def test_process_model_accepts_one_gpu_and_returns_its_ordinal():
    assert nvshmem.check_process_model([_gpu(3)]) == 3


def test_process_model_needs_a_gpu():
    with pytest.raises(nvshmem.ProcessModelError, match="needs a CUDA GPU.*'cpu'"):
        nvshmem.check_process_model([SimpleNamespace(platform="cpu", local_hardware_id=0)])
    with pytest.raises(nvshmem.ProcessModelError, match="no local device"):
        nvshmem.check_process_model([])


def test_initialize_in_this_multi_device_process_names_the_fix():
    assert len(jax.local_devices()) > 1  # the CPU tests run on 8 simulated devices
    with pytest.raises(nvshmem.ProcessModelError, match="one process per GPU"):
        nvshmem.initialize()
    assert not nvshmem.is_initialized()


def test_initialize_on_a_cpu_process_says_it_needs_a_gpu():
    proc = _run("""
        import jax_ep.nvshmem as nv
        try:
            nv.initialize()
        except nv.ProcessModelError as e:
            print("ERR", e)
    """, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERR" in proc.stdout and "needs a CUDA GPU" in proc.stdout


def test_heap_calls_before_initialize_are_clear_errors():
    for call in (lambda: nvshmem.symmetric_alloc(1 << 20), lambda: nvshmem.symmetric_free(0),
                 lambda: nvshmem.ring_test(1024)):
        with pytest.raises(RuntimeError, match=r"call jax_ep.nvshmem.initialize\(\) first"):
            call()
    nvshmem.finalize()  # not initialised: a no-op


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-5, ValueError), (1.5, TypeError),
                                      ("8", TypeError), (True, TypeError)])
def test_bad_sizes_name_the_argument(bad, err):
    with pytest.raises(err, match="num_bytes"):
        nvshmem.symmetric_alloc(bad)


def test_library_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NVSHMEM_DIR", str(tmp_path))
    monkeypatch.delenv("NVSHMEM_HOME", raising=False)
    dirs = nvshmem.library_dirs()
    assert dirs[:2] == [str(tmp_path / "lib"), str(tmp_path / "lib64")]
    wheel = nvshmem._wheel_lib_dir()
    if wheel is not None:
        assert dirs[-1] == wheel and os.path.isdir(wheel)


def test_bad_symmetric_size_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="symmetric_size must be > 0"):
        nvshmem.initialize(symmetric_size=0)
    with pytest.raises(TypeError, match="symmetric_size must be an int"):
        nvshmem.initialize(symmetric_size=1.5)
    assert not nvshmem.is_initialized()
