"""Does an exchange run at the same time as the compute placed beside it (a probe, one GPU).

Programs, each jitted under ``shard_map`` over one rank (every row is local: a FIXED-COST
setting, not an NVLink figure), with an independent bf16 matmul (``--n``^3):

* ``serial_<op>``: the op on a compute-stream Buffer, then the matmul;
* ``beside_<op>``: ``jax_ep.beside(op, matmul)`` on a ``Buffer(side_stream=True)``;

for ``<op>`` = ``dispatch`` (T=4096, H=7168, E=64, K=8, expert layout) and ``combine``
(its weighted combine). Prints and writes (``--out``, JSON) per program: from the compiled
HLO, where each side-stream launch, its join and the GEMMs sit in XLA's schedule; from a
profile of ``--calls`` calls, the stream of the jax_ep kernels and of the matmuls, how long
kernels of two streams ran at once, and how long jax_ep's kernels ran beside other kernels;
the median time of a call (``--iters`` timed calls), serial against beside.

Run (GPU)::

    PYTHONPATH=. python3 bench/overlap_probe.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# How a GEMM shows in compiled GPU HLO: a cuBLAS custom call, or a fusion whose backend
# config names the Triton (or cuBLAS) GEMM emitter.
GEMM = re.compile("|".join(re.escape(m) for m in (
    'custom_call_target="__cublas', '"kind":"__triton_gemm"',
    '"kind":"__triton_nested_gemm_fusion"', '"kind":"__cublas')))
LAUNCH = re.compile(r'custom_call_target="(jax_ep_\w+)_on_side_stream"')
JOIN = 'custom_call_target="jax_ep_side_stream_join"'
SLOT = re.compile(r"side_slot = (-?\d+)")


def _computations(hlo: str) -> tuple[dict, str | None]:
    """{computation name: its instruction lines, in printed order} and the ENTRY name.
    A scheduled module prints each computation in its schedule's order."""
    comps, entry, name = {}, None, None
    header = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
    for line in hlo.splitlines():
        if name is None:
            m = header.match(line)
            if m and not line.startswith("HloModule"):
                name = m.group(2)
                comps[name] = []
                entry = name if m.group(1) else entry
        elif line.startswith("}"):
            name = None
        else:
            comps[name].append(line.strip())
    return comps, entry


def _result_name(line: str) -> str:
    return line.removeprefix("ROOT ").split(" = ", 1)[0].lstrip("%")


def _custom_call_line(comps: dict, line: str, mark, seen=()):
    """The line that ``mark`` (a regex or a string) finds in the instruction or in a
    computation it calls (a command buffer, or the dynamic-slice fusion XLA wraps a custom
    call whose operands are slices into), or None."""
    if (mark.search(line) if hasattr(mark, "search") else mark in line):
        return line
    for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
        if callee in comps and callee not in seen:
            for inner in comps[callee]:
                found = _custom_call_line(comps, inner, mark, seen + (callee,))
                if found:
                    return found
    return None


def schedule_report(hlo: str) -> dict:
    """Where, in the compiled entry computation, each side-stream launch and its join sit
    (directly or inside the fusion XLA wrapped them in), and where the GEMMs sit relative
    to each pair."""
    comps, entry = _computations(hlo)
    lines = comps.get(entry, [])
    launches, joins = {}, {}
    for i, line in enumerate(lines):
        found = _custom_call_line(comps, line, LAUNCH)
        if found:
            launches[int(SLOT.search(found).group(1))] = (LAUNCH.search(found).group(1), i)
        found = _custom_call_line(comps, line, JOIN)
        if found:
            joins[int(SLOT.search(found).group(1))] = i
    pairs = [dict(op=op, slot=slot, launch_at=i, join_at=joins.get(slot))
             for slot, (op, i) in sorted(launches.items(), key=lambda kv: kv[1][1])]
    marked = {p["launch_at"] for p in pairs} | set(joins.values())
    gemms = []
    for i, line in enumerate(lines):
        if i in marked or _custom_call_line(comps, line, GEMM) is None:
            continue
        where = []
        for p in pairs:
            if i < p["launch_at"]:
                where.append(f"before {p['op']} launch")
            elif p["join_at"] is None or i < p["join_at"]:
                where.append(f"between {p['op']} launch and join")
            else:
                where.append(f"after {p['op']} join")
        gemms.append(dict(name=_result_name(line), at=i, where=where))
    return dict(scheduled="is_scheduled=true" in hlo[:2000], entry_instructions=len(lines),
                pairs=pairs, gemms=gemms)


def cross_stream_us(kernels) -> float:
    """The longest time kernels of one stream ran while kernels of another stream ran
    (``kernels``: (name, start_us, duration_us, stream) as trace_summary lists them)."""
    from trace_summary import concurrent_ns
    streams = {k[3] for k in kernels}
    best = 0.0
    for s in streams:
        mine = [(k[1], k[2]) for k in kernels if k[3] == s]
        rest = [(k[1], k[2]) for k in kernels if k[3] != s]
        best = max(best, concurrent_ns(mine, rest))
    return round(best, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="the matmul's M = N = K")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--num-sms", type=int, default=24, help="SMs of the jax_ep kernels")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--calls", type=int, default=3, help="calls under the profiler")
    p.add_argument("--out", default="/tmp/overlap_probe")
    return p.parse_args(argv)


def _median_ms(fn, args, iters: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return round(times[len(times) // 2], 3)


def probe(args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_summary

    import jax_ep

    mesh = jax.make_mesh((1,), ("ep",))
    side = jax_ep.Buffer(mesh, "ep", side_stream=True, num_sms=args.num_sms)
    plain = jax_ep.Buffer(mesh, "ep", num_sms=args.num_sms)
    k = jax.random.split(jax.random.key(0), 5)
    a = jax.random.normal(k[0], (args.n, args.n), jnp.bfloat16)
    b = jax.random.normal(k[1], (args.n, args.n), jnp.bfloat16)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    x = jax.random.normal(k[2], (T, H), jnp.bfloat16)
    idx = jax.random.randint(k[3], (T, K), 0, E, jnp.int32)
    w = jax.random.uniform(k[4], (T, K), jnp.float32)
    matmul = lambda a, b: a @ b  # noqa: E731
    on_mesh = lambda v, spec: jax.device_put(  # noqa: E731
        v, jax.sharding.NamedSharding(mesh, spec))
    a, b = on_mesh(a, P()), on_mesh(b, P())
    x, idx, w = (on_mesh(v, P("ep")) for v in (x, idx, w))

    def program(op, buf, together):
        def body(a, b, x, idx, w):
            def dispatch():
                return jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                       layout="expert", buffer=buf)
            if op == "dispatch":
                exchange = lambda: dispatch().recv_x  # noqa: E731
            else:
                d = dispatch()
                exchange = lambda: jax_ep.combine(  # noqa: E731
                    d.recv_x, d.handle, d.recv_topk_weights)
            if together:
                moved, product = jax_ep.beside(exchange, matmul, a, b)
            else:
                moved, product = exchange(), matmul(a, b)
            return product, moved
        return jax.jit(jax.shard_map(body, mesh=mesh,
                                     in_specs=(P(), P(), P("ep"), P("ep"), P("ep")),
                                     out_specs=(P(), P("ep"))))

    os.makedirs(args.out, exist_ok=True)
    out = {}
    operands = (a, b, x, idx, w)
    for op in ("dispatch", "combine"):
        for label, buf, together in ((f"serial_{op}", plain, False),
                                     (f"beside_{op}", side, True)):
            fn = program(op, buf, together)
            hlo = fn.lower(*operands).compile().as_text()
            with open(os.path.join(args.out, f"overlap_probe_hlo_{label}.txt"), "w") as f:
                f.write(hlo)
            summary = trace_summary.profile(fn, operands, args.out, f"overlap_probe_{label}",
                                            all_kernels=True, calls=args.calls)
            g = next(iter(summary.get("gpus", {}).values()), {})
            kernels = g.get("kernels_in_order", [])
            out[label] = dict(
                schedule=schedule_report(hlo), cross_stream_us=cross_stream_us(kernels),
                streams=g.get("streams"), jax_ep_busy_us=g.get("jax_ep_busy_us"),
                jax_ep_concurrent_us=g.get("jax_ep_concurrent_us"),
                span_us=g.get("span_us"), median_ms=_median_ms(fn, operands, args.iters),
                kernels=[(kk[0][:48], kk[1], kk[2], kk[3]) for kk in kernels[:16]],
                error=summary.get("error"))
        serial, together = out[f"serial_{op}"], out[f"beside_{op}"]
        together["serial_over_beside"] = round(serial["median_ms"] / together["median_ms"], 3)
    side.close()
    plain.close()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    result = dict(
        device=f"1x{jax.devices()[0].device_kind}", date=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                         time.gmtime()),
        command="python3 bench/overlap_probe.py " + " ".join(argv or sys.argv[1:]),
        note="one rank: every row is local, a fixed-cost setting (no NVLink)",
        config=vars(args), programs=probe(args))
    for label, r in result["programs"].items():
        print(f"== {label}: {r['median_ms']} ms per call"
              + (f" (serial / beside {r['serial_over_beside']}x)" if "serial_over_beside" in r
                 else "")
              + f"; streams {r['streams']}; kernels of two streams at once "
              f"{r['cross_stream_us']} us; jax_ep {r['jax_ep_busy_us']} us, "
              f"{r['jax_ep_concurrent_us']} us of it beside other kernels")
        for p in r["schedule"]["pairs"]:
            print(f"   {p['op']} slot {p['slot']}: launch at {p['launch_at']}, join at "
                  f"{p['join_at']} of {r['schedule']['entry_instructions']}")
        for gm in r["schedule"]["gemms"]:
            print(f"   matmul {gm['name']} at {gm['at']}: {', '.join(gm['where']) or '-'}")
    name = f"overlap_probe-{result['device'].replace(' ', '-')}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
