"""Loads the compiled extension ``jax_ep._jax_ep_ffi`` and registers its XLA FFI targets.

Importing this module never fails: without the extension (a pure-Python install, or a
build without a C++ compiler) :func:`load` returns None, :func:`cuda_available` is False
and :func:`why_unavailable` says why; the reference backend works regardless.
"""

from __future__ import annotations

import threading
from typing import Optional

_lock = threading.Lock()
_ext = None
_load_error: Optional[str] = None
_loaded = False
_cuda_ok: Optional[bool] = None
_cuda_reason = ""


def load():
    """The extension module with its FFI targets registered (once), or None."""
    global _ext, _load_error, _loaded
    if _loaded:
        return _ext
    with _lock:
        if _loaded:
            return _ext
        try:
            from jax_ep import _jax_ep_ffi as ext
        except ImportError as e:  # not built, or built for another Python
            _load_error = f"the jax_ep extension could not be imported ({e})"
            _loaded = True
            return None
        import jax

        if ext.with_cuda:
            for name, capsule in ext.cuda_targets().items():
                try:
                    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
                except Exception as e:  # jaxlib without the CUDA platform
                    _load_error = f"registering CUDA FFI target {name!r} failed ({e})"
                    break
        _ext = ext
        _loaded = True
        return ext


_testing_loaded = False


def load_testing():
    """The extension's ``testing`` submodule (probes for tests and profiling) with its CPU
    FFI target registered (once), or None without the extension."""
    global _testing_loaded
    ext = load()
    if ext is None:
        return None
    with _lock:
        if not _testing_loaded:
            import jax

            for name, capsule in ext.testing.cpu_targets().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _testing_loaded = True
    return ext.testing


def extension():
    """The loaded extension; raises a clear error when it is missing."""
    ext = load()
    if ext is None:
        raise RuntimeError(_load_error or "the jax_ep extension is not built")
    return ext


def built_with_cuda() -> bool:
    ext = load()
    return bool(ext is not None and ext.with_cuda and _load_error is None)


def cuda_available() -> bool:
    """True when the extension has the CUDA kernels and JAX sees at least one CUDA GPU."""
    global _cuda_ok, _cuda_reason
    if _cuda_ok is not None:
        return _cuda_ok
    if not built_with_cuda():
        _cuda_ok = False
        _cuda_reason = _load_error or "the jax_ep extension was built without CUDA (no nvcc)"
        return False
    import jax

    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        gpus = []
    # ROCm GPUs also report platform "gpu"; the kernels are CUDA only.
    cuda_gpus = [d for d in gpus if _is_cuda_device(d)]
    _cuda_ok = bool(cuda_gpus)
    if not _cuda_ok:
        _cuda_reason = "JAX sees no CUDA GPU"
    return _cuda_ok


def _is_cuda_device(device) -> bool:
    try:
        version = device.client.platform_version.lower()
    except Exception:
        version = ""
    return "cuda" in version or "nvidia" in str(getattr(device, "device_kind", "")).lower()


def why_unavailable() -> str:
    if cuda_available():
        return "the CUDA backend is available"
    return _cuda_reason
