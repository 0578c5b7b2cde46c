"""CUDA backend: the intranode (NVLink) kernels as XLA FFI custom calls.

Same functions, signatures and results as :mod:`jax_ep.backends.reference`, called per
rank inside ``shard_map``; each op is one ``jax.ffi.ffi_call`` whose result shapes come
from the static config (no host synchronisation). The communication buffer is
allocated by :func:`allocate_buffer` for a :class:`jax_ep.Buffer` and found by the
handlers from ``(buffer_id, device ordinal)``.

Rows move directly between the GPUs' XLA buffers (dispatch pushes into the receivers'
outputs, combine pulls from every rank's ``y``), so the communication buffer holds only
counts, flags and published pointers (bench/NOTES.md has the design). In one
process the GPUs reach each other's memory through CUDA peer access. With one process per
GPU (``jax.distributed``) XLA's memory cannot be mapped by other processes (its
allocations refuse CUDA IPC export), so each process also allocates a staging area; the
buffers and staging areas are mapped through CUDA IPC handles exchanged over the
key-value store, an op publishes staging addresses instead of its XLA buffers and copies
between the two locally, and the kernels are the same (a published address plus a
per-peer offset).
"""

from __future__ import annotations

import itertools
import json
import threading
import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _native, fp8
from jax_ep.types import DispatchConfig, HandleArrays

SUPPORTED_OPS = ("dispatch", "combine", "get_dispatch_layout", "low_latency")
# What backend="auto" picks. The low-latency kernels match the reference bitwise but are
# still slower than jax.lax.all_to_all (bench/results/low_latency-*.json), so they run
# only when asked for with backend="cuda" until they are tuned.
AUTO_OPS = ("dispatch", "combine", "get_dispatch_layout")

I32 = jnp.int32
F32 = jnp.float32
_LAYOUT_CODE = {"rank": 0, "expert": 1}
# Buffer ids are unique per process: the C++ registry is keyed by (id, device).
_next_buffer_id = itertools.count(1)
_id_lock = threading.Lock()

# Mirrors cuda/buffer_layout.h when the extension is missing (size hints still work).
_MAX_RANKS, _MAX_EXPERTS, _MAX_TOPK = 8, 1024, 16


def _ext():
    return _native.extension()


def _i64(v) -> np.int64:
    return np.int64(v)


def _call(name: str, results, *args, axis_name: Optional[str] = None, **attrs):
    _native.load()
    if axis_name is not None:  # ffi_call wants every operand of the same vma type
        args = tuple(_varying(a, axis_name) for a in args)
    out = jax.ffi.ffi_call(name, results, has_side_effect=True)(*args, **attrs)
    if axis_name is None:
        return out
    return jax.tree.map(lambda a: _varying(a, axis_name), out)


def _varying(x: jax.Array, axis_name: str) -> jax.Array:
    """Marks a custom call's per-rank result as varying over the EP axis.

    ffi_call results carry no varying-manual-axes type, while the reference backend's
    (collective) results vary over the axis; custom VJPs and scans under shard_map's
    check_vma compare the two, so the CUDA results must say so too.
    """
    try:
        aval = jax.typeof(x)
        vma = getattr(aval, "vma", None)
        if vma is None:  # jax 0.10 spells it aval.mat.varying
            vma = getattr(getattr(aval, "mat", None), "varying", None)
    except Exception:
        vma = None
    if vma is None or axis_name in vma:  # no vma types here, or already varying
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axis_name, to="varying")
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axis_name)
    return x


# ----------------------------------------------------------------------------- buffers

def buffer_bytes_for_rows(rows: int) -> int:
    """Bytes a buffer needs for dispatches that receive up to ``rows`` rows per rank."""
    ext = _native.load()
    if ext is not None and getattr(ext, "with_cuda", False):
        return int(ext.buffer_bytes_for_rows(int(rows)))
    return (256 << 10) + (-(-4 * int(rows) // 4096)) * 4096


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
    """Staging bytes a dispatch needs with one process per GPU (xla_ffi/cuda_handlers.cc
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


def _ep_groups(mesh, axis_name: str):
    """Device groups along ``axis_name`` (one per coordinate of the other axes), rank order."""
    devices = np.asarray(mesh.devices)
    axis = list(mesh.axis_names).index(axis_name)
    moved = np.moveaxis(devices, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def allocate_buffer(buffer) -> None:
    """Allocates and peer-maps the NVLink buffer of every GPU of ``buffer.mesh``; sets
    ``buffer.buffer_id``. Collective when the EP axis spans several processes: every
    process must create its Buffers in the same order."""
    ext = _ext()
    if not ext.with_cuda:
        raise RuntimeError("jax_ep.Buffer: the extension was built without CUDA")
    num_bytes = int(buffer.num_nvl_bytes)
    groups = _ep_groups(buffer.mesh, buffer.axis_name)
    if groups.shape[1] > _MAX_RANKS:
        raise ValueError(f"jax_ep.Buffer: the intranode kernels support up to {_MAX_RANKS} ranks "
                         f"on the EP axis, got {groups.shape[1]}")
    me = jax.process_index()
    multi_process = any(d.process_index != me for d in groups.flat)
    with _id_lock:
        buffer_id = next(_next_buffer_id)
    _check_one_nvlink_domain(groups, buffer_id)
    if multi_process:
        staging = buffer.num_staging_bytes
        if staging is None:
            staging = staging_bytes_hint(4096, 7168, groups.shape[1])
        buffer.num_staging_bytes = int(staging)
        _allocate_multi_process(ext, buffer_id, groups, num_bytes, int(staging))
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


def _check_one_nvlink_domain(groups, buffer_id: int) -> None:
    """The intranode kernels need every rank of an EP group in one NVLink domain (a host,
    or a logical node of JAX_EP_NODE_SIZE ranks); the internode kernels do not exist yet."""
    from jax_ep import distributed

    hosts = distributed.process_hosts(f"buffer/{buffer_id}/hosts")
    for group in groups:
        domains = distributed.nvlink_domains(list(group), hosts=hosts)
        if len(domains) > 1:
            raise NotImplementedError(
                f"jax_ep.Buffer: the EP axis spans {len(domains)} NVLink domains (nodes) "
                f"{domains}; this version has only the intranode (NVLink) kernels. Use an EP "
                "axis inside one node, or backend='reference' (unset JAX_EP_NODE_SIZE if it "
                "was set for testing)")


def _exchange(key: str, error: str, data: dict) -> dict:
    """All-gathers ``data`` (str -> bytes) and fails on every process if any reported an error."""
    from jax_ep import distributed

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
    from jax_ep import distributed

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
    if buffer.multi_process:
        _free_multi_process(_ext(), int(buffer.buffer_id))
    else:
        _ext().destroy_buffer(int(buffer.buffer_id))


def check_fits(buffer, cfg: DispatchConfig, payload) -> None:
    """Raises at trace time when ``cfg`` needs more than ``buffer`` provides."""
    if cfg.num_ranks != buffer.num_ranks:
        raise ValueError(f"dispatch: the buffer was made for {buffer.num_ranks} ranks but the "
                         f"axis {cfg.axis_name!r} has {cfg.num_ranks}")
    if cfg.num_topk > _MAX_TOPK:
        raise ValueError(f"dispatch: the CUDA kernels support num_topk <= {_MAX_TOPK}, got "
                         f"{cfg.num_topk}")
    if cfg.num_experts > _MAX_EXPERTS:
        raise ValueError(f"dispatch: the CUDA kernels support num_experts <= {_MAX_EXPERTS}, "
                         f"got {cfg.num_experts}")
    if cfg.num_ranks > _MAX_RANKS:
        raise ValueError(f"dispatch: the CUDA kernels support up to {_MAX_RANKS} ranks")
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


def _require_buffer(cfg: DispatchConfig, op: str) -> int:
    if cfg.buffer_id is None:
        raise ValueError(f"{op}: the CUDA backend needs buffer=jax_ep.Buffer(mesh, axis_name)")
    return int(cfg.buffer_id)


# ----------------------------------------------------------------------------- ops

def get_dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int):
    T = topk_idx.shape[0]
    results = (jax.ShapeDtypeStruct((num_ranks,), I32),
               jax.ShapeDtypeStruct((num_experts,), I32),
               jax.ShapeDtypeStruct((T, num_ranks), jnp.bool_))
    # The handler reads num_ranks and num_experts from the result shapes.
    return tuple(_call("jax_ep_dispatch_layout", results, topk_idx.astype(I32)))


def dispatch(payload: Tuple[jax.Array, ...], topk_idx: jax.Array, topk_weights: jax.Array,
             cfg: DispatchConfig):
    buffer_id = _require_buffer(cfg, "dispatch")
    R, T, K, L, cap = (cfg.num_ranks, cfg.num_tokens, cfg.num_topk, cfg.num_local_experts,
                       cfg.capacity)
    rank_layout = cfg.layout == "rank"
    meta_shape = (cap, K) if rank_layout else (cap,)
    results = [
        jax.ShapeDtypeStruct(meta_shape, I32),   # recv_topk_idx
        jax.ShapeDtypeStruct(meta_shape, F32),   # recv_topk_weights
        jax.ShapeDtypeStruct((), I32),           # num_recv_tokens
        jax.ShapeDtypeStruct((L,), I32),         # num_recv_tokens_per_expert
        jax.ShapeDtypeStruct((L,), I32),         # group_sizes
        jax.ShapeDtypeStruct((), I32),           # num_overflow
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_rank
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_token
        jax.ShapeDtypeStruct((cap,), I32),       # recv_src_slot
        jax.ShapeDtypeStruct((T, R) if rank_layout else (T, K), I32),  # send_pos
    ] + [jax.ShapeDtypeStruct((cap,) + p.shape[1:], p.dtype)
         for p in (fp8.cast_shapes(payload[0]) if cfg.cast_fp8 else payload)]
    if T == 0:  # T is static and equal on every rank: nobody sends anything
        return _empty_dispatch(results, len(results) - 10, cfg)
    outs = _call("jax_ep_dispatch", results, topk_idx.astype(I32), topk_weights.astype(F32),
                 *payload, axis_name=cfg.axis_name, buffer_id=_i64(buffer_id),
                 num_sms=_i64(cfg.num_sms), expert_alignment=_i64(cfg.expert_alignment))
    (recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow, src_rank, src_token,
     src_slot, send_pos) = outs[:10]
    recv_payload = tuple(outs[10:])
    handle = HandleArrays(recv_src_rank=src_rank, recv_src_token=src_token,
                          recv_src_slot=src_slot, send_pos=send_pos)
    return (recv_payload, recv_idx, recv_w, num_recv, per_expert, group_sizes, overflow, handle)


def _empty_dispatch(results, num_payloads: int, cfg: DispatchConfig):
    """What a dispatch with no tokens anywhere returns (no kernel launch needed)."""
    # Derived from axis_index so the values live inside the manual computation.
    zero = jax.lax.axis_index(cfg.axis_name).astype(I32) * 0
    fill = lambda r, v: jnp.full(r.shape, v, r.dtype) + zero.astype(r.dtype)
    (idx_r, w_r, nrecv_r, per_r, grp_r, ovf_r, srank_r, stok_r, sslot_r, spos_r) = results[:10]
    recv_payload = tuple(fill(r, 0) for r in results[10:10 + num_payloads])
    handle = HandleArrays(recv_src_rank=fill(srank_r, -1), recv_src_token=fill(stok_r, -1),
                          recv_src_slot=fill(sslot_r, -1), send_pos=fill(spos_r, -1))
    return (recv_payload, fill(idx_r, -1), fill(w_r, 0), fill(nrecv_r, 0), fill(per_r, 0),
            fill(grp_r, 0), fill(ovf_r, 0), handle)


def cached_dispatch(x: jax.Array, handle: HandleArrays, cfg: DispatchConfig) -> jax.Array:
    """``x [T, W]`` moved into the rows of the dispatch that made ``handle`` (zeros elsewhere)."""
    buffer_id = _require_buffer(cfg, "cached_dispatch")
    out = jax.ShapeDtypeStruct((cfg.capacity,) + x.shape[1:], x.dtype)
    if cfg.num_tokens == 0:
        return _varying(jnp.zeros(out.shape, out.dtype), cfg.axis_name)
    return _call("jax_ep_cached_dispatch", out, x, handle.recv_src_rank, handle.recv_src_token,
                 axis_name=cfg.axis_name, buffer_id=_i64(buffer_id), num_sms=_i64(cfg.num_sms))


def combine(y: jax.Array, weights: Optional[jax.Array], handle: HandleArrays,
            cfg: DispatchConfig) -> jax.Array:
    """out[t] = sum over the rows of t of weights[row] * y[row], fp32 accumulation."""
    buffer_id = _require_buffer(cfg, "combine")
    width = y.shape[1]
    if cfg.num_tokens == 0:
        return _varying(jnp.zeros((0, width), y.dtype), cfg.axis_name)
    per_vector = 16 // jnp.dtype(y.dtype).itemsize
    pad = (-width) % per_vector  # the kernel moves 16-byte vectors (e.g. f32 width-K grads)
    if pad:
        y = jnp.pad(y, ((0, 0), (0, pad)))
    has_weights = weights is not None
    w = weights.astype(F32) if has_weights else jnp.zeros((1,), F32)
    out = jax.ShapeDtypeStruct((cfg.num_tokens, width + pad), y.dtype)
    res = _call("jax_ep_combine", out, y, w, handle.send_pos, handle.recv_src_rank,
                handle.recv_src_token, handle.recv_src_slot, axis_name=cfg.axis_name,
                buffer_id=_i64(buffer_id),
                num_sms=_i64(cfg.num_sms), layout=_i64(_LAYOUT_CODE[cfg.layout]),
                has_weights=bool(has_weights))
    return res[:, :width] if pad else res


# Low-latency ops (cuda/low_latency.cu): same signatures as reference.ll_dispatch/ll_combine.
from jax_ep.backends.cuda_low_latency import ll_combine, ll_dispatch  # noqa: E402,F401
