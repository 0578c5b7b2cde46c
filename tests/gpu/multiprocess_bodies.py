"""Bodies of the one-process-per-GPU tests (run by tests/multiprocess.py, platform="gpu").

Every process builds the same global inputs from the same seed, runs an op on the CUDA
backend and on the reference backend over the global mesh, and compares its own shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from tests.gpu.harness import bits, routing

AXIS = "ep"


def _mesh():
    return Mesh(np.array(jax.devices()), (AXIS,))


def _global(mesh, per_rank):
    """[R, ...] host array -> global array, one [1, ...] block per process."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.make_array_from_callback(per_rank.shape, sharding, lambda i: per_rank[i])


def _run(mesh, fn, *per_rank_args):
    """fn(*per-rank args) -> pytree on every rank; returns this process's results (host)."""
    def body(*xs):
        xs = [a[0] for a in xs]
        return jax.tree.map(lambda a: jnp.asarray(a)[None], fn(*xs))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    out = f(*[_global(mesh, a) for a in per_rank_args])
    return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], out)


def _inputs(seed, R, T, H, K, E):
    rng = np.random.default_rng(seed)  # the same on every process
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    idx, w = routing(rng, R, T, K, E)
    return x, idx, w


def dispatch_combine(seed: int, layout: str, fp8, tokens: int = 96, hidden: int = 512,
                     topk: int = 4, experts_per_rank: int = 4):
    """dispatch + combine, CUDA vs reference: bitwise dispatch, <= 1e-6 combine. fp8: False,
    True (the pair of per_token_cast) or "cast" (bf16 x with cast_fp8=True)."""
    R = jax.process_count()
    E, T, H, K = experts_per_rank * R, tokens, hidden, topk
    mesh = _mesh()
    buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_nvl_bytes=64 << 20)
    assert buf.multi_process, "the EP axis should span the processes"
    x, idx, w = _inputs(seed, R, T, H, K, E)

    def fn(backend):
        def f(x, idx, w):
            xx = jax_ep.fp8.per_token_cast(x) if fp8 is True else x
            r = jax_ep.dispatch(xx, idx, w, num_experts=E, axis_name=AXIS, layout=layout,
                                buffer=buf, backend=backend, cast_fp8=fp8 == "cast")
            y = r.recv_x if not fp8 else jax_ep.fp8.per_token_cast_back(*r.recv_x)
            y = y.astype(jnp.bfloat16)
            wts = r.recv_topk_weights if layout == "expert" else None
            out = jax_ep.combine(y, r.handle, wts) if wts is not None else \
                jax_ep.combine(y, r.handle)
            return r._replace(handle=r.handle.arrays), out
        return f

    (rc, out_c) = _run(mesh, fn("cuda"), x, idx, w)
    (rr, out_r) = _run(mesh, fn("reference"), x, idx, w)
    mismatched = [i for i, (a, b) in enumerate(zip(jax.tree.leaves(rc), jax.tree.leaves(rr)))
                  if not np.array_equal(bits(a), bits(b))]
    diff = np.abs(np.asarray(out_c, np.float32) - np.asarray(out_r, np.float32))
    scale = float(np.max(np.abs(np.asarray(out_r, np.float32)))) or 1.0
    buf.close()
    return {"rank": jax.process_index(), "mismatched_leaves": mismatched,
            "combine_max_rel": float(diff.max()) / scale if diff.size else 0.0,
            "num_recv": int(np.asarray(rc.num_recv_tokens))}


def dispatch_combine_variants(seed: int):
    """Every layout x dtype variant in one launch (a launch costs ~20 s of start-up)."""
    out = {}
    for layout in ("rank", "expert"):
        for fp8, name in ((False, "bf16"), (True, "fp8"), ("cast", "cast")):
            out[f"{layout}-{name}"] = dispatch_combine(seed, layout, fp8)
    return out


def low_latency_variants(seed: int):
    return {f"{'fp8' if fp8 else 'bf16'}": low_latency(seed, fp8) for fp8 in (False, True)}


def low_latency(seed: int, fp8: bool, tokens: int = 16, hidden: int = 1024, topk: int = 4,
                experts_per_rank: int = 4):
    """low-latency dispatch + combine, CUDA vs reference on the rows that carry data."""
    R = jax.process_count()
    E, T, H, K = experts_per_rank * R, tokens, hidden, topk
    mesh = _mesh()
    nbytes = jax_ep.Buffer.get_low_latency_size_hint(T, H, E, R)
    buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_nvl_bytes=nbytes)
    x, idx, w = _inputs(seed, R, T, H, K, E)

    def fn(backend):
        def f(x, idx, w):
            r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=T,
                                            axis_name=AXIS, use_fp8=fp8, buffer=buf,
                                            backend=backend)
            L = E // R  # expert outputs: any [L, R*T, H] values
            y = (jnp.arange(L * R * T * H, dtype=jnp.float32) % 251 * 0.01 - 1.25)
            y = y.reshape(L, R * T, H).astype(jnp.bfloat16)
            out = jax_ep.low_latency_combine(y, idx, w, r.handle)
            return r.recv_x, r.recv_count, r.handle.arrays, out
        return f

    xc, cc, hc, oc = _run(mesh, fn("cuda"), x, idx, w)
    xr, cr, hr, orf = _run(mesh, fn("reference"), x, idx, w)
    valid = np.asarray(hr.recv_src_token) >= 0  # [L, R*T]: rows that carry data
    leaves_c = xc if isinstance(xc, tuple) else (xc,)
    leaves_r = xr if isinstance(xr, tuple) else (xr,)
    rows_equal = all(np.array_equal(bits(a)[valid], bits(b)[valid])
                     for a, b in zip(leaves_c, leaves_r))
    handle_equal = all(np.array_equal(a, b) for a, b in zip(hc, hr))
    diff = np.abs(np.asarray(oc, np.float32) - np.asarray(orf, np.float32))
    scale = float(np.max(np.abs(np.asarray(orf, np.float32)))) or 1.0
    buf.close()
    return {"rank": jax.process_index(), "rows_equal": bool(rows_equal),
            "counts_equal": bool(np.array_equal(cc, cr)), "handle_equal": bool(handle_equal),
            "combine_max_rel": float(diff.max()) / scale, "valid_rows": int(valid.sum())}


def buffer_lifecycle(rounds: int = 20):
    """Create, use and close a Buffer `rounds` times; report GPU memory before/after."""
    from jax_ep import _native

    ext = _native.extension()
    dev = jax.local_devices()[0]
    R = jax.process_count()
    mesh = _mesh()
    x, idx, w = _inputs(1, R, 32, 256, 2, 2 * R)

    def one_round():
        buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_nvl_bytes=256 << 20)
        out = _run(mesh, lambda x, idx, w: jax_ep.combine(
            *(lambda r: (r.recv_x, r.handle))(jax_ep.dispatch(
                x, idx, w, num_experts=2 * R, axis_name=AXIS, buffer=buf, backend="cuda"))),
            x, idx, w)
        buf.close()
        return out

    one_round()  # compiles; first-use allocations of CUDA/XLA happen here
    free_before, _ = ext.device_memory_info(int(dev.local_hardware_id))
    for _ in range(rounds):
        one_round()
    free_after, _ = ext.device_memory_info(int(dev.local_hardware_id))
    return {"rank": jax.process_index(), "free_before": free_before, "free_after": free_after}


def fail_before_buffer(rank: int = 1):
    """One rank raises before the collective Buffer creation; the others must not hang."""
    if jax.process_index() == rank:
        raise RuntimeError(f"planted failure on rank {rank}")
    jax_ep.Buffer(_mesh(), AXIS, backend="cuda", num_nvl_bytes=64 << 20)
    return {"rank": jax.process_index()}
