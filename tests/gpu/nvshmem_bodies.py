"""NVSHMEM bodies run by tests/multiprocess.py with platform="gpu", one process per GPU.

Each process uses its one JAX device (``jax.local_devices()[0].local_hardware_id``), which
holds both when the launcher hides the other GPUs (CUDA_VISIBLE_DEVICES) and when every
process sees all of them and uses one (``jax.distributed.initialize(local_device_ids=[i])``).
"""

from __future__ import annotations

import jax
import numpy as np

from jax_ep import nvshmem

RING_SIZES = (1, 4097, 1 << 20, 8 << 20)


def _me():
    return {"rank": jax.process_index(), "num_ranks": jax.process_count(),
            "cuda_device": jax.local_devices()[0].local_hardware_id}


def ring(sizes=RING_SIZES, iterations: int = 3):
    """Initialise, run the device-side ring at several sizes, finalise."""
    info = nvshmem.initialize()
    me = _me()
    assert info["pe"] == me["rank"] and info["num_pes"] == me["num_ranks"], info
    assert info["device"] == me["cuda_device"], info
    results = {}
    for n in sizes:
        r = nvshmem.ring_test(n, iterations=iterations)
        assert r["ok"], f"rank {me['rank']}: ring of {n} bytes failed: {r}"
        results[str(n)] = r
    nvshmem.finalize()
    assert not nvshmem.is_initialized()
    return {**me, "info": {k: info[k] for k in ("pe", "num_pes", "device", "version")},
            "peer_is_p2p": results[str(sizes[0])]["peer_is_p2p"], "results": results}


def lifecycle(cycles: int = 3, reinit: bool = True):
    """initialize (twice: idempotent) / alloc / free / finalize, repeated; then re-initialise
    after finalize and check the device path still works."""
    me = _me()
    out = {**me, "cycles": []}
    first = nvshmem.initialize(symmetric_size=2 << 30)  # above NVSHMEM's 1 GiB default
    again = nvshmem.initialize()
    assert first == again, (first, again)
    for c in range(cycles):
        sizes = [1 << 10, 3 << 20, 1200 << 20, 17]  # 1.2 GB needs the larger heap
        ptrs = [nvshmem.symmetric_alloc(n) for n in sizes]
        assert len(set(ptrs)) == len(ptrs) and all(p % 16 == 0 for p in ptrs), ptrs
        assert nvshmem.info()["live_allocations"] == len(sizes)
        for p in ptrs[::2]:
            nvshmem.symmetric_free(p)
        try:
            nvshmem.symmetric_free(ptrs[0])  # twice: refused before reaching NVSHMEM
            raise AssertionError("double free not refused")
        except RuntimeError as e:
            assert "already freed" in str(e)
        out["cycles"].append({"ptrs": len(ptrs), "live": nvshmem.info()["live_allocations"]})
        r = nvshmem.ring_test(1 << 16)
        assert r["ok"], r
        if c + 1 < cycles:
            for p in ptrs[1::2]:
                nvshmem.symmetric_free(p)
    nvshmem.finalize()  # frees the last cycle's remaining allocations
    nvshmem.finalize()  # no-op
    assert not nvshmem.is_initialized()
    if reinit:
        info = nvshmem.initialize()
        assert info["pe"] == me["rank"] and info["live_allocations"] == 0, info
        p = nvshmem.symmetric_alloc(1 << 20)
        r = nvshmem.ring_test(1 << 20, iterations=2)
        assert r["ok"], r
        nvshmem.symmetric_free(p)
        nvshmem.finalize()
        out["reinit"] = True
    return out


def exit_without_finalize():
    """Initialised and never finalised: the process must still exit cleanly."""
    nvshmem.initialize()
    assert nvshmem.ring_test(4096)["ok"]
    nvshmem.symmetric_alloc(1 << 20)
    return _me()


def internode_rank_dies(rank: int = 1):
    """Logical nodes (JAX_EP_NODE_SIZE): one internode dispatch, then rank ``rank`` leaves;
    the others' second dispatch must fail with a timeout message, not hang."""
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep
    from tests import harness

    R = jax.process_count()
    mesh = Mesh(np.array(jax.devices()), (harness.AXIS,))
    buf = jax_ep.Buffer(mesh, harness.AXIS, backend="cuda", num_nvl_bytes=32 << 20,
                        num_rdma_bytes=16 << 20, num_sms=8)
    rng = np.random.default_rng(0)  # the same on every process
    x = rng.standard_normal((R, 64, 256)).astype(np.float32)
    idx, w = harness.routing(rng, R, 64, 2, 4 * R)
    args = [harness.put(mesh, a) for a in (x, idx, w)]

    def body(x, idx, w):
        r = jax_ep.dispatch(x[0], idx[0], w[0], num_experts=4 * R, axis_name=harness.AXIS,
                            buffer=buf, backend="cuda")
        return r.recv_x[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(harness.AXIS),
                              out_specs=P(harness.AXIS)))
    np.asarray(f(*args).addressable_shards[0].data)
    if jax.process_index() == rank:
        return {"rank": rank, "left": True}
    np.asarray(f(*args).addressable_shards[0].data)  # `rank` never joins: must time out
    return {"rank": jax.process_index(), "left": False}
