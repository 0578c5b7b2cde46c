"""NVLink-domain grouping and its override (single process)."""

import types

import pytest

from jax_ep import distributed


def _devices(processes):
    return [types.SimpleNamespace(process_index=p) for p in processes]


def test_domains_follow_hosts_of_processes():
    devs = _devices([0, 1, 2, 3])  # one GPU per process, processes 0-1 and 2-3 on two hosts
    assert distributed.nvlink_domains(devs, hosts=["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert distributed.nvlink_domains(devs, hosts=["a"] * 4) == [[0, 1, 2, 3]]


def test_node_size_override(monkeypatch):
    devs = _devices([0, 0, 0, 0])
    assert distributed.nvlink_domains(devs, node_size=2) == [[0, 1], [2, 3]]
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "1")
    assert distributed.nvlink_domains(devs, hosts=["a"]) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="node size 3 must divide the 4 ranks"):
        distributed.nvlink_domains(devs, node_size=3)


def test_single_process_needs_no_store():
    import jax
    assert distributed.process_hosts() and len(distributed.process_hosts()) == 1
    assert distributed.nvlink_domains(jax.devices()[:2]) == [[0, 1]]


def test_buffer_over_several_nodes_needs_nvshmem_and_one_process_per_gpu(monkeypatch):
    """Two logical nodes of 2 GPUs take the internode (NVSHMEM) path: without NVSHMEM, or
    with one process driving several GPUs, the Buffer says what to do instead."""
    import numpy as np

    from jax_ep import nvshmem
    from jax_ep.backends.cuda import buffer as cuda

    groups = np.array([_devices([0, 0, 0, 0])], dtype=object)
    monkeypatch.setattr(nvshmem, "is_available", lambda: False)
    monkeypatch.setattr(nvshmem, "why_unavailable", lambda: "built without NVSHMEM")
    with pytest.raises(RuntimeError, match=r"spans 2 nodes of 2 ranks.*built without NVSHMEM"
                                           r".*nvidia-nvshmem-cu13"):
        cuda._require_internode_process_model(groups, 2)
    monkeypatch.setattr(nvshmem, "is_available", lambda: True)
    with pytest.raises(nvshmem.ProcessModelError):  # CPU devices, several per process
        cuda._require_internode_process_model(groups, 2)


def test_one_process_per_gpu_staging_is_checked_at_trace_time():
    """With one process per GPU rows travel through the staging area: a call that does not
    fit is refused before it runs, naming the bytes it needs and the fix."""
    import jax
    import jax.numpy as jnp

    from jax_ep.backends import cuda
    from jax_ep.types import DispatchConfig

    R, T, H, K = 4, 4096, 7168, 8
    hint = cuda.staging_bytes_hint(T, H, R)
    buf = types.SimpleNamespace(num_ranks=R, multi_process=True, num_staging_bytes=hint,
                                num_nvl_bytes=1 << 30)
    x = jax.ShapeDtypeStruct((T, H), jnp.bfloat16)
    rank_cfg = DispatchConfig(num_experts=256, num_ranks=R, axis_name="ep", layout="rank",
                              capacity=R * T, expert_alignment=1, num_tokens=T, num_topk=K,
                              backend="cuda")
    cuda.check_fits(buf, rank_cfg, x)  # the hint covers the rank layout's default capacity
    expert_cfg = DispatchConfig(num_experts=256, num_ranks=R, axis_name="ep", layout="expert",
                                capacity=R * T * K, expert_alignment=1, num_tokens=T,
                                num_topk=K, backend="cuda")
    need = cuda.staging_bytes_for_dispatch(R * T * K, [2 * H], K, "expert")
    with pytest.raises(ValueError, match=f"needs {need} bytes .* num_staging_bytes>={need}"):
        cuda.check_fits(buf, expert_cfg, x)
    buf.multi_process = False  # one process: rows never touch the staging area
    cuda.check_fits(buf, expert_cfg, x)


def test_malformed_buffer_exports_are_refused_before_any_gpu_call():
    from jax_ep import _native

    ext = _native.extension()
    if not getattr(ext, "with_cuda", False):
        pytest.skip("extension built without CUDA")
    with pytest.raises(RuntimeError, match="rank 0 sent a malformed buffer export"):
        ext.import_peers(12345, 0, 0, [b"x"])
    with pytest.raises(RuntimeError, match="rank 0 sent an export of another jax_ep version"):
        ext.import_peers(12345, 0, 0, [bytes(192), bytes(192)])
    with pytest.raises(RuntimeError, match="rank out of range"):
        ext.import_peers(12345, 0, 2, [bytes(192), bytes(192)])
