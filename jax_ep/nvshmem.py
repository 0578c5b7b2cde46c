"""NVSHMEM for jax_ep's RDMA paths: bootstrap, symmetric heap, teardown.

NVSHMEM serves one process per GPU: start one process per GPU (``jax.distributed.initialize(
..., local_device_ids=[i])`` or ``CUDA_VISIBLE_DEVICES``), then :func:`initialize` in every
process. Process 0 makes an NVSHMEM unique id, which travels to the others through
``jax.distributed``'s key-value store (:func:`jax_ep.distributed.all_gather_bytes`); each
process then joins as PE ``jax.process_index()`` of ``jax.process_count()`` on its one local
GPU. A process that drives several GPUs gets :class:`ProcessModelError` naming the fix.

The runtime lives in its own extension module, ``jax_ep._jax_ep_nvshmem``, the only part of
jax_ep that links ``libnvshmem_host.so.3``; importing this module loads nothing. The first
call that needs NVSHMEM preloads the host library from ``$NVSHMEM_DIR/lib`` (or
``$NVSHMEM_HOME/lib``), else from the ``nvidia-nvshmem-cu13`` wheel
(``site-packages/nvidia/nvshmem/lib``), then imports the extension (whose RUNPATH names the
same places as a fallback). NVSHMEM finds its bootstrap and transport plugins
(``nvshmem_bootstrap_uid.so.3``, ``nvshmem_transport_ibrc.so.3``...) next to the host
library. :func:`is_available` and :func:`why_unavailable` say whether all of that worked.

Every function here that touches NVSHMEM state is collective: all processes call it, with
the same arguments, in the same order.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import operator
import os
import threading
from typing import Any, Dict, List, Optional, Sequence

HOST_LIBRARY = "libnvshmem_host.so.3"
# Set (unless already set) before NVSHMEM starts: jax_ep never uses NVLink multicast (NVLS),
# and NVSHMEM's own collectives keep it independent of the NCCL that JAX loads.
ENV_DEFAULTS = {"NVSHMEM_DISABLE_NVLS": "1", "NVSHMEM_DISABLE_NCCL": "1"}

_UID_KEY = "nvshmem/uid"
_TIMEOUT_MS = 120_000


class NvshmemUnavailableError(RuntimeError):
    """jax_ep was built without NVSHMEM, or NVSHMEM's host library could not be loaded."""


class ProcessModelError(RuntimeError):
    """This process cannot be an NVSHMEM PE (it drives several GPUs, or none)."""


_lock = threading.RLock()
_ext = None
_loaded = False
_load_error: Optional[str] = None
_preloaded: Optional[str] = None  # path of the host library this module preloaded
_initialized = False
_generation = 0  # initialisations attempted in this process: keys the unique-id exchange


# ----------------------------------------------------------------------------- loading
def _wheel_lib_dir() -> Optional[str]:
    """lib/ of the nvidia-nvshmem-cu13 wheel, found without importing anything heavy."""
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        lib = os.path.join(root, "lib")
        if os.path.isdir(lib):
            return lib
    return None


def library_dirs() -> List[str]:
    """Where the NVSHMEM host library is looked for, in order."""
    dirs = []
    for var in ("NVSHMEM_DIR", "NVSHMEM_HOME"):
        root = os.environ.get(var)
        if root:
            dirs += [os.path.join(root, "lib"), os.path.join(root, "lib64")]
    wheel = _wheel_lib_dir()
    if wheel:
        dirs.append(wheel)
    return dirs


def _preload_host_library() -> Optional[str]:
    """Loads libnvshmem_host from the first directory that has it; returns its path."""
    for d in library_dirs():
        for name in (HOST_LIBRARY, "libnvshmem_host.so"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path)
                    return path
                except OSError:  # keep looking; the import below reports what failed
                    pass
    return None


def _import_extension():
    return importlib.import_module("jax_ep._jax_ep_nvshmem")


def _extension_built() -> bool:
    try:
        return importlib.util.find_spec("jax_ep._jax_ep_nvshmem") is not None
    except (ImportError, ValueError):
        return False


def _load():
    """The extension module, or None (then :data:`_load_error` says why). Never raises."""
    global _ext, _loaded, _load_error, _preloaded
    if _loaded:
        return _ext
    with _lock:
        if _loaded:
            return _ext
        if not _extension_built():
            _load_error = (
                "jax_ep was built without NVSHMEM (the extension jax_ep._jax_ep_nvshmem is "
                "missing): install the nvidia-nvshmem-cu13 wheel (pip install "
                "'jax_ep[nvshmem]') or set NVSHMEM_DIR, then rebuild jax_ep with nvcc "
                "(pip install --no-build-isolation ., so that the build sees the wheel)")
        else:
            _preloaded = _preload_host_library()
            try:
                _ext = _import_extension()
            except ImportError as e:
                looked = ", ".join(library_dirs()) or "nowhere: no NVSHMEM_DIR, no wheel"
                _load_error = (
                    f"jax_ep's NVSHMEM extension is built, but NVSHMEM's host library could "
                    f"not be loaded ({e}); looked for {HOST_LIBRARY} in {looked}. Install "
                    f"nvidia-nvshmem-cu13 or set NVSHMEM_DIR to an NVSHMEM installation")
        _loaded = True
        return _ext


def is_available() -> bool:
    """True when jax_ep was built with NVSHMEM and its host library loads (no GPU needed)."""
    return _load() is not None


def why_unavailable() -> str:
    if is_available():
        return "NVSHMEM is available"
    return _load_error or "NVSHMEM is unavailable"


def _require():
    ext = _load()
    if ext is None:
        raise NvshmemUnavailableError(f"jax_ep: the RDMA (NVSHMEM) path is unavailable: "
                                      f"{_load_error}")
    return ext


# ----------------------------------------------------------------------------- process model
def check_process_model(devices: Optional[Sequence[Any]] = None) -> int:
    """The CUDA ordinal of this process's one GPU; raises :class:`ProcessModelError` otherwise.

    ``devices`` defaults to ``jax.local_devices()``. NVSHMEM makes each process one PE on one
    GPU, so a process that drives several GPUs (the usual single-process JAX on a node) cannot
    use the RDMA path; its intranode NVLink ops work either way.
    """
    if devices is None:
        import jax
        devices = jax.local_devices()
    devices = list(devices)
    if len(devices) > 1:
        kinds = sorted({str(getattr(d, "platform", "?")) for d in devices})
        raise ProcessModelError(
            f"jax_ep: the RDMA (NVSHMEM) path needs one process per GPU, but this process "
            f"drives {len(devices)} local devices ({', '.join(kinds)}). Start one process per "
            f"GPU and give each exactly one: jax.distributed.initialize(..., "
            f"local_device_ids=[i]) (or CUDA_VISIBLE_DEVICES=i per process). The NVLink "
            f"(intranode) ops also work with one process driving all local GPUs.")
    if not devices:
        raise ProcessModelError("jax_ep: NVSHMEM needs one CUDA GPU; JAX has no local device")
    d = devices[0]
    if getattr(d, "platform", None) != "gpu":
        raise ProcessModelError(
            f"jax_ep: NVSHMEM needs a CUDA GPU, but this process's JAX device is {d} "
            f"(platform {getattr(d, 'platform', '?')!r})")
    return int(d.local_hardware_id)


# ----------------------------------------------------------------------------- lifecycle
def initialize(*, symmetric_size: Optional[int] = None,
               timeout_ms: int = _TIMEOUT_MS) -> Dict[str, Any]:
    """Joins NVSHMEM as PE ``jax.process_index()`` of ``jax.process_count()`` (collective).

    Idempotent: a second call returns the same :func:`info`. With several processes this
    needs ``jax.distributed.initialize()`` first (the unique id travels through its
    key-value store; a process that never calls this fails the others after
    ``timeout_ms``). ``symmetric_size`` (bytes) sets ``NVSHMEM_SYMMETRIC_SIZE``, the most
    the symmetric heap can hold (NVSHMEM's default: 1 GiB), unless that variable is already
    set. Environment variables in :data:`ENV_DEFAULTS` are set unless already set; every
    other ``NVSHMEM_*`` variable is read by NVSHMEM itself at this point.
    """
    global _initialized, _generation
    if symmetric_size is not None:
        symmetric_size = _check_bytes(symmetric_size, "symmetric_size")
    with _lock:
        if _initialized:
            return info()
        device = check_process_model()
        ext = _require()
        import jax

        from jax_ep import distributed

        rank, num_ranks = jax.process_index(), jax.process_count()
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        if symmetric_size is not None:
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(symmetric_size))
        _generation += 1
        if num_ranks == 1:
            uid = ext.get_unique_id()
        else:
            mine = ext.get_unique_id() if rank == 0 else b""
            uid = distributed.all_gather_bytes(f"{_UID_KEY}/{_generation}", mine,
                                               timeout_ms=timeout_ms)[0]
        if len(uid) != ext.unique_id_bytes:
            raise RuntimeError(f"jax_ep: process 0 published a {len(uid)}-byte NVSHMEM unique "
                               f"id, expected {ext.unique_id_bytes}")
        ext.init(device, rank, num_ranks, uid)
        _initialized = True
        return info()


def is_initialized() -> bool:
    return _initialized


def finalize() -> None:
    """Frees every live symmetric allocation and finalises NVSHMEM (collective; no-op if
    not initialised). :func:`initialize` may be called again afterwards."""
    global _initialized
    with _lock:
        if not _initialized:
            return
        _ext.finalize()
        _initialized = False


def info() -> Dict[str, Any]:
    """``{"available", "initialized", "pe", "num_pes", "device", "version", ...}``."""
    ext = _load()
    if ext is None:
        return {"available": False, "initialized": False, "why": _load_error}
    out = dict(ext.info())
    out.update(available=True, host_library=_preloaded,
               live_allocations=ext.num_live_allocations())
    return out


def _require_initialized(what: str):
    if not _initialized:
        raise RuntimeError(f"jax_ep.nvshmem.{what} needs NVSHMEM: call "
                           f"jax_ep.nvshmem.initialize() first (in every process)")
    return _ext


def _check_bytes(num_bytes, name: str = "num_bytes") -> int:
    try:
        if isinstance(num_bytes, bool):
            raise TypeError
        num_bytes = operator.index(num_bytes)  # ints and NumPy integers
    except TypeError:
        raise TypeError(f"jax_ep.nvshmem: {name} must be an int, got "
                        f"{type(num_bytes).__name__}") from None
    if num_bytes <= 0:
        raise ValueError(f"jax_ep.nvshmem: {name} must be > 0, got {num_bytes}")
    return int(num_bytes)


def symmetric_alloc(num_bytes: int) -> int:
    """``nvshmem_malloc`` (collective: every PE, same size, same order); the device address.

    The symmetric heap is bounded by ``NVSHMEM_SYMMETRIC_SIZE`` (set before
    :func:`initialize`) and by the GPU memory XLA leaves free."""
    num_bytes = _check_bytes(num_bytes)
    with _lock:
        return int(_require_initialized("symmetric_alloc").symmetric_alloc(num_bytes))


def symmetric_free(ptr: int) -> None:
    """``nvshmem_free`` of an address from :func:`symmetric_alloc` (collective)."""
    with _lock:
        _require_initialized("symmetric_free").symmetric_free(int(ptr))


def ring_test(num_bytes: int = 1 << 20, iterations: int = 1) -> Dict[str, Any]:
    """Device-side check (collective): each PE puts ``num_bytes`` into the next PE's
    symmetric buffer with ``nvshmemx_putmem_signal_nbi_block`` (and its PE id with
    ``nvshmem_int_p``), waits for its own signal and checks the previous PE's bytes.
    Returns ``{"ok", "mismatched_bytes", "bad_ids", "peer_is_p2p"}``."""
    num_bytes = _check_bytes(num_bytes)
    if int(iterations) < 1:
        raise ValueError(f"jax_ep.nvshmem: iterations must be >= 1, got {iterations}")
    with _lock:
        return dict(_require_initialized("ring_test").ring_test(num_bytes, int(iterations)))


# ----------------------------------------------------------------------------- internode path
_targets_registered = False


def register_ffi_targets() -> None:
    """Registers the internode exchange's XLA FFI target (``jax_ep_rail_exchange``), once."""
    global _targets_registered
    with _lock:
        if _targets_registered:
            return
        ext = _require()
        import jax

        for name, capsule in ext.cuda_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _targets_registered = True


def register_rail(buffer_id: int, ptr: int, num_bytes: int, my_node: int, my_pe: int,
                  pes: Sequence[int]) -> None:
    """Hands a Buffer's symmetric region to the internode exchange (this process only):
    this rank is on node ``my_node``; ``pes[m]`` is the PE of the rank with its local index
    on node ``m``. Clears the region's signals."""
    with _lock:
        _require_initialized("register_rail").register_rail(
            int(buffer_id), int(ptr), int(num_bytes), int(my_node), int(my_pe),
            [int(p) for p in pes])


def unregister_rail(buffer_id: int) -> None:
    with _lock:
        _require_initialized("unregister_rail").unregister_rail(int(buffer_id))


def ll_launchers():
    """The low-latency kernels' launchers over stores and NVSHMEM puts (a capsule for
    ``jax_ep._jax_ep_ffi.register_ll_symmetric``)."""
    return _require().ll_launchers()


def peer_pointer(ptr: int, pe: int) -> int:
    """``nvshmem_ptr``: PE ``pe``'s copy of the symmetric address ``ptr`` as this GPU loads
    and stores it (NVLink or P2P), or 0 where only NVSHMEM puts reach it."""
    with _lock:
        return int(_require_initialized("peer_pointer").peer_pointer(int(ptr), int(pe)))
