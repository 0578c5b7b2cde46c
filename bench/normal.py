"""Normal-kernel benchmark: jax_ep CUDA dispatch/combine beside jax.lax.all_to_all.

DeepEP's setting: T=4096 tokens per rank, H=7168, K=8, E=256, random top-k on
|randn|+1 scores, all GPUs of the machine in one process. Bandwidth in DeepEP's metric:
bytes of the rows a rank receives (dispatch) or sends back (combine), one row per
(token, rank), over the op's time. The baseline is what a JAX user writes today:
``jax.lax.all_to_all`` of a ``[R, T, H]`` slab per rank (capacity = T per peer).

Timing: one jit holds n back-to-back calls of an op; the time per call is the
difference between n=N_LONG and n=N_SHORT runs over the difference in calls (launch
and host overheads cancel); the two runs alternate, median of the paired differences
(bench/timing.py: per_call_us).

``--node-size G`` (with one process per GPU, ``--processes``) cuts the EP axis into nodes
of G ranks (``JAX_EP_NODE_SIZE``): the internode path runs, and the same ops through an
intranode Buffer over the same ranks are timed beside it. Its bytes are reported the way
DeepEP does: the RDMA hop's (one row per (token, other node)) and the NVLink hop's (one
row per (token, rank)) separately.

Usage: python bench/normal.py [--tokens 4096] [--hidden 7168] [--num-sms 24] [--out DIR]
       python bench/normal.py --processes 4 --node-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax_ep  # noqa: E402
from jax_ep import distributed  # noqa: E402
from jax_ep.backends import cuda as cuda_backend  # noqa: E402
import processes  # noqa: E402  (bench/processes.py)
from inputs import deepep_inputs, put_global  # noqa: E402  (bench/inputs.py)
from timing import per_call_us  # noqa: E402  (bench/timing.py)

AXIS = "ep"


def nvlink_ceiling(paths, num_sms, num_ranks):
    """The best per-GPU NVLink rate (GB/s) that ``bench/nvlink_ceiling.cu`` measured with
    ``num_sms`` SMs: ``push`` (stores) and ``pull`` (loads, as combine). At 2 ranks a
    ``--local-copy 1`` run (one local row per remote row, dispatch's mix there) replaces
    the plain push rate; at more ranks the plain rate stays (an upper bound)."""
    best = {}  # (local_copy, "push" | "pull") -> GB/s
    for path in paths.split(","):
        with open(path) as f:
            run = json.load(f)
        if run["gpus"] < 2 or run["one_way"]:
            continue
        for r in run["results"]:
            if r["sms"] == num_sms:
                key = (run.get("local_copy", False), "pull" if r["method"] == "pull" else "push")
                best[key] = max(best.get(key, 0.0), r["gb_per_s_per_gpu"])
    rates = {kind: best[(False, kind)] for kind in ("push", "pull") if (False, kind) in best}
    if num_ranks == 2 and (True, "push") in best:
        rates["push"] = best[(True, "push")]
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--num-sms", type=int, default=24)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sms-sweep", default="",
                    help="comma-separated SM counts: also time dispatch BF16 and combine at each")
    ap.add_argument("--ceiling", default="",
                    help="comma-separated JSON outputs of bench/nvlink_ceiling.cu from this "
                         "machine: report each op against the NVLink rate that SMs reach there")
    ap.add_argument("--node-size", type=int, default=0,
                    help="ranks per node: the EP axis spans several (logical) nodes and the "
                         "internode path runs, timed beside the intranode path")
    processes.add_arguments(ap)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    a = ap.parse_args()
    processes.start(a, __file__)
    lead = jax.process_index() == 0  # the process that prints and writes the result
    T, H, K, E = a.tokens, a.hidden, a.topk, a.experts
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    if not devices or not jax_ep.cuda_available():
        sys.exit("bench/normal.py needs CUDA GPUs and the jax_ep CUDA extension")
    R = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    G = a.node_size or R
    if R % G:
        sys.exit(f"--node-size {G} must divide the {R} ranks")
    intranode_buf = None
    if G < R:
        intranode_buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_sms=a.num_sms)
        os.environ[distributed.NODE_SIZE_ENV] = str(G)  # the next Buffer spans nodes
    buf = jax_ep.Buffer(mesh, AXIS, backend="cuda", num_sms=a.num_sms)

    x, idx, w = deepep_inputs(R, T, H, K, E)
    x_d, idx_d, w_d = put_global(mesh, AXIS, x, idx, w)

    def smap(body, out_specs=P(AXIS)):
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=out_specs))

    # Received rows per rank (one per (token, rank)), for the bandwidth metric.
    L = E // R
    dest = idx // L
    rows_per_rank = [int(sum(np.any(dest[s] == r, axis=1).sum() for s in range(R)))
                     for r in range(R)]
    rows = statistics.mean(rows_per_rank)

    def dispatch_chain(n, fp8, num_sms=a.num_sms, buf=buf):
        def body(x, i, w):
            x, i, w = x[0], i[0], w[0]
            payload = jax_ep.fp8.per_token_cast(x) if fp8 else x
            keep = []
            for _ in range(n):  # side-effecting calls: none is merged or dropped
                r = jax_ep.dispatch(payload, i, w, num_experts=E, axis_name=AXIS, buffer=buf,
                                    backend="cuda", num_sms=num_sms)
                keep.append(r.num_recv_tokens)
            return jnp.stack(keep)[None] if keep else jnp.zeros((1, 0), jnp.int32)
        return smap(body)

    def combine_chain(n, num_sms=a.num_sms, buf=buf):
        def body(x, i, w):
            x, i, w = x[0], i[0], w[0]
            # combine runs with the SM count its handle's dispatch had
            r = jax_ep.dispatch(x, i, w, num_experts=E, axis_name=AXIS, buffer=buf,
                                backend="cuda", num_sms=num_sms)
            outs = [jax_ep.combine(r.recv_x, r.handle) for _ in range(n)]
            return jnp.stack([o[0, :8] for o in outs])[None] if outs else r.recv_x[:1, :8][None]
        return smap(body)

    def cached_dispatch_chain(n, num_sms=a.num_sms, buf=buf):
        """combine's backward: rows back to the ranks of a dispatch's handle (pull)."""
        def body(x, i, w):
            x, i, w = x[0], i[0], w[0]
            r = jax_ep.dispatch(x, i, w, num_experts=E, axis_name=AXIS, buffer=buf,
                                backend="cuda", num_sms=num_sms)
            cfg = r.handle.config
            outs = [cuda_backend.cached_dispatch(x, r.handle.arrays, cfg) for _ in range(n)]
            return jnp.stack([o[0, :8] for o in outs])[None] if outs else r.recv_x[:1, :8][None]
        return smap(body)

    def a2a_chain(n, fp8):
        def body(x):
            slab = jnp.broadcast_to(x[0][None], (R, T, H))  # capacity T per peer
            if fp8:
                q, s = jax_ep.fp8.per_token_cast(slab.reshape(R * T, H))
                parts = [q.reshape(R, T, H), s.reshape(R, T, H // 128)]
            else:
                parts = [slab]
            for _ in range(n):
                parts = [jax.lax.all_to_all(p, AXIS, 0, 0, tiled=False) for p in parts]
            return tuple(p[:1, :1][None] for p in parts)
        return smap(body)

    n_short, n_long = 2, 22
    results = {}

    def record(name, ours_us, base_us, row_bytes):
        if base_us is None:
            results[name] = dict(jax_ep_us=round(ours_us, 1))
            return
        gbs = rows * row_bytes / (ours_us * 1e-6) / 1e9
        base_gbs = rows * row_bytes / (base_us * 1e-6) / 1e9
        results[name] = dict(jax_ep_us=round(ours_us, 1), jax_ep_GBps=round(gbs, 1),
                             all_to_all_us=round(base_us, 1), all_to_all_GBps=round(base_gbs, 1),
                             speedup=round(base_us / ours_us, 3))

    bf16_row = H * 2
    fp8_row = H + (H // 128) * 4
    fixed_cost = processes.fixed_cost_reason(R, a)
    if fixed_cost:  # no exchange to compare: kernel times alone, no baseline, no verdict
        a2a_bf16 = a2a_fp8 = None
    else:
        a2a_bf16 = per_call_us(lambda n: a2a_chain(n, False), (x_d,), n_short, n_long, a.reps)
        a2a_fp8 = per_call_us(lambda n: a2a_chain(n, True), (x_d,), n_short, n_long, a.reps)
    d_bf16 = per_call_us(lambda n: dispatch_chain(n, False), (x_d, idx_d, w_d), n_short, n_long,
                         a.reps)
    d_fp8 = per_call_us(lambda n: dispatch_chain(n, True), (x_d, idx_d, w_d), n_short, n_long,
                        a.reps)
    c_bf16 = per_call_us(combine_chain, (x_d, idx_d, w_d), n_short, n_long, a.reps)
    record("dispatch_bf16", d_bf16, a2a_bf16, bf16_row)
    record("dispatch_fp8", d_fp8, a2a_fp8, fp8_row)
    record("combine_bf16", c_bf16, a2a_bf16, bf16_row)
    cd_bf16 = per_call_us(cached_dispatch_chain, (x_d, idx_d, w_d), n_short, n_long, a.reps)
    record("cached_dispatch_bf16", cd_bf16, a2a_bf16, bf16_row)

    hops = {}
    if intranode_buf is not None:  # the same ops inside one NVLink domain, and the hops' bytes
        node_of = np.where(idx >= 0, idx // (L * G), -1)
        rdma_rows = statistics.mean(
            sum(int(np.any(node_of[s] == m, axis=1).sum()) for m in range(R // G) if m != s // G)
            for s in range(R))
        intra = {}
        for name, chain in (("dispatch_bf16", lambda n: dispatch_chain(n, False, buf=intranode_buf)),
                            ("combine_bf16", lambda n: combine_chain(n, buf=intranode_buf))):
            intra[name] = per_call_us(chain, (x_d, idx_d, w_d), n_short, n_long, a.reps)
        for name in ("dispatch_bf16", "combine_bf16"):
            us = results[name]["jax_ep_us"]
            row = dict(node_size=G, num_nodes=R // G, internode_us=us,
                       intranode_us=round(intra[name], 1),
                       internode_over_intranode=round(us / intra[name], 3),
                       rdma_rows_per_rank=round(rdma_rows, 1), nvlink_rows_per_rank=round(rows, 1))
            if not fixed_cost:
                row.update(rdma_GBps=round(rdma_rows * bf16_row / (us * 1e-6) / 1e9, 1),
                           nvlink_GBps=round(rows * bf16_row / (us * 1e-6) / 1e9, 1))
            hops[name] = row

    sweep = {}
    for sms in [int(v) for v in a.sms_sweep.split(",") if v]:
        d_us = per_call_us(lambda n: dispatch_chain(n, False, sms), (x_d, idx_d, w_d), n_short,
                           n_long, a.reps)
        c_us = per_call_us(lambda n: combine_chain(n, sms), (x_d, idx_d, w_d), n_short, n_long,
                           a.reps)
        sweep[str(sms)] = dict(dispatch_bf16_us=round(d_us, 1), combine_bf16_us=round(c_us, 1))
        if not fixed_cost:
            sweep[str(sms)].update(
                dispatch_bf16_GBps=round(rows * bf16_row / (d_us * 1e-6) / 1e9, 1),
                combine_bf16_GBps=round(rows * bf16_row / (c_us * 1e-6) / 1e9, 1))

    # Targets of the tuning issue (../shared/ANCHORS.md, EP4 with <= 24 SMs).
    targets = {"dispatch_bf16": ("jax_ep_GBps", ">=", 450.0),
               "dispatch_fp8": ("jax_ep_us", "<=", 250.0),
               "combine_bf16": ("jax_ep_GBps", ">=", 500.0)}
    for name, (key, op, bound) in targets.items():
        if fixed_cost:
            break
        v = results[name][key]
        results[name]["target"] = f"{key} {op} {bound:g}"
        results[name]["target_met"] = bool(v >= bound if op == ">=" else v <= bound)
        results[name]["target_1.5x_all_to_all_met"] = bool(results[name]["speedup"] >= 1.5)

    ceiling = nvlink_ceiling(a.ceiling, a.num_sms, R) if a.ceiling else {}
    for name, r in results.items():  # floors from the measured NVLink rate, (R-1)/R remote
        rate = ceiling.get("pull" if name.startswith("combine") or name.startswith("cached")
                           else "push")
        if not rate or fixed_cost:
            continue
        row_bytes = fp8_row if "fp8" in name else bf16_row
        floor_us = rows * (R - 1) / R * row_bytes / (rate * 1e3)
        r["ceiling_GBps_per_gpu"] = rate
        r["nvlink_floor_us"] = round(floor_us, 1)
        r["fraction_of_ceiling"] = round(floor_us / r["jax_ep_us"], 3)
        if "target" in r:  # the target's time, against the data floor alone
            key, op, bound = targets[name]
            target_us = bound if key == "jax_ep_us" else rows * row_bytes / (bound * 1e3)
            r["target_within_ceiling"] = bool(target_us >= floor_us)

    device = processes.device_name(R, devices[0].device_kind, a)
    report = dict(device=device, command=" ".join(["python3"] + sys.argv), num_ranks=R,
                  fixed_cost=fixed_cost, tokens=T, hidden=H, topk=K, experts=E,
                  num_sms=a.num_sms, rows_received_per_rank=rows_per_rank,
                  jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  method=f"per-call = median over {a.reps} alternating pairs of (jit of "
                         f"{n_long} calls - jit of {n_short}) / {n_long - n_short}; "
                         "layout='rank'",
                  results=results, sms_sweep=sweep, internode=hops,
                  nvlink_ceiling=dict(ceiling, sources=a.ceiling))
    if not lead:
        buf.close()  # collective across the processes
        if intranode_buf is not None:
            intranode_buf.close()
        return
    os.makedirs(a.out, exist_ok=True)
    suffix = f"-{R // G}x{G}nodes" if G < R else ""
    path = os.path.join(a.out, f"normal-{device}{suffix}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{device}, T={T} H={H} K={K} E={E}, {a.num_sms} SMs, "
          f"~{rows:.0f} rows received per rank")
    if fixed_cost:
        print(f"FIXED-COST figures ({fixed_cost}); no all_to_all baseline, no ratio, no target")
        for name, r in results.items():
            print(f"{name:<22}{r['jax_ep_us']:>11.1f} us")
        for sms, r in sweep.items():
            print(f"  {sms:>3} SMs: dispatch bf16 {r['dispatch_bf16_us']} us, "
                  f"combine {r['combine_bf16_us']} us")
    else:
        print(f"{'op':<22}{'jax_ep us':>11}{'GB/s':>8}{'all_to_all us':>15}{'GB/s':>8}"
              f"{'speedup':>9}")
    for name, r in results.items():
        if fixed_cost:
            break
        verdict = ("" if "target" not in r else
                   f"  target {r['target']}: {'PASS' if r['target_met'] else 'FAIL'}")
        print(f"{name:<22}{r['jax_ep_us']:>11.1f}{r['jax_ep_GBps']:>8.1f}"
              f"{r['all_to_all_us']:>15.1f}{r['all_to_all_GBps']:>8.1f}{r['speedup']:>9.2f}"
              + verdict)
        if "nvlink_floor_us" in r:
            print(f"{'':<22}NVLink floor {r['nvlink_floor_us']} us at the measured "
                  f"{r['ceiling_GBps_per_gpu']} GB/s: {100 * r['fraction_of_ceiling']:.0f}% of "
                  f"the ceiling" + ("" if "target" not in r else
                                    f"; target {'within' if r['target_within_ceiling'] else 'BEYOND'}"
                                    " the ceiling"))
    for sms, r in sweep.items():
        if fixed_cost:
            break
        print(f"  {sms:>3} SMs: dispatch bf16 {r['dispatch_bf16_us']} us "
              f"({r['dispatch_bf16_GBps']} GB/s), combine {r['combine_bf16_us']} us "
              f"({r['combine_bf16_GBps']} GB/s)")
    for name, r in hops.items():
        print(f"{name} over {r['num_nodes']} nodes of {r['node_size']}: internode "
              f"{r['internode_us']} us vs intranode {r['intranode_us']} us "
              f"({r['internode_over_intranode']}x); RDMA hop {r['rdma_rows_per_rank']} rows, "
              f"NVLink hop {r['nvlink_rows_per_rank']} rows per rank"
              + ("" if fixed_cost else f"; RDMA {r['rdma_GBps']} GB/s, NVLink "
                                       f"{r['nvlink_GBps']} GB/s")
              + (" (FIXED COST: ranks share a GPU, not network figures)" if fixed_cost else ""))
    print(f"saved {path}")
    buf.close()
    if intranode_buf is not None:
        intranode_buf.close()


if __name__ == "__main__":
    main()
