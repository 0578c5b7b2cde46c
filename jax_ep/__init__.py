"""jax_ep: expert-parallel (MoE) dispatch and combine for JAX.

Every op runs per rank inside ``jax.shard_map`` over the expert-parallel mesh
axis, on the CUDA kernels (with a :class:`Buffer`) or the pure-JAX reference
backend. See README.md for the API and examples.
"""

from jax_ep import fp8
from jax_ep._native import cuda_available, cuda_status
from jax_ep.buffer import Buffer
from jax_ep.check import CapacityError, ExpertIdError, check
from jax_ep.grouped_matmul import grouped_matmul, masked_grouped_matmul
from jax_ep.low_latency import (
    LowLatencyCombinePending,
    LowLatencyDispatchPending,
    low_latency_combine,
    low_latency_combine_recv,
    low_latency_combine_send,
    low_latency_dispatch,
    low_latency_dispatch_recv,
    low_latency_dispatch_send,
)
from jax_ep.ops import combine, default_capacity, dispatch, get_dispatch_layout
from jax_ep.overlap import beside
from jax_ep import moe  # the MoE layer's functional core (needs no Flax); after ops
from jax_ep.types import (
    DispatchHandle,
    DispatchLayout,
    DispatchResult,
    LowLatencyDispatchResult,
    LowLatencyHandle,
)

__version__ = "0.1.0"

__all__ = [
    "Buffer", "CapacityError", "DispatchHandle", "DispatchLayout", "DispatchResult",
    "beside",
    "ExpertIdError", "cuda_status",
    "LowLatencyCombinePending", "LowLatencyDispatchPending", "LowLatencyDispatchResult",
    "LowLatencyHandle", "check", "combine", "cuda_available", "default_capacity", "dispatch",
    "fp8", "get_dispatch_layout", "grouped_matmul", "low_latency_combine",
    "low_latency_combine_recv", "low_latency_combine_send", "low_latency_dispatch",
    "low_latency_dispatch_recv", "low_latency_dispatch_send", "masked_grouped_matmul", "moe",
]
