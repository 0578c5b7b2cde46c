"""Forward+backward time of an MoE layer: jax_ep vs ``jax.lax.all_to_all`` baselines.

Every implementation computes the same layer (router → top-k → routed SwiGLU experts
sharded over the ``"ep"`` mesh axis → weighted combine) with the same parameters and
routing, inside ``jax.shard_map``; only the token exchange and expert batching differ:

* ``jax_ep``: :class:`jax_ep.flax.MoE` (``jax_ep.dispatch(layout="expert")`` →
  ``jax.lax.ragged_dot`` → ``jax_ep.combine``), default capacity (never drops).
* ``jax_ep_cf``: the same with ``capacity = ceil(cf * T * K)`` received rows per rank and
  ``expert_capacity = R * ceil(cf * T * K / E)`` rows per expert (dense batched expert
  matmuls, the same rows per expert as ``a2a_cf``); drops rows past either.
* ``a2a_cf``: GShard/MaxText "dropping" style: each rank packs ``C = ceil(cf * T * K / E)``
  rows per expert into ``[E, C, H]``, ``all_to_all``, dense batched expert matmuls,
  ``all_to_all`` back (drops rows past ``C``).
* ``a2a_peer``: capacity ``T`` per peer: each rank sends every token once to each rank
  holding one of its experts in a ``[R, T, H]`` slab (``all_to_all``, never drops), the
  receiver sorts (token, slot) rows by local expert for ``ragged_dot``, weights and sums
  them per token, and sends ``[R, T, H]`` back.

Default shape is DeepSeek-like (T=4096 tokens per rank, H=7168, E=256, K=8, expert FFN
2048, bf16); ``--small`` shrinks it to run on simulated CPU devices. Each result is the
median of ``--iters`` (>= 20) timed calls after ``--warmup``; the JSON (and a PNG bar plot
when matplotlib is importable) goes to ``bench/results/``.

Run::

    PYTHONPATH=. python3 bench/moe_layer.py --small             # CPU, 8 simulated devices
    PYTHONPATH=. python3 bench/moe_layer.py                     # GPUs, DeepSeek-like shape
    PYTHONPATH=. python3 bench/moe_layer.py --tokens 1024 --impls jax_ep,a2a_peer
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time

IMPLS = ("jax_ep", "jax_ep_cf", "a2a_cf", "a2a_peer")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny shape for CPU: T=64 H=128 E=16 K=4 F=64, f32, 5 warm-up")
    p.add_argument("--tokens", type=int, help="tokens per rank T (default 4096)")
    p.add_argument("--hidden", type=int, help="H (default 7168)")
    p.add_argument("--experts", type=int, help="E (default 256)")
    p.add_argument("--top-k", type=int, help="K (default 8)")
    p.add_argument("--ffn", type=int, help="expert FFN width F (default 2048)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default bf16 (f32 small)")
    p.add_argument("--score-func", choices=("softmax", "sigmoid"), default="sigmoid")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
    p.add_argument("--iters", type=int, default=20, help="timed calls (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices when no GPU is present")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--ragged-dot", choices=("default", "triton"), default="default",
                   help="GPU lowering of jax.lax.ragged_dot: XLA's (default) or the Pallas "
                        "Triton kernel (jax_ragged_dot_use_gpu_pallas_triton_lowering)")
    p.add_argument("--out", default=RESULTS, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    small = dict(tokens=64, hidden=128, experts=16, top_k=4, ffn=64, dtype="float32")
    full = dict(tokens=4096, hidden=7168, experts=256, top_k=8, ffn=2048, dtype="bfloat16")
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {IMPLS}")
    if args.iters < 20:
        p.error("--iters must be >= 20 (the medians are of at least 20 calls)")
    return args


def setup_platform(args):
    has_gpu = shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")
    if args.platform == "cpu" or (args.platform == "auto" and not has_gpu):
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={args.devices}").strip()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_platform(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep.flax import MoE, route

    if args.ragged_dot == "triton":
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    if not on_gpu:
        devices = devices[: args.devices]
    R = len(devices)
    T, H, E, K, F = args.tokens, args.hidden, args.experts, args.top_k, args.ffn
    L = E // R
    dtype = jnp.dtype(args.dtype)
    cf = args.capacity_factor
    if E % R:
        print(f"--experts={E} must be divisible by the {R} devices", file=sys.stderr)
        return 2
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    buffer = jax_ep.Buffer(mesh, "ep") if on_gpu else None
    backend = buffer.backend if buffer is not None else "reference"
    print(f"{R} x {devices[0].device_kind}: T={T}/rank H={H} E={E} K={K} F={F} {dtype.name}, "
          f"jax_ep backend {backend}", flush=True)

    def make_layer(capacity, expert_capacity=None):
        return MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
                   score_func=args.score_func, capacity=capacity,
                   expert_capacity=expert_capacity, buffer=buffer,
                   backend="auto", dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(args.seed))

    layer = make_layer(None)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    ep_cap = math.ceil(cf * T * K)
    # same rows per expert as a2a_cf (R source ranks x C each): dense batched expert matmuls
    ep_expert_cap = R * max(1, math.ceil(cf * T * K / E))
    graphdef_cf, _, _ = nnx.split(make_layer(ep_cap, ep_expert_cap), nnx.Param, ...)
    bias = layer.expert_bias[...]

    key = jax.random.key(args.seed + 1)
    kx, kc = jax.random.split(key)
    tok_sharding = NamedSharding(mesh, P("ep", None))
    x = jax.device_put(jax.random.normal(kx, (R * T, H), jnp.float32).astype(dtype), tok_sharding)
    cot = jax.device_put(jax.random.normal(kc, (R * T, H), jnp.float32).astype(dtype),
                         tok_sharding)

    def routing(xl, router):
        logits = jnp.dot(xl.astype(jnp.float32), router)
        return route(logits, top_k=K, score_func=args.score_func, bias=bias,
                     normalize=layer.normalize_weights)

    def swiglu_ragged(rows, wg, wu, wd, gs):
        f32 = jnp.float32
        g = jax.lax.ragged_dot(rows, wg, gs, preferred_element_type=f32)
        u = jax.lax.ragged_dot(rows, wu, gs, preferred_element_type=f32)
        h = (jax.nn.silu(g) * u).astype(rows.dtype)
        return jax.lax.ragged_dot(h, wd, gs, preferred_element_type=f32)

    def swiglu_batched(rows, wg, wu, wd):
        f32 = jnp.float32
        g = jnp.einsum("lnh,lhf->lnf", rows, wg, preferred_element_type=f32)
        u = jnp.einsum("lnh,lhf->lnf", rows, wu, preferred_element_type=f32)
        h = (jax.nn.silu(g) * u).astype(rows.dtype)
        return jnp.einsum("lnf,lfh->lnh", h, wd, preferred_element_type=f32)

    def a2a(v):
        return jax.lax.all_to_all(v, "ep", 0, 0, tiled=False)

    def a2a_cf_rank(xl, router, wg, wu, wd):
        """GShard: [E, C, H] per rank, C = ceil(cf*T*K/E) rows per expert."""
        C = max(1, math.ceil(cf * T * K / E))
        r = routing(xl, router)
        flat_e = r.topk_idx.reshape(-1)
        onehot = jax.nn.one_hot(flat_e, E, dtype=jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
        keep = pos < C
        slot = jnp.where(keep, flat_e * C + pos, E * C)
        tok = jnp.arange(T * K) // K
        send = jnp.zeros((E * C, H), dtype).at[slot].set(xl[tok], mode="drop")
        recv = a2a(send.reshape(R, L * C, H))  # [src rank, L*C, H]
        rows = recv.reshape(R, L, C, H).transpose(1, 0, 2, 3).reshape(L, R * C, H)
        y = swiglu_batched(rows, wg, wu, wd).astype(dtype)
        back = a2a(y.reshape(L, R, C, H).transpose(1, 0, 2, 3).reshape(R, L * C, H))
        got = jnp.take(back.reshape(E * C, H), slot, axis=0, mode="fill", fill_value=0)
        w = jnp.where(keep, r.topk_weights.reshape(-1), 0.0)
        out = jnp.sum((got.astype(jnp.float32) * w[:, None]).reshape(T, K, H), axis=1)
        dropped = jax.lax.psum(jnp.sum(~keep, dtype=jnp.int32), "ep")
        return out.astype(dtype), dropped

    def a2a_peer_rank(xl, router, wg, wu, wd):
        """Capacity T per peer: [R, T, H] slabs, receiver sorts rows for ragged_dot."""
        r = routing(xl, router)
        dest = r.topk_idx // L  # [T, K]
        ranks = jnp.arange(R)
        in_rank = jnp.any(dest[None] == ranks[:, None, None], axis=2)  # [R, T]
        send = jnp.where(in_rank[:, :, None], xl[None], jnp.zeros((), dtype))
        send_idx = jnp.where(dest[None] == ranks[:, None, None],
                             r.topk_idx[None] - ranks[:, None, None] * L, L)  # [R, T, K]
        send_w = jnp.where(send_idx < L, r.topk_weights[None], 0.0)
        recv, recv_idx, recv_w = a2a(send), a2a(send_idx), a2a(send_w)
        key = recv_idx.reshape(-1)  # [R*T*K], L = not here
        order = jnp.argsort(key, stable=True)
        gs = jnp.zeros((L,), jnp.int32).at[key].add(1, mode="drop")
        src_row = order // K
        rows = recv.reshape(R * T, H)[src_row]
        y = swiglu_ragged(rows, wg, wu, wd, gs)
        y = y * recv_w.reshape(-1)[order][:, None]
        per_token = jnp.zeros((R * T, H), jnp.float32).at[src_row].add(y)
        back = a2a(per_token.astype(dtype).reshape(R, T, H))
        out = jnp.sum(back.astype(jnp.float32), axis=0)
        return out.astype(dtype), jnp.zeros((), jnp.int32)

    def baseline(fn):
        spec_e = P("ep", None, None)
        sm = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep", None), P(None, None), spec_e,
                                                   spec_e, spec_e),
                           out_specs=(P("ep", None), P()))

        def fwd(p, x):
            return sm(x, p["router"][...], p["w_gate"][...], p["w_up"][...],
                      p["w_down"][...])
        return fwd

    def layer_fwd(gdef):
        def fwd(p, x):
            out, stats = nnx.merge(gdef, p, rest)(x)
            return out, stats.dropped
        return fwd

    forwards = {"jax_ep": layer_fwd(graphdef), "jax_ep_cf": layer_fwd(graphdef_cf),
                "a2a_cf": baseline(a2a_cf_rank), "a2a_peer": baseline(a2a_peer_rank)}

    def timed(fn, *a):
        for _ in range(args.warmup):
            jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(1e3 * (time.perf_counter() - t0))
        return times

    results, outputs = {}, {}
    for name in args.impls:
        fwd = forwards[name]

        def loss(p, x, fwd=fwd):
            out, dropped = fwd(p, x)
            return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), (out, dropped)

        fwd_jit = jax.jit(fwd)
        grad_jit = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        try:
            t0 = time.perf_counter()
            out, dropped = jax.block_until_ready(fwd_jit(params, x))
            compile_s = time.perf_counter() - t0
            fwd_times = timed(fwd_jit, params, x)
            fb_times = timed(grad_jit, params, x)
        except Exception as err:  # e.g. out of memory at the full shape: record, go on
            print(f"  {name:10s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
            continue
        outputs[name] = np.asarray(out.astype(jnp.float32))
        results[name] = {
            "fwd_bwd_ms_median": statistics.median(fb_times),
            "fwd_bwd_ms_min": min(fb_times),
            "fwd_bwd_ms_mean": statistics.fmean(fb_times),
            "fwd_ms_median": statistics.median(fwd_times),
            "dropped_rows": int(dropped),
            "dropped_fraction": int(dropped) / (R * T * K),
            "first_call_s": compile_s,
            "iters": args.iters,
        }
        print(f"  {name:10s} fwd+bwd {results[name]['fwd_bwd_ms_median']:9.2f} ms   "
              f"fwd {results[name]['fwd_ms_median']:9.2f} ms   dropped "
              f"{int(dropped)}/{R * T * K} rows", flush=True)
        del out

    if "jax_ep" in outputs:  # sanity: implementations that drop nothing agree
        ref = outputs["jax_ep"]
        scale = float(np.max(np.abs(ref))) or 1.0
        for name, out in outputs.items():
            diff = float(np.max(np.abs(out - ref))) / scale
            results[name]["max_rel_diff_vs_jax_ep"] = diff
            if results[name]["dropped_rows"] == 0 and name != "jax_ep":
                tol = 1e-4 if dtype == jnp.float32 else 5e-2
                status = "ok" if diff <= tol else "MISMATCH"
                print(f"  {name} vs jax_ep: max rel diff {diff:.2e} ({status})")
                results[name]["matches_jax_ep"] = diff <= tol

    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "moe_layer_fwd_bwd",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "num_devices": R,
        "host": platform.node(),
        "jax_version": jax.__version__,
        "jax_ep_backend": backend,
        "num_sms": getattr(buffer, "num_sms", None) if backend == "cuda" else None,
        "shape": {"tokens_per_rank": T, "hidden": H, "experts": E, "top_k": K, "ffn": F,
                  "dtype": dtype.name, "score_func": args.score_func},
        "ragged_dot_lowering": args.ragged_dot,
        "capacity_factor": cf,
        "jax_ep_cf_capacity_rows": ep_cap,
        "jax_ep_cf_rows_per_expert": ep_expert_cap,
        "a2a_cf_rows_per_expert": max(1, math.ceil(cf * T * K / E)),
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in devices[0].device_kind.lower())
    stem = os.path.join(args.out, f"moe_layer_{tag}_x{R}_{now.strftime('%Y%m%dT%H%M%SZ')}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {stem}.json")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    ok = [n for n in args.impls if "fwd_bwd_ms_median" in results.get(n, {})]
    if plt is not None and ok:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        vals = [results[n]["fwd_bwd_ms_median"] for n in ok]
        bars = ax.bar(ok, vals, color=["tab:green" if n.startswith("jax_ep") else "tab:gray"
                                       for n in ok])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(f"MoE layer, {R}x {devices[0].device_kind}, T={T} H={H} E={E} K={K}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
        print(f"wrote {stem}.png")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
