"""Bodies run by ``tests.multiprocess.launch``, one process per rank (CPU and GPU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from tests import harness, oracle


def _global(mesh, per_rank):
    """A global array sharded over "ep" from per-rank NumPy blocks (each process owns one)."""
    full = np.concatenate(per_rank)
    sharding = NamedSharding(mesh, P(harness.AXIS))
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def dispatch_combine(seed: int = 0, layout: str = "expert", backend: str = "reference"):
    """Dispatch -> experts -> combine across processes; checks this process's tokens."""
    R = jax.process_count()
    E, T, K, H = 4 * R, 12, 3, 64
    rng = np.random.default_rng(seed)  # same inputs on every process
    xs = harness.random_tokens(rng, R, T, H)
    idxs = harness.random_routing(rng, R, T, K, E)
    ws = harness.random_weights(rng, R, T, K)
    mesh = Mesh(np.array(jax.devices()), (harness.AXIS,))
    buffer = jax_ep.Buffer(mesh, harness.AXIS, backend="auto" if backend == "auto" else backend)
    scale = np.linspace(0.5, 2.0, E).astype(np.float32)

    def body(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout=layout,
                            buffer=buffer, backend=backend)
        me = jax.lax.axis_index(harness.AXIS)
        if layout == "expert":
            e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * (E // R), 0)
            y = jnp.tanh(r.recv_x * jnp.asarray(scale)[e][:, None])
            return jax_ep.combine(y, r.handle, r.recv_topk_weights)
        return jax_ep.combine(r.recv_x, r.handle)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS)))
    out = f(_global(mesh, xs), _global(mesh, idxs), _global(mesh, ws))
    me = jax.process_index()
    mine = np.asarray(out.addressable_shards[0].data)
    if layout == "expert":
        want = oracle.moe(xs, idxs, ws, E, lambda e, x: np.tanh(x * scale[e]))[me]
    else:
        visits = [[sum(any(oracle.dest_rank(e, E, R) == r for e in row) for r in range(R))]
                  for row in idxs[me]]
        want = xs[me] * np.asarray(visits, np.float32)
    err = float(np.max(np.abs(mine - want)))
    assert err < 1e-5, f"rank {me}: max error {err}"
    buffer.close()
    return {"rank": me, "max_error": err, "backend": buffer.backend}


def fail_on_rank(rank: int = 1):
    """Rank ``rank`` raises before the collective; the others would wait for it forever."""
    if jax.process_index() == rank:
        raise RuntimeError(f"planted failure on rank {rank}")
    return dispatch_combine()


def hang_on_rank(rank: int = 0):
    if jax.process_index() == rank:
        time.sleep(3600)
    return {"rank": jax.process_index()}


def exchange_and_domains():
    """Every process publishes its rank; NVLink domains follow hosts (all one host here)."""
    from jax_ep import distributed

    me = jax.process_index()
    got = distributed.all_gather_bytes("test/ranks", f"rank-{me}".encode())
    hosts = distributed.process_hosts("test/hosts")
    devices = jax.devices()
    return {"rank": me, "gathered": [g.decode() for g in got], "num_hosts": len(set(hosts)),
            "domains": distributed.nvlink_domains(devices, hosts=hosts),
            "domains_2": distributed.nvlink_domains(devices, node_size=2)}


def exchange_with_missing_rank():
    """Rank 1 never publishes: rank 0 must fail with a timeout that names the key."""
    from jax_ep import distributed

    if jax.process_index() == 1:
        time.sleep(30)
        return {"rank": 1}
    distributed.all_gather_bytes("test/missing", b"x", timeout_ms=2000)
    return {"rank": 0}


def buffer_exchange(fail_rank: int = -1):
    """The exchange behind multi-process Buffer creation: every process gets every export,
    or, when one process failed, every process raises with that process's error."""
    from jax_ep.backends.cuda import buffer

    me = jax.process_index()
    error = f"planted export failure on {me}" if me == fail_rank else ""
    try:
        got = buffer._exchange(f"test/exchange/{fail_rank}", error, {str(me): bytes([me]) * 3})
    except RuntimeError as err:
        return {"rank": me, "error": str(err)}
    return {"rank": me, "data": {k: v.hex() for k, v in sorted(got.items())}}


# ----------------------------------------------------------------------------- GPU bodies
# (platform="gpu"; ranks may share a GPU). They use the CUDA backend only: NCCL refuses
# collectives between ranks on one GPU, so nothing here runs the reference backend.

def _gpu_mesh():
    return Mesh(np.array(jax.devices()), (harness.AXIS,))


def buffer_lifecycle(rounds: int = 20):
    """Create, use and close a Buffer ``rounds`` times; report GPU memory before/after."""
    from jax_ep import _native

    probes = _native.load_testing()
    dev = jax.local_devices()[0]
    R = jax.process_count()
    mesh = _gpu_mesh()
    rng = np.random.default_rng(1)  # the same on every process
    x = rng.standard_normal((R, 32, 256)).astype(np.float32)
    idx, w = harness.routing(rng, R, 32, 2, 2 * R)
    args = [harness.put(mesh, a) for a in (x, idx, w)]

    def one_round():
        buf = jax_ep.Buffer(mesh, harness.AXIS, backend="cuda", num_nvl_bytes=256 << 20)

        def body(x, idx, w):
            r = jax_ep.dispatch(x[0], idx[0], w[0], num_experts=2 * R, axis_name=harness.AXIS,
                                buffer=buf, backend="cuda")
            return jax_ep.combine(r.recv_x, r.handle)[None]

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(harness.AXIS),
                                  out_specs=P(harness.AXIS)))
        out = np.asarray(f(*args).addressable_shards[0].data)
        buf.close()
        return out

    one_round()  # compiles; first-use allocations of CUDA/XLA happen here
    free_before, _ = probes.device_memory_info(int(dev.local_hardware_id))
    for _ in range(rounds):
        one_round()
    free_after, _ = probes.device_memory_info(int(dev.local_hardware_id))
    return {"rank": jax.process_index(), "free_before": free_before, "free_after": free_after}


def fail_before_buffer(rank: int = 1):
    """One rank raises before the collective Buffer creation; the others must not hang."""
    if jax.process_index() == rank:
        raise RuntimeError(f"planted failure on rank {rank}")
    jax_ep.Buffer(_gpu_mesh(), harness.AXIS, backend="cuda", num_nvl_bytes=64 << 20)
    return {"rank": jax.process_index()}
