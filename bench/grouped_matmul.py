"""Grouped-matmul benchmark on one GPU: jax_ep.grouped_matmul (CUTLASS) beside the dense
batched einsum over the capacity-padded layout (capacity factor 1.25, what a JAX MoE does
today) and jax.lax.ragged_dot, forward and forward+backward, at DeepSeek-like per-rank
shapes: ~26k rows over 32 or 64 local experts, H=7168, F=2048, and the expert matmul of
the Flax layer at EP1 (256 local experts, T*K = 32768 rows, ~128 per expert; capacity 160
rows at cf 1.25, as bench/moe_layer.py's capacity layer). ``--experts E[:rows],...`` picks
the cases (rows default to ``--rows``).

Useful TFLOP/s count real rows only: 2*rows*H*F per forward, three times that per
forward+backward. Timing: medians of jitted calls (bench/timing.py).

``--decode`` adds the low-latency layout at decode shapes: jax_ep.masked_grouped_matmul
over packed rows (``[L, S, H]``, a few live rows per expert) beside the dense batched
einsum over all ``S`` rows that the decode layer runs today.

    python3 bench/grouped_matmul.py --out DIR [--experts 32,64,256:32768] [--decode]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax_ep  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)


def sizes_of(rng, rows, experts):
    """Uneven rows per expert (DeepSeek-like load imbalance), summing to ``rows``."""
    return rng.multinomial(rows, rng.dirichlet(np.full(experts, 8.0))).astype(np.int32)


def case(rng, experts, rows, H, F, capacity_factor, reps, ragged_reps):
    bf = jnp.bfloat16
    sizes = sizes_of(rng, rows, experts)
    cap = int(np.ceil(capacity_factor * rows / experts))
    x = jnp.asarray(rng.standard_normal((rows, H)) * 0.5, bf)
    w = jnp.asarray(rng.standard_normal((experts, H, F)) / np.sqrt(H), bf)
    dy = jnp.asarray(rng.standard_normal((rows, F)), bf)
    xp = jnp.asarray(rng.standard_normal((experts, cap, H)) * 0.5, bf)
    dyp = jnp.asarray(rng.standard_normal((experts, cap, F)), bf)
    s = jnp.asarray(sizes)

    def grouped(x, w):
        return jax_ep.grouped_matmul(x, w, s, backend="cuda")

    def ragged(x, w):
        return jax.lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32).astype(bf)

    def dense(x, w):
        return jnp.einsum("ech,ehf->ecf", x, w, preferred_element_type=jnp.float32).astype(bf)

    def fwd_bwd(f, dy):
        def g(x, w):
            y, vjp = jax.vjp(f, x, w)
            return y, vjp(dy)
        return jax.jit(g)

    flops = 2.0 * rows * H * F
    out = {"experts": experts, "rows": rows, "hidden": H, "ffn": F, "capacity": cap,
           "capacity_factor": capacity_factor, "max_group": int(sizes.max()),
           "min_group": int(sizes.min()),
           "rows_dropped_by_capacity": int(np.maximum(sizes - cap, 0).sum())}
    impls = {"jax_ep": (grouped, (x, w), dy, reps), "dense_capacity": (dense, (xp, w), dyp, reps),
             "ragged_dot": (ragged, (x, w), dy, ragged_reps)}
    for name, (f, args, cot, n) in impls.items():
        try:
            t_f = timed(jax.jit(f), args, n)
            t_fb = timed(fwd_bwd(f, cot), args, n)
        except Exception as e:  # e.g. ragged_dot running out of memory at 256 groups
            if name == "jax_ep":
                raise
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        out[name] = {"fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                     "fwd_useful_tflops": flops / t_f / 1e12,
                     "fwd_bwd_useful_tflops": 3 * flops / t_fb / 1e12}
    j, d, r = out["jax_ep"], out["dense_capacity"], out["ragged_dot"]
    for k in ("fwd_ms", "fwd_bwd_ms"):
        if k in d:
            out[f"{k}_ratio_dense_over_jax_ep"] = d[k] / j[k]
        if k in r:
            out[f"{k}_ratio_ragged_over_jax_ep"] = r[k] / j[k]
    return out


def decode_case(rng, experts, slots, live, H, F, reps):
    """Masked (packed low-latency) layout: ``live`` rows on average per expert of ``slots``."""
    bf = jnp.bfloat16
    counts = np.minimum(rng.poisson(live, experts), slots).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((experts, slots, H)) * 0.5, bf)
    w = jnp.asarray(rng.standard_normal((experts, H, F)) / np.sqrt(H), bf)
    dy = jnp.asarray(rng.standard_normal((experts, slots, F)), bf)
    c = jnp.asarray(counts)

    def masked(x, w):
        return jax_ep.masked_grouped_matmul(x, w, c, backend="cuda")

    def dense(x, w):
        return jnp.einsum("ech,ehf->ecf", x, w, preferred_element_type=jnp.float32).astype(bf)

    def fwd_bwd(f):
        def g(x, w):
            y, vjp = jax.vjp(f, x, w)
            return y, vjp(dy)
        return jax.jit(g)

    rows = int(counts.sum())
    out = {"experts": experts, "slots": slots, "live_rows": rows, "hidden": H, "ffn": F}
    for name, f in (("jax_ep_masked", masked), ("dense_batched", dense)):
        t_f = timed(jax.jit(f), (x, w), reps)
        t_fb = timed(fwd_bwd(f), (x, w), reps)
        out[name] = {"fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3}
    for k in ("fwd_ms", "fwd_bwd_ms"):
        out[f"{k}_ratio_dense_over_masked"] = out["dense_batched"][k] / out["jax_ep_masked"][k]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="folder for grouped_matmul-<N>x<GPU>.json")
    p.add_argument("--experts", default="32,64,256:32768",
                   help="cases: local experts, optionally :rows (default --rows)")
    p.add_argument("--rows", type=int, default=26223)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ragged-reps", type=int, default=3)
    p.add_argument("--decode", action="store_true",
                   help="also the masked layout at decode shapes (E=256 at EP8 and EP1, M=128)")
    a = p.parse_args()
    dev = jax.devices()[0]
    rng = np.random.default_rng(0)
    shapes = [(int(e.split(":")[0]), int(e.split(":")[1]) if ":" in e else a.rows)
              for e in a.experts.split(",")]
    cases = []
    for e, rows in shapes:  # one line per case as it ends: a timeout still leaves figures
        cases.append(case(rng, e, rows, a.hidden, a.ffn, a.capacity_factor, a.reps,
                          a.ragged_reps))
        print(f"case E={e} rows={rows} done", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {"bench": "grouped_matmul", "device": dev.device_kind, "num_gpus": 1,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python3 bench/grouped_matmul.py " + " ".join(sys.argv[1:]),
              "commit": commit, "jax": jax.__version__, "cases": cases}
    if a.decode:  # (local experts, R*M slots, live rows per expert ~ R*T*K/E)
        result["decode_cases"] = [decode_case(rng, L, S, live, a.hidden, a.ffn, a.reps)
                                  for L, S, live in ((32, 1024, 32), (256, 128, 4))]
        for c in result["decode_cases"]:
            print(f"decode L={c['experts']} S={c['slots']} live={c['live_rows']}: masked fwd "
                  f"{c['jax_ep_masked']['fwd_ms']:.2f} ms, dense {c['dense_batched']['fwd_ms']:.2f}"
                  f" ms ({c['fwd_ms_ratio_dense_over_masked']:.2f}x); fwd+bwd "
                  f"{c['fwd_bwd_ms_ratio_dense_over_masked']:.2f}x", flush=True)
    def timing(c, n):
        t = c[n]
        if "error" in t:
            return f"{n} {t['error']}"
        return (f"{n} fwd {t['fwd_ms']:.2f} ms ({t['fwd_useful_tflops']:.0f} TF/s) "
                f"fwd+bwd {t['fwd_bwd_ms']:.2f} ms ({t['fwd_bwd_useful_tflops']:.0f})")

    for c in cases:
        ratios = [f"{who}/jax_ep {step} {c[k]:.2f}x"
                  for who in ("dense", "ragged") for step in ("fwd", "fwd_bwd")
                  if (k := f"{step}_ms_ratio_{who}_over_jax_ep") in c]
        print(f"E={c['experts']} rows={c['rows']} cap={c['capacity']}: "
              + "; ".join(timing(c, n) for n in ("jax_ep", "dense_capacity", "ragged_dot"))
              + "; " + ", ".join(ratios), flush=True)
    if a.out:
        name = f"grouped_matmul-1x{dev.device_kind.replace(' ', '-')}.json"
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
