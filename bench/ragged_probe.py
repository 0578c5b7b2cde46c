"""Probe: how XLA lowers jax.lax.ragged_dot on this GPU (cuDNN grouped matmul or dense)
and what it costs next to the dense batched einsum of the capacity layout.

    python3 bench/ragged_probe.py --out DIR
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp

from timing import timed  # bench/timing.py (run from the repo root: python3 bench/...)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--cap", type=int, default=640)
    p.add_argument("--fill", type=float, default=0.8, help="real rows / capacity rows")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    a = p.parse_args()
    L, C, H, F = a.experts, a.cap, a.hidden, a.ffn
    bf = jnp.bfloat16
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (L * C, H), jnp.float32).astype(bf)
    w = (jax.random.normal(k[1], (L, H, F), jnp.float32) * 0.02).astype(bf)
    dy = jax.random.normal(k[2], (L * C, F), jnp.float32).astype(bf)
    gs = jnp.full((L,), int(C * a.fill), jnp.int32)
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=dict(L=L, C=C, H=H, F=F, fill=a.fill))

    ragged = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs))
    dense = jax.jit(lambda x, w: jnp.einsum("lch,lhf->lcf", x.reshape(L, C, H), w))
    ragged_dgrad = jax.jit(lambda dy, w, gs: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), gs))
    hlo = ragged.lower(x, w, gs).compile().as_text()
    res["ragged_lowering_has_cudnn"] = "cudnn" in hlo.lower()
    res["ragged_lowering_custom_calls"] = sorted(set(
        l.split('custom_call_target="')[1].split('"')[0] for l in hlo.splitlines()
        if 'custom_call_target="' in l))
    for name, fn, args in (("dense_fwd_ms", dense, (x, w)), ("ragged_fwd_ms", ragged, (x, w, gs)),
                           ("ragged_dgrad_ms", ragged_dgrad, (dy, w, gs))):
        try:
            res[name] = timed(fn, args, 10) * 1e3
        except Exception as e:  # OOM or unsupported: record
            res[name] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, res[name], flush=True)

    def loss(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, gs).astype(jnp.float32) * dy.astype(jnp.float32))

    try:
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        res["ragged_fwd_bwd_ms"] = timed(g, (x, w), 10) * 1e3
    except Exception as e:
        res["ragged_fwd_bwd_ms"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "ragged_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
