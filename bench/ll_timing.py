"""Where the time of a low-latency dispatch / combine goes: in-kernel phase timing.

Runs chains of back-to-back ``ll_dispatch`` (FP8) and ``ll_combine`` (BF16) calls inside one
jit on every visible GPU (one process, the bench shape of bench/low_latency.py: T=128,
H=7168, K=8, E=256), on a profiling build of the extension: thread 0 of every block of
the kernels records ``%globaltimer`` (ns) and ``clock64`` at each phase point
(cuda/low_latency/low_latency.h, ``LLTimingPoint``) into a per-GPU debug ring of the last
16 ops. After each chain the ring is read back
(``jax_ep._native.load_testing().ll_timing(device)``, which waits for the GPU).

For every op, times are taken relative to t0 = the earliest kernel entry over all GPUs and
blocks; per point the script prints, as medians over the ops of the chain (the first op of
each chain is dropped: it starts with the launch skew of the jit):
  med / p90 / max   over all (GPU, block) pairs of (point - t0), in us;
  gpu max           max over GPUs of each GPU's median over its blocks (GPU skew);
  blk(clk)          median over blocks of (point - the block's own entry), from clock64
                    converted with each GPU's measured cycles per ns (exact within a
                    block, immune to the globaltimer's update granularity, which on some
                    GPUs is 1 us outside a profiler).
``span`` = last exit on any GPU - t0: the op's GPU time. Points a block does not pass
(e.g. staging on a block without tokens) are left out.

Needs a profiling build (the timing code is compiled out of every other build):
  pip install --no-build-isolation -e . -Ccmake.define.JAX_EP_LL_TIMING=ON
  (or cmake ... -DJAX_EP_LL_TIMING=ON). To compare kernel versions, run the script on a
  build of each (git history keeps the old kernels) with --label naming it.

Usage (4 GPUs, one process):
  python bench/ll_timing.py                      # dispatch and combine
  python bench/ll_timing.py --calls 16 --reps 5 --label mine --out bench/results
Globaltimer values of different GPUs are compared directly, and they need not agree: on
2xH200 (2026-11-23) the two GPUs' clocks were ~244 us apart, which makes med/p90/max and
"gpu max" meaningless there; "gpu min" (one GPU's own timeline) and blk(clk) stay valid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_ep  # noqa: E402
from inputs import deepep_inputs, put_global  # noqa: E402  (bench/inputs.py)
from jax_ep.backends.cuda import low_latency as cll  # noqa: E402
from jax_ep.types import LowLatencyConfig  # noqa: E402

AXIS = "ep"
# cuda/low_latency/low_latency.h LLTimingPoint (names by index).
POINTS = ["entry", "op_known", "staged", "rows_issued", "lists_issued", "released",
          "recv_entry", "flags_seen", "recv_copied", "counts", "exit", "positions"]
KIND = {"dispatch": 1, "combine": 2}


def read_records(ext, device_ids):
    """{device: list of records}; a record: dict(op, kind, grid_send, grid_recv,
    ns [blocks, points] int64, clk [blocks, points] int64)."""
    lay = ext.ll_timing_layout()
    ring, nb, npt, hw = lay["ring"], lay["max_blocks"], lay["points"], lay["header_words"]
    rec_words = lay["record_bytes"] // 8
    assert rec_words == hw + 2 * nb * npt, lay
    out = {}
    for dev in device_ids:
        raw = ext.ll_timing(dev)
        if not raw:
            out[dev] = []
            continue
        words = np.frombuffer(raw, dtype=np.uint64).reshape(ring, rec_words)
        recs = []
        for w in words:
            op, kind, gs, gr = (int(v) for v in w[:4])
            if op == 0:
                continue
            ns = w[hw:hw + nb * npt].reshape(nb, npt).astype(np.int64)
            clk = w[hw + nb * npt:].reshape(nb, npt).astype(np.int64)
            recs.append(dict(op=op, kind=kind, grid_send=gs, grid_recv=gr, ns=ns,
                             clk=clk))
        out[dev] = recs
    return out


def op_table(per_dev):
    """per_dev: {device: record} of one op -> {point: stats}, span_us, per-GPU spans."""
    grids = {d: max(r["grid_send"], r["grid_recv"]) for d, r in per_dev.items()}
    ns = {d: r["ns"][:min(grids[d], r["ns"].shape[0])] for d, r in per_dev.items()}
    clk = {d: r["clk"][:min(grids[d], r["clk"].shape[0])] for d, r in per_dev.items()}
    entry_col = {d: (0 if (v[:, 0] > 0).any() else POINTS.index("recv_entry"))
                 for d, v in ns.items()}
    t0 = min(int(v[:, entry_col[d]][v[:, entry_col[d]] > 0].min()) for d, v in ns.items())
    exit_i = POINTS.index("exit")
    stats = {}
    for p, name in enumerate(POINTS):
        vals, gpu_meds, blk = [], [], []
        for d, v in ns.items():
            col = v[:, p]
            ok = col > 0
            if not ok.any():
                continue
            rel = (col[ok] - t0) / 1e3
            vals.append(rel)
            gpu_meds.append(float(np.median(rel)))
            # clock64, within the block: cycles per ns of this GPU from entry..exit spans.
            e = entry_col[d]
            both = (v[:, e] > 0) & (v[:, exit_i] > 0)
            dns = (v[both, exit_i] - v[both, e]).sum()
            dclk = (clk[d][both, exit_i] - clk[d][both, e]).sum()
            if dns > 0 and dclk > 0:
                okb = ok & (v[:, e] > 0)
                blk.append((clk[d][okb, p] - clk[d][okb, e]) / (dclk / dns) / 1e3)
        if not vals:
            continue
        allv = np.concatenate(vals)
        stats[name] = dict(med=float(np.median(allv)), p90=float(np.percentile(allv, 90)),
                           max=float(allv.max()), gpu_max=float(max(gpu_meds)),
                           gpu_min=float(min(gpu_meds)),
                           blk_clk=float(np.median(np.concatenate(blk))) if blk else float("nan"))
    spans = {d: (int(v[:, exit_i][v[:, exit_i] > 0].max()) - t0) / 1e3
             for d, v in ns.items() if (v[:, exit_i] > 0).any()}
    return stats, (max(spans.values()) if spans else float("nan")), spans


def summarize(tables):
    """Median over ops of each statistic."""
    names = [n for n in POINTS if all(n in t for t in tables)]
    return {n: {k: float(np.median([t[n][k] for t in tables])) for k in tables[0][n]}
            for n in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--num-sms", type=int, default=cll.DEFAULT_LL_NUM_SMS)
    ap.add_argument("--num-warps", type=int, default=cll.DEFAULT_LL_NUM_WARPS)
    ap.add_argument("--calls", type=int, default=16, help="ops per chain (the ring holds 16)")
    ap.add_argument("--reps", type=int, default=3, help="chains per op")
    ap.add_argument("--label", default="", help="names this build in the output")
    ap.add_argument("--ops", default="dispatch,combine")
    ap.add_argument("--out", default="", help="directory for a JSON of the results")
    a = ap.parse_args()

    T, H, K, E = a.tokens, a.hidden, a.topk, a.experts
    M = T
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    if not devices or not jax_ep.cuda_available():
        sys.exit("bench/ll_timing.py needs CUDA GPUs and the jax_ep CUDA extension")
    from jax_ep import _native
    ext = _native.load_testing()  # the probes: ll_timing, ll_timing_layout
    if not hasattr(ext, "ll_timing"):
        sys.exit("the jax_ep extension is not a profiling build: rebuild it with "
                 "-Ccmake.define.JAX_EP_LL_TIMING=ON (see this script's docstring)")
    R = len(devices)
    dev_ids = [int(d.local_hardware_id) for d in devices]
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    buf = jax_ep.Buffer(mesh, AXIS, backend="cuda",
                        num_nvl_bytes=jax_ep.Buffer.get_low_latency_size_hint(M, H, E, R))
    cfg = LowLatencyConfig(num_experts=E, num_ranks=R, axis_name=AXIS, max_tokens_per_rank=M,
                           num_tokens=T, num_topk=K, hidden=H, use_fp8=True, backend="cuda",
                           buffer_id=buf.buffer_id)
    kw = dict(num_sms=a.num_sms, num_warps=a.num_warps)
    x, idx, w = deepep_inputs(R, T, H, K, E)
    args = put_global(mesh, AXIS, x, idx, w)
    L = E // R
    n = max(2, min(a.calls, 16))

    def smap(body):
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))

    def dispatch_chain(x, i, w):
        x, i = x[0], i[0]
        keep = [cll.ll_dispatch(x, i, None, cfg, **kw)[1] for _ in range(n)]
        return jnp.stack(keep)[None]

    def combine_chain(x, i, w):
        x, i, w = x[0], i[0], w[0]
        _, _, handle = cll.ll_dispatch(x, i, None, cfg, **kw)
        y = jnp.broadcast_to(x[:1], (L * R * M, H)).reshape(L, R * M, H) * 0.5
        outs = [cll.ll_combine(y, i, w, handle, cfg, **kw) for _ in range(n)]
        return jnp.stack([o[0, :8] for o in outs])[None]

    chains = {"dispatch": smap(dispatch_chain), "combine": smap(combine_chain)}
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    report = dict(device=f"{R}x{devices[0].device_kind}", tokens=T, hidden=H, topk=K,
                  experts=E, num_sms=a.num_sms, num_warps=a.num_warps, calls=n, reps=a.reps,
                  label=a.label,
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), results={})
    spans_all = {}
    for opname in ops:
        fn = chains[opname]
        jax.block_until_ready(fn(*args))  # compile + warm-up
        seen = {d: max([r["op"] for r in recs] or [0])
                for d, recs in read_records(ext, dev_ids).items()}
        tables, spans, gpu_spans = [], [], []
        for _ in range(a.reps):
            jax.block_until_ready(fn(*args))
            recs = read_records(ext, dev_ids)
            by_op = {}
            for d, rs in recs.items():
                for r in rs:
                    if r["kind"] == KIND[opname] and r["op"] > seen[d]:
                        by_op.setdefault(r["op"], {})[d] = r
                seen[d] = max([r["op"] for r in rs] or [seen[d]])
            # The ranks' op counters advance together: an op number names the same op
            # on every GPU. Drop the chain's first op (launch skew) and partial ones.
            op_ids = sorted(o for o, m in by_op.items() if len(m) == len(dev_ids))[1:]
            for o in op_ids:
                t, span, per_gpu = op_table(by_op[o])
                tables.append(t)
                spans.append(span)
                gpu_spans.append(per_gpu)
        if not tables:
            print(f"{opname}: no complete records (not a profiling build?)")
            continue
        s = summarize(tables)
        span = float(np.median(spans))
        spans_all[opname] = span
        report["results"][opname] = dict(span_us=span, points=s, ops=len(tables))
        label = f" ({a.label})" if a.label else ""
        print(f"\n{opname}{label}: {len(tables)} ops, median span "
              f"{span:.1f} us (first entry on any GPU -> last exit on any GPU)")
        print(f"  {'point':<14}{'med':>8}{'p90':>8}{'max':>8}{'gpu min':>9}{'gpu max':>9}"
              f"{'blk(clk)':>10}   (us from the op's first entry)")
        # In time order; a point this kind of op never passes keeps another op's value in
        # the shared ring (before this op's entry): left out.
        for name, v in sorted(s.items(), key=lambda kv: kv[1]["blk_clk"]):
            if v["med"] < 0:
                continue
            print(f"  {name:<14}{v['med']:>8.2f}{v['p90']:>8.2f}{v['max']:>8.2f}"
                  f"{v['gpu_min']:>9.2f}{v['gpu_max']:>9.2f}{v['blk_clk']:>10.2f}")
    if spans_all:
        print("\nspan per op (us), median over ops: " +
              ", ".join(f"{o} {spans_all[o]:.1f}" for o in ops if o in spans_all))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        suffix = f"-{a.label}" if a.label else ""
        path = os.path.join(a.out, f"ll_timing-{R}x{devices[0].device_kind.replace(' ', '-')}"
                            f"{suffix}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"saved {path}")
    buf.close()


if __name__ == "__main__":
    main()
