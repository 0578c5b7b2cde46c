"""Backend selection: ``"reference"`` (pure JAX) or ``"cuda"`` (XLA FFI kernels).

The backend interface: each backend module (:mod:`.reference`, :mod:`.cuda`) provides,
called per rank inside ``shard_map`` with the static config of the op,

- ``get_dispatch_layout(topk_idx, *, num_experts, num_ranks)``;
- ``dispatch(payload, topk_idx, topk_weights, cfg)``, ``cached_dispatch(x, handle, cfg)``,
  ``combine(y, weights, handle, cfg)`` (:class:`~jax_ep.types.DispatchConfig`);
- ``ll_dispatch(x, topk_idx, slot_scale, cfg)``,
  ``ll_combine(y, topk_idx, topk_weights, handle, cfg)``
  (:class:`~jax_ep.types.LowLatencyConfig`), and their split forms:
  ``ll_dispatch_send(x, topk_idx, cfg, slot_scale=None) -> sent``,
  ``ll_dispatch_recv(sent, cfg, dtype, *, hidden) -> (recv_x, recv_count, handle)``,
  ``ll_combine_send(y, handle, cfg) -> sent``,
  ``ll_combine_recv(sent, topk_idx, topk_weights, handle, cfg, dtype, width) -> out``,
  where ``sent`` is a pytree of arrays that only the same backend's ``*_recv`` reads.

Every function returns the same values (bitwise) on both backends; the reference backend
defines them.

``"auto"`` picks CUDA when the extension is built, a GPU is present, a CUDA
:class:`jax_ep.Buffer` was passed and the op has a CUDA kernel that is ready for
"auto" (``AUTO_OPS``; the low-latency kernels need ``backend="cuda"`` for now); otherwise it
picks the reference backend, and says so once with a warning when a GPU was
there to be used (never silently).
"""

from __future__ import annotations

import importlib
import warnings

BACKENDS = ("auto", "cuda", "reference")
_warned = set()


def get(name: str):
    """The backend module for a resolved backend name."""
    if name == "reference":
        from jax_ep.backends import reference
        return reference
    if name == "cuda":
        return importlib.import_module("jax_ep.backends.cuda")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def uses_buffer(name: str) -> bool:
    """Whether the resolved backend ``name`` communicates through a :class:`jax_ep.Buffer`
    (its ops then take the buffer's id and check that the call fits)."""
    return name == "cuda"


def side_stream(buffer, name: str) -> bool:
    """Whether the ops of the resolved backend ``name`` run on the side stream: the CUDA
    backend's, when the Buffer asks for it (the reference backend's exchanges are XLA's
    collectives, which XLA schedules on its own streams)."""
    return uses_buffer(name) and bool(getattr(buffer, "side_stream", False))


def _cuda_has(op: str, auto: bool = False) -> bool:
    """Whether the CUDA backend has a kernel for ``op`` (that "auto" may pick, if ``auto``)."""
    try:
        module = importlib.import_module("jax_ep.backends.cuda")
    except ImportError:
        return False
    supported = getattr(module, "SUPPORTED_OPS", ())
    return op in (getattr(module, "AUTO_OPS", supported) if auto else supported)


def resolve(backend: str, buffer, op: str, needs_buffer: bool = True) -> str:
    """Resolves ``backend`` for one call of ``op`` ("dispatch", "low_latency", ...).

    ``needs_buffer=False`` is for local ops (``get_dispatch_layout``) that run on the GPU
    without communication memory."""
    from jax_ep import _native

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    cuda_ok = _native.cuda_available()
    has_cuda_buffer = (not needs_buffer or
                       (buffer is not None and getattr(buffer, "buffer_id", None) is not None))
    if backend == "cuda":
        if not cuda_ok:
            raise RuntimeError(
                "backend='cuda' needs the jax_ep CUDA kernels and a Hopper GPU visible to JAX, "
                f"but {_why_unavailable(_native)}; use backend='reference' or 'auto'")
        if not _cuda_has(op):
            raise NotImplementedError(
                f"the CUDA backend has no kernel for {op!r} yet; use backend='reference'")
        if not has_cuda_buffer:
            raise ValueError(
                f"backend='cuda' needs buffer=jax_ep.Buffer(mesh, axis_name) for {op!r}: the "
                "kernels communicate through memory that the Buffer allocates")
        return "cuda"
    if cuda_ok and has_cuda_buffer and _cuda_has(op, auto=True):
        return "cuda"
    on_gpu = cuda_ok or _default_platform_is_gpu()
    if on_gpu and op not in _warned:
        _warned.add(op)
        reason = (f"the CUDA kernels are unavailable ({_why_unavailable(_native)})"
                  if not cuda_ok else
                  "the CUDA backend has no kernel for it yet" if not _cuda_has(op) else
                  "its CUDA kernel is not yet faster than the reference; pass backend='cuda' "
                  "to use it" if not _cuda_has(op, auto=True) else
                  "no buffer=jax_ep.Buffer(mesh, axis_name) was passed")
        warnings.warn(f"jax_ep.{op}: using the reference (all_to_all) backend on GPU because "
                      f"{reason}", stacklevel=4)
    return "reference"


def _why_unavailable(native) -> str:
    explain = getattr(native, "why_unavailable", None)
    return explain() if explain else "extension not built with CUDA, or no GPU"


def _default_platform_is_gpu() -> bool:
    import jax
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False
