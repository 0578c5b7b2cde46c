"""Loads the compiled extension ``jax_ep._jax_ep_ffi`` and registers its XLA FFI targets.

Importing this module never fails: without the extension (a pure-Python install, or a
build without a C++ compiler) :func:`load` returns None, :func:`cuda_available` is False
and :func:`cuda_status` says why; the reference backend works regardless.
"""

from __future__ import annotations

import threading
from typing import Optional

_lock = threading.Lock()
_ext = None
_load_error: Optional[str] = None  # the extension could not be imported
_register_error: Optional[str] = None  # imported, but its CUDA targets did not register
_loaded = False
_status: Optional[str] = None  # cuda_status(), once computed

# The kernels are compiled for sm_90a only (CMakeLists.txt): compute capability 9.0.
KERNEL_ARCH = "sm_90a"
KERNEL_CAPABILITY = (9, 0)
OK = "ok"


def load():
    """The extension module with its FFI targets registered (once), or None."""
    global _ext, _load_error, _register_error, _loaded
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
                    _register_error = (f"the CUDA kernels are built but not loaded: registering "
                                       f"the FFI target {name!r} with JAX failed ({e}); is "
                                       "jax[cuda] installed?")
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
    return bool(ext is not None and ext.with_cuda and _register_error is None)


def _compute_capability(device):
    """(major, minor) of a CUDA device, or None when JAX does not say."""
    cc = getattr(device, "compute_capability", None)
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


def cuda_status() -> str:
    """``"ok"`` when the CUDA backend can run, else a short reason why not: the extension
    is missing, built without CUDA, its kernels are not loaded, JAX sees no CUDA GPU, or
    the GPU is not a Hopper (the kernels are built for sm_90a, compute capability 9.0)."""
    global _status
    if _status is not None:
        return _status
    ext = load()
    if ext is None:
        _status = (f"{_load_error or 'the jax_ep extension is not built'}; reinstall jax_ep "
                   "with a C++ compiler (and nvcc for the CUDA kernels)")
        return _status
    if not ext.with_cuda:
        # The extension only records that the kernels are absent; CMake leaves them out
        # for JAX_EP_CUDA=OFF and (with the default AUTO) when no working nvcc was found.
        _status = ("the jax_ep extension was built without CUDA kernels (JAX_EP_CUDA=OFF, or "
                   "no working nvcc at build time); reinstall with nvcc on PATH and "
                   "JAX_EP_CUDA=ON to get them")
        return _status
    if _register_error is not None:
        _status = _register_error
        return _status
    import jax

    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        gpus = []
    # ROCm GPUs also report platform "gpu"; the kernels are CUDA only.
    cuda_gpus = [d for d in gpus if _is_cuda_device(d)]
    if not cuda_gpus:
        _status = "JAX sees no CUDA GPU" + (" (its GPUs are not NVIDIA ones)" if gpus else "")
        return _status
    caps = {_compute_capability(d) for d in cuda_gpus}
    if caps != {KERNEL_CAPABILITY} and None not in caps:
        kinds = sorted({str(getattr(d, "device_kind", "?")) for d in cuda_gpus})
        shown = ", ".join(f"{a}.{b}" for a, b in sorted(caps))
        _status = (f"the GPU ({', '.join(kinds)}, compute capability {shown}) is not a Hopper: "
                   f"the jax_ep kernels are built for {KERNEL_ARCH} (compute capability "
                   f"{KERNEL_CAPABILITY[0]}.{KERNEL_CAPABILITY[1]}) only")
        return _status
    _status = OK
    return _status


def cuda_available() -> bool:
    """True when the extension has the CUDA kernels, loaded, and JAX sees CUDA GPUs of
    compute capability 9.0 (Hopper: the kernels are built for sm_90a). See
    :func:`cuda_status` for the reason when False."""
    return cuda_status() == OK


def _is_cuda_device(device) -> bool:
    try:
        version = device.client.platform_version.lower()
    except Exception:
        version = ""
    return "cuda" in version or "nvidia" in str(getattr(device, "device_kind", "")).lower()


def why_unavailable() -> str:
    status = cuda_status()
    return "the CUDA backend is available" if status == OK else status
