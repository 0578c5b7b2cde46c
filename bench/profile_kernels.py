"""Per-kernel GPU times of one dispatch + combine (jax.profiler trace, CUPTI timings).

Prints, for every kernel name seen on GPU 0, the number of launches and the median
duration, so the split between routing, count exchange, data movement and finalisation
is visible. Usage: python bench/profile_kernels.py [--tokens 4096] [--fp8]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax_ep  # noqa: E402

AXIS = "ep"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--num-sms", type=int, default=24)
    ap.add_argument("--layout", default="rank")
    ap.add_argument("--fp8", action="store_true",
                    help="dispatch the FP8 pair of jax_ep.fp8.per_token_cast (an XLA cast first)")
    ap.add_argument("--cast", action="store_true",
                    help="dispatch bf16 x with cast_fp8=True (the kernel casts on the way)")
    a = ap.parse_args()
    T, H, K, E = a.tokens, a.hidden, 8, 256
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    R = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    put = lambda v: jax.device_put(jnp.asarray(v), NamedSharding(mesh, P(AXIS)))
    buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_sms=a.num_sms)
    rng = np.random.default_rng(0)
    idx = np.argsort(-(np.abs(rng.standard_normal((R, T, E))) + 1), axis=-1)[..., :K]
    x = put(rng.standard_normal((R, T, H)).astype(jnp.bfloat16))
    idx = put(idx.astype(np.int32))
    w = put(rng.random((R, T, K)).astype(np.float32))

    def body(x, i, w):
        x, i, w = x[0], i[0], w[0]
        payload = jax_ep.fp8.per_token_cast(x) if a.fp8 else x
        r = jax_ep.dispatch(payload, i, w, num_experts=E, axis_name=AXIS, buffer=buf,
                            backend="cuda", layout=a.layout, cast_fp8=a.cast)
        y = r.recv_x[0].astype(jnp.bfloat16) if a.fp8 or a.cast else r.recv_x
        out = jax_ep.combine(y, r.handle, r.recv_topk_weights if a.layout == "expert" else None)
        return out[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    for _ in range(3):
        jax.block_until_ready(f(x, idx, w))
    tmp = tempfile.mkdtemp()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(10):
            jax.block_until_ready(f(x, idx, w))
    path = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    if not path:
        sys.exit(f"no perfetto trace under {tmp}")
    with gzip.open(path[0]) as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pids[e["pid"]] = e["args"]["name"]
    by_name = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        proc = pids.get(e.get("pid"), "")
        if "/device:GPU:0" not in proc:
            continue
        by_name[e["name"][:90]].append(e["dur"])
    print(f"GPU 0 of {R}, T={T} H={H} layout={a.layout} fp8={a.fp8} cast={a.cast}: kernels "
          "(median us, count)")
    rows = sorted(by_name.items(), key=lambda kv: -statistics.median(kv[1]) * len(kv[1]))
    for name, durs in rows[:25]:
        print(f"{statistics.median(durs):9.1f} us  x{len(durs):<4d} {name}")
    per_call = sum(statistics.median(d) * len(d) for d in by_name.values()) / 10
    print(f"{per_call:9.1f} us  all kernels of one call (dispatch, casts, combine)")
    buf.close()


if __name__ == "__main__":
    main()
