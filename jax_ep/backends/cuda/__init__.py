"""CUDA backend: the intranode (NVLink), internode and low-latency kernels as XLA FFI calls.

Implements the backend interface of :mod:`jax_ep.backends` (the same functions,
signatures and results as :mod:`jax_ep.backends.reference`), per rank inside
``shard_map``:

- :mod:`.normal`: ``get_dispatch_layout``, ``dispatch``, ``cached_dispatch``, ``combine``
  inside one NVLink domain; :mod:`.internode`: the same ops where the EP axis spans
  several nodes (``DispatchConfig.node_size``), an RDMA hop plus the NVLink hop;
- :mod:`.low_latency`: ``ll_dispatch``, ``ll_combine`` and the split forms
  ``ll_dispatch_send`` / ``ll_dispatch_recv``, ``ll_combine_send`` / ``ll_combine_recv``;
- :mod:`.buffer`: what :class:`jax_ep.Buffer` needs (allocation and IPC mapping, size
  hints, fit checks);
- :mod:`._ffi`: the custom-call helper and the kernels' limits.
"""

from jax_ep.backends.cuda.buffer import (  # noqa: F401
    allocate_buffer, buffer_bytes_for_rows, check_fits, check_fits_low_latency, free_buffer,
    ll_bytes_hint, nvl_bytes_hint, staging_bytes_for_dispatch, staging_bytes_hint)
from jax_ep.backends.cuda.low_latency import (  # noqa: F401
    DEFAULT_LL_NUM_SMS, DEFAULT_LL_NUM_WARPS, CombineSent, DispatchSent, ll_combine,
    ll_combine_recv, ll_combine_send, ll_dispatch, ll_dispatch_recv, ll_dispatch_send)
from jax_ep.backends.cuda import internode, normal
from jax_ep.backends.cuda.normal import get_dispatch_layout  # noqa: F401


def _path(cfg):
    """The topology decides: one NVLink domain -> intranode kernels, several -> internode."""
    return internode if internode.spans_nodes(cfg) else normal


def dispatch(payload, topk_idx, topk_weights, cfg):
    return _path(cfg).dispatch(payload, topk_idx, topk_weights, cfg)


def cached_dispatch(x, handle, cfg):
    return _path(cfg).cached_dispatch(x, handle, cfg)


def combine(y, weights, handle, cfg):
    return _path(cfg).combine(y, weights, handle, cfg)


SUPPORTED_OPS = ("dispatch", "combine", "get_dispatch_layout", "low_latency")
# What backend="auto" picks. The low-latency kernels match the reference bitwise but are
# still slower than jax.lax.all_to_all (bench/results/low_latency-*.json), so they run
# only when asked for with backend="cuda" until they are tuned.
AUTO_OPS = ("dispatch", "combine", "get_dispatch_layout")
