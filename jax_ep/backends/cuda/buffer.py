"""CUDA backend, communication buffers: allocation, IPC mapping, size hints, fit checks.

In one process the GPUs reach each other's memory through CUDA peer access. With one
process per GPU (``jax.distributed``) XLA's memory cannot be mapped by other processes (its
allocations refuse CUDA IPC export), so each process also allocates a staging area; the
buffers and staging areas are mapped through CUDA IPC handles exchanged over the
key-value store, an op publishes staging addresses instead of its XLA buffers and copies
between the two locally, and the kernels are the same (a published address plus a
per-peer offset).

The buffer of each GPU holds the normal kernels' counts, flags and published pointers
(rows move directly between XLA's buffers), then, at ``ll_offset``, the low-latency region
(``cuda/low_latency/low_latency.h``): a header and two halves of receive slots that
consecutive low-latency ops alternate between. Where the EP axis spans several nodes, the
low-latency region is an NVSHMEM symmetric allocation of its own instead (the part of
``num_nvl_bytes`` past ``ll_data_offset`` sizes its halves, plus a third block of that size
that stages the rows put to other nodes); the ranks of the node reach it over NVLink, the
others by NVSHMEM puts.
"""

from __future__ import annotations

import itertools
import json
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import distributed
from jax_ep.backends.cuda._ffi import extension, limits
from jax_ep.types import DispatchConfig, LowLatencyConfig

# Buffer ids are unique per process: the C++ registry is keyed by (id, device).
_next_buffer_id = itertools.count(1)
_id_lock = threading.Lock()


# ----------------------------------------------------------------------------- normal ops

def buffer_bytes_for_rows(rows: int) -> int:
    """Bytes a buffer needs for dispatches that receive up to ``rows`` rows per rank
    (cuda/common/buffer_layout.h ``buffer_bytes_for_rows``)."""
    return limits()["dup_src_offset"] + _align(4 * int(rows), 4096)


def nvl_bytes_hint(num_tokens: int, hidden: int, num_ranks: int, dtype_bytes: int = 2,
                   num_topk: int = 9, num_experts: Optional[int] = None,
                   expert_alignment: int = 128) -> int:
    """NVLink buffer bytes per GPU for normal dispatch/combine of ``num_tokens`` per rank.

    Rows travel straight between XLA's buffers of the GPUs, so the buffer holds only
    routing metadata: its size grows with the received rows of an expert-layout dispatch
    (one int each), not with ``hidden``. The default covers every capacity up to the
    expert layout's never-overflowing default with up to ``num_topk`` slots.
    """
    del hidden, dtype_bytes  # payload bytes never live in the buffer
    local = (num_experts // num_ranks) if num_experts else 256
    rows = num_ranks * num_tokens * num_topk + local * max(expert_alignment - 1, 0)
    # Headroom (it costs little): twice the tokens still fit without a new Buffer.
    return max(buffer_bytes_for_rows(2 * rows), 16 << 20)


def _align256(n: int) -> int:
    return (n + 255) // 256 * 256


def staging_bytes_for_dispatch(capacity: int, payload_row_bytes, num_topk: int,
                               layout: str) -> int:
    """Staging bytes a dispatch needs with one process per GPU (xla_ffi/normal_handlers.cc
    carves the same slots): every received row's payloads and metadata."""
    meta = 4 * (num_topk if layout == "rank" else 1)
    rows = list(payload_row_bytes) + [meta, meta, 4, 4, 4]
    return sum(_align256(capacity * b) for b in rows)


def staging_bytes_hint(num_tokens: int, hidden: int, num_ranks: int, dtype_bytes: int = 2,
                       num_topk: int = 8) -> int:
    """Staging area per GPU (one process per GPU only) for rank-layout dispatch/combine of
    ``num_tokens`` per rank at the never-overflowing capacity ``R*T``."""
    cap = num_ranks * num_tokens
    return staging_bytes_for_dispatch(cap, [hidden * dtype_bytes], num_topk, "rank") + (1 << 20)


def allocate_buffer(buffer) -> None:
    """Allocates and peer-maps the NVLink buffer of every GPU of ``buffer.mesh``; sets
    ``buffer.buffer_id``. Collective when the EP axis spans several processes: every
    process must create its Buffers in the same order. Where the axis spans several nodes
    (``buffer.node_size`` ranks each) the NVLink buffers are per node and each process also
    allocates the RDMA region of the internode path (:func:`_allocate_internode`)."""
    ext = extension()
    if not ext.with_cuda:
        raise RuntimeError("jax_ep.Buffer: the extension was built without CUDA")
    num_bytes = int(buffer.num_nvl_bytes)
    groups = distributed.ep_groups(buffer.mesh, buffer.axis_name)
    num_ranks = groups.shape[1]
    node_size = int(getattr(buffer, "node_size", None) or num_ranks)
    max_ranks = limits()["max_ranks"]
    if node_size > max_ranks:
        raise ValueError(f"jax_ep.Buffer: the NVLink kernels support up to {max_ranks} ranks "
                         f"per node on the EP axis, got {node_size}")
    me = jax.process_index()
    multi_process = any(d.process_index != me for d in groups.flat)
    with _id_lock:
        buffer_id = next(_next_buffer_id)
    spans_nodes = node_size < num_ranks
    node_groups = groups.reshape(-1, node_size)  # one row per node of each EP group
    if spans_nodes:
        _require_internode_process_model(groups, node_size)
    if multi_process:
        staging = buffer.num_staging_bytes
        if staging is None:
            staging = staging_bytes_hint(4096, 7168, num_ranks)
        buffer.num_staging_bytes = int(staging)
        _allocate_multi_process(ext, buffer_id, node_groups, num_bytes, int(staging))
    else:
        created = False
        try:
            for group in groups:
                ext.create_buffer(buffer_id, [int(d.local_hardware_id) for d in group],
                                  num_bytes)
                created = True
        except Exception:
            if created:
                ext.destroy_buffer(buffer_id)
            raise
    buffer.buffer_id = buffer_id
    buffer.multi_process = multi_process
    if spans_nodes:
        try:
            _allocate_internode(buffer, buffer_id, groups, node_size)
        except Exception:
            _free_multi_process(ext, buffer_id)
            buffer.buffer_id = None
            raise


def _require_internode_process_model(groups, node_size: int) -> None:
    """The RDMA hop is NVSHMEM's: one process per GPU, the extension built with it."""
    from jax_ep import nvshmem

    num_nodes = groups.shape[1] // node_size
    if not nvshmem.is_available():
        raise RuntimeError(
            f"jax_ep.Buffer: the EP axis spans {num_nodes} nodes of {node_size} ranks, which "
            f"needs the internode (NVSHMEM) kernels, but {nvshmem.why_unavailable()}. Install "
            "nvidia-nvshmem-cu13 (or set NVSHMEM_DIR) before building jax_ep, keep the EP "
            "axis inside one node, or use backend='reference'")
    nvshmem.check_process_model()


def _allocate_internode(buffer, buffer_id: int, groups, node_size: int) -> None:
    """NVSHMEM (initialised here if needed) and this process's symmetric RDMA region,
    registered with the rail exchange's FFI handler (collective, like the Buffer)."""
    from jax_ep import nvshmem
    from jax_ep.backends.cuda import internode

    num_nodes = groups.shape[1] // node_size
    rdma = buffer.num_rdma_bytes
    if rdma is None:
        rdma = internode.rdma_bytes_hint(4096, 7168, num_nodes)
    rdma = int(rdma)
    ll_bytes = _ll_symmetric_bytes(int(buffer.num_nvl_bytes))
    nvshmem.initialize(symmetric_size=max(1 << 30, rdma + ll_bytes + (64 << 20)))
    nvshmem.register_ffi_targets()
    ptr = nvshmem.symmetric_alloc(rdma)
    me = jax.process_index()
    row, col = [(i, j) for i in range(groups.shape[0]) for j in range(groups.shape[1])
                if groups[i, j].process_index == me][0]
    local = col % node_size
    pes = [int(groups[row, m * node_size + local].process_index) for m in range(num_nodes)]
    try:
        nvshmem.register_rail(buffer_id, ptr, rdma, col // node_size, me, pes)
    except Exception:
        nvshmem.symmetric_free(ptr)
        raise
    buffer.num_rdma_bytes = rdma
    buffer.rdma_ptr = ptr
    internode.rdma_bytes[buffer_id] = rdma
    buffer.ll_symmetric_ptr = None
    buffer.num_ll_symmetric_bytes = 0
    if ll_bytes:
        try:
            _allocate_ll_symmetric(buffer, buffer_id, groups, row, col, node_size, ll_bytes)
        except Exception:
            _free_internode(buffer)
            raise


def _ll_symmetric_bytes(num_nvl_bytes: int) -> int:
    """Bytes of the symmetric low-latency region that ``num_nvl_bytes`` asks for (0: the
    Buffer has no low-latency region): the same halves, plus the staging block."""
    half = _half_available(num_nvl_bytes)
    return limits()["ll_halves_offset"] + 3 * half if half else 0


def _allocate_ll_symmetric(buffer, buffer_id: int, groups, row: int, col: int,
                           node_size: int, num_bytes: int) -> None:
    """The low-latency region of an EP group over several nodes (collective): this rank's
    symmetric allocation, every rank's copy as this GPU reaches it (nvshmem_ptr inside the
    node, 0 across nodes), registered with the low-latency handlers; then a barrier, so
    that no rank signals into a region whose header is not cleared yet."""
    from jax_ep import nvshmem

    ext = extension()
    ptr = nvshmem.symmetric_alloc(num_bytes)
    pes = [int(d.process_index) for d in groups[row]]
    my_node = col // node_size
    error = ""
    try:
        regions = []
        for r, pe in enumerate(pes):
            same_node = r // node_size == my_node
            mapped = nvshmem.peer_pointer(ptr, pe) if same_node else 0
            if same_node and mapped == 0:
                raise RuntimeError(
                    f"jax_ep.Buffer: rank {r} is on this rank's node (node_size={node_size}) "
                    f"but NVSHMEM gives no load/store mapping of its memory (nvshmem_ptr "
                    f"returned NULL for PE {pe}); the ranks of a node must reach each other "
                    "over NVLink or PCIe P2P")
            regions.append(mapped)
        ext.register_ll_symmetric(buffer_id, int(groups[row, col].local_hardware_id), col,
                                  regions, pes, num_bytes, nvshmem.ll_launchers())
    except Exception as err:  # published so that peers fail with it instead of timing out
        error = str(err)
    try:
        _exchange(f"buffer/{buffer_id}/ll_symmetric", error, {})
    except Exception:
        ext.unregister_ll_symmetric(buffer_id)
        nvshmem.symmetric_free(ptr)
        raise
    buffer.ll_symmetric_ptr = ptr
    buffer.num_ll_symmetric_bytes = num_bytes


def _free_internode(buffer) -> None:
    from jax_ep import nvshmem
    from jax_ep.backends.cuda import internode

    if getattr(buffer, "ll_symmetric_ptr", None) is not None:
        extension().unregister_ll_symmetric(int(buffer.buffer_id))
        nvshmem.symmetric_free(buffer.ll_symmetric_ptr)  # collective, same order everywhere
        buffer.ll_symmetric_ptr = None
    internode.rdma_bytes.pop(buffer.buffer_id, None)
    nvshmem.unregister_rail(int(buffer.buffer_id))
    nvshmem.symmetric_free(buffer.rdma_ptr)  # collective: every process, same order
    buffer.rdma_ptr = None


def _exchange(key: str, error: str, data: dict) -> dict:
    """All-gathers ``data`` (str -> bytes) and fails on every process if any reported an error."""
    payload = json.dumps({"error": error, "data": {k: v.hex() for k, v in data.items()}})
    gathered = [json.loads(b) for b in distributed.all_gather_bytes(key, payload.encode())]
    errors = [f"process {p}: {g['error']}" for p, g in enumerate(gathered) if g["error"]]
    if errors:
        raise RuntimeError("jax_ep.Buffer: creating the buffer failed on " + "; ".join(errors))
    return {k: bytes.fromhex(v) for g in gathered for k, v in g["data"].items()}


def _allocate_multi_process(ext, buffer_id: int, groups, num_bytes: int,
                            staging_bytes: int) -> None:
    """One process per GPU (or per host): export, exchange, import; see module docstring."""
    me = jax.process_index()
    local = [d for d in groups.flat if d.process_index == me]
    exports, error = {}, ""
    try:
        for d in local:
            exports[str(d.id)] = ext.export_buffer(buffer_id, int(d.local_hardware_id),
                                                   num_bytes, staging_bytes)
    except Exception as err:  # published so that peers fail with it instead of timing out
        error = str(err)
    try:
        blobs = _exchange(f"buffer/{buffer_id}/export", error, exports)
    except Exception:
        ext.destroy_buffer(buffer_id)
        raise
    error = ""
    try:
        for group in groups:
            for rank, d in enumerate(group):
                if d.process_index == me:
                    ext.import_peers(buffer_id, int(d.local_hardware_id), rank,
                                     [blobs[str(x.id)] for x in group])
    except Exception as err:
        error = str(err)
    try:
        _exchange(f"buffer/{buffer_id}/import", error, {})
    except Exception:
        _free_multi_process(ext, buffer_id)
        raise


def _free_multi_process(ext, buffer_id: int) -> None:
    """Close the peers' mappings everywhere before anyone frees what others mapped."""
    ext.unmap_peers(buffer_id)
    try:
        distributed.all_gather_bytes(f"buffer/{buffer_id}/unmapped", b"", timeout_ms=60_000)
    except TimeoutError as err:  # a dead peer maps nothing any more: freeing is safe
        warnings.warn(f"jax_ep.Buffer.close: {err}; freeing this process's buffer anyway")
    finally:
        ext.destroy_buffer(buffer_id)


def free_buffer(buffer) -> None:
    """Frees the buffer (collective when it spans several processes)."""
    if buffer.buffer_id is None:
        return
    if getattr(buffer, "rdma_ptr", None) is not None:
        _free_internode(buffer)
    if buffer.multi_process:
        _free_multi_process(extension(), int(buffer.buffer_id))
    else:
        extension().destroy_buffer(int(buffer.buffer_id))


def check_fits(buffer, cfg: DispatchConfig, payload) -> None:
    """Raises at trace time when ``cfg`` needs more than ``buffer`` provides."""
    if cfg.num_ranks != buffer.num_ranks:
        raise ValueError(f"dispatch: the buffer was made for {buffer.num_ranks} ranks but the "
                         f"axis {cfg.axis_name!r} has {cfg.num_ranks}")
    lim = limits()
    node_ranks = cfg.node_size or cfg.num_ranks  # the NVLink kernels' ranks and experts
    if cfg.num_topk > lim["max_topk"]:
        raise ValueError(f"dispatch: the CUDA kernels support num_topk <= {lim['max_topk']}, got "
                         f"{cfg.num_topk}")
    if cfg.num_local_experts * node_ranks > lim["max_experts"]:
        raise ValueError(f"dispatch: the CUDA kernels support up to {lim['max_experts']} "
                         f"experts per node, got {cfg.num_local_experts * node_ranks}")
    if node_ranks > lim["max_ranks"]:
        raise ValueError(f"dispatch: the CUDA kernels support up to {lim['max_ranks']} ranks "
                         "per node")
    if buffer.multi_process:
        payloads = payload if isinstance(payload, (tuple, list)) else (payload,)
        row_bytes = [int(np.prod(p.shape[1:])) * jnp.dtype(p.dtype).itemsize for p in payloads]
        need = staging_bytes_for_dispatch(cfg.capacity, row_bytes, cfg.num_topk, cfg.layout)
        if need > int(buffer.num_staging_bytes):
            raise ValueError(
                f"dispatch: with one process per GPU the rows travel through the Buffer's "
                f"staging area; this call (layout={cfg.layout!r}, max_recv_tokens="
                f"{cfg.capacity}) needs {need} bytes but the Buffer has "
                f"{buffer.num_staging_bytes}; create it with num_staging_bytes>={need} (see "
                "Buffer.get_staging_size_hint) or pass a smaller max_recv_tokens")
    needed = buffer_bytes_for_rows(cfg.capacity if cfg.layout == "expert" else 0)
    if needed > int(buffer.num_nvl_bytes):
        raise ValueError(
            f"dispatch: this call needs a communication buffer of {needed} bytes per GPU "
            f"(layout={cfg.layout!r}, max_recv_tokens={cfg.capacity}) but the Buffer has "
            f"{buffer.num_nvl_bytes}; create it with num_nvl_bytes>={needed} (see "
            "Buffer.get_dispatch_size_hint)")


# ----------------------------------------------------------------------------- low-latency ops

def _align(n: int, a: int) -> int:
    return -(-int(n) // a) * a


def _dispatch_half_bytes(E, R, M, H, elem_bytes, use_fp8) -> int:
    # rows [R, M, stride] (one per (token, destination rank)), then three [E, M] lists
    stride = _align(H + H // 128 * 4 if use_fp8 else H * elem_bytes, 16)
    return _align(R * M * stride, 256) + 3 * E * M * 4


def _combine_half_bytes(E, M, W, elem_bytes) -> int:
    return E * M * _align(W * elem_bytes, 16)


def ll_bytes_hint(max_tokens_per_rank: int, hidden: int, num_experts: int, num_ranks: int,
                  dtype_bytes: int = 2) -> int:
    """Communication-buffer bytes per GPU for low-latency ops of this size.

    Covers bf16/f16 (``dtype_bytes=2``) or f32 (``4``) dispatch and combine, FP8 dispatch
    included, and their gradients; the normal kernels keep working in the same Buffer.

    Example::

        buf = jax_ep.Buffer(mesh, "ep", num_nvl_bytes=jax_ep.Buffer.get_low_latency_size_hint(
            128, 7168, 256, 8))
    """
    E, R, M, H = int(num_experts), int(num_ranks), int(max_tokens_per_rank), int(hidden)
    half = max(_dispatch_half_bytes(E, R, M, H, dtype_bytes, False),
               _dispatch_half_bytes(E, R, M, H, dtype_bytes, H % 128 == 0),
               _combine_half_bytes(E, M, H, dtype_bytes))
    return _ll_buffer_bytes(half)


def _ll_buffer_bytes(half: int) -> int:
    return limits()["ll_data_offset"] + 2 * _align(half, 4096)


def _half_available(num_bytes: int) -> int:
    data = limits()["ll_data_offset"]
    if num_bytes <= data:
        return 0
    return (num_bytes - data) // 2 // 4096 * 4096


def check_fits_low_latency(buffer, cfg: LowLatencyConfig, dtype=jnp.bfloat16) -> None:
    """Raises at trace time when a low-latency call of ``cfg`` needs more than ``buffer``."""
    spans_nodes = getattr(buffer, "rdma_ptr", None) is not None
    if spans_nodes and not getattr(buffer, "ll_symmetric_ptr", None):
        raise ValueError(
            "low_latency_dispatch: this Buffer's EP axis spans "
            f"{buffer.num_ranks // buffer.node_size} nodes and it was created without a "
            "low-latency region; create it with num_nvl_bytes=jax_ep.Buffer."
            "get_low_latency_size_hint(max_tokens_per_rank, hidden, num_experts, num_ranks) "
            "(over several nodes that region is NVSHMEM symmetric memory)")
    E, R, M, H = cfg.num_experts, cfg.num_ranks, cfg.max_tokens_per_rank, cfg.hidden
    b = jnp.dtype(dtype).itemsize
    half = max(_dispatch_half_bytes(E, R, M, H, b, cfg.use_fp8), _combine_half_bytes(E, M, H, b))
    if half > _half_available(int(buffer.num_nvl_bytes)):
        need = _ll_buffer_bytes(half)
        raise ValueError(
            f"low_latency_dispatch: this call needs a communication buffer of {need} bytes per "
            f"GPU (max_tokens_per_rank={M}, hidden={H}, num_experts={E}) but the Buffer has "
            f"{buffer.num_nvl_bytes}; create it with num_nvl_bytes="
            f"jax_ep.Buffer.get_low_latency_size_hint({M}, {H}, {E}, {cfg.num_ranks})")
