"""Which GPU stream a stream-annotated region runs on, under which XLA flags (a probe).

Profiles four jitted programs, each with an independent 8192^3 bf16 matmul beside a
region made by ``jax_ep.backends.cuda._stream.on_side_stream``: (a) the region holds a
second matmul, (b) the same with the region's call and the matmul in one XLA scheduling
group (``on_side_stream(..., group=1)`` and ``scheduling_group(1)``), (c) the region holds a
``jax_ep.dispatch`` on a ``Buffer(side_stream=True)``, (d) a ``jax_ep.dispatch`` region and
the matmul in one scheduling group.
Prints, per XLA flag set (each in a fresh process): from the compiled HLO, whether each
``call-start`` carries the group id, its ``async_execution_thread`` (XLA's GPU scheduler
treats the pair as async compute only if that differs from the computation's own thread),
and where the schedule put the independent matmul
(before the call-start, between start and done, after the done); from a profile, the stream
of every kernel, how long kernels of different streams ran at the same time, and how long
the region's jax_ep kernels ran beside the other matmul. The compiled HLO of every program
goes to ``$PROBE_HLO_DIR`` (default /tmp/stream_probe/hlo). ``$PROBE_PROGRAMS`` (labels,
comma-separated) runs only those programs; ``$PROBE_TIMEOUT`` (seconds, default 360) bounds
each flag set's process.

Run (GPU)::

    PYTHONPATH=. python3 bench/stream_probe.py               # every flag set
    PYTHONPATH=. python3 bench/stream_probe.py lhs,lhs_no_command_buffer   # the groups
                                              # act only under the latency-hiding scheduler
    PYTHONPATH=. python3 bench/stream_probe.py lhs,lhs_no_cublaslt,lhs_no_cublaslt_no_command_buffer
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

FLAG_SETS = {
    "default": "",
    "stream_annotation": "--xla_gpu_experimental_stream_annotation=true",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
    "both": "--xla_gpu_experimental_stream_annotation=true --xla_gpu_enable_command_buffer=",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "lhs_no_command_buffer": "--xla_gpu_enable_latency_hiding_scheduler=true "
                             "--xla_gpu_enable_command_buffer=",
    # cuBLASLt GEMMs (__cublas$lt$matmul) lose a group id in XLA's legalization; plain
    # cuBLAS GEMMs (__cublas$gemm) keep it.
    "lhs_no_cublaslt": "--xla_gpu_enable_latency_hiding_scheduler=true "
                       "--xla_gpu_enable_cublaslt=false",
    # the same, and no command buffers, so that no GEMM hides inside a CUDA graph call
    "lhs_no_cublaslt_no_command_buffer": "--xla_gpu_enable_latency_hiding_scheduler=true "
                                         "--xla_gpu_enable_cublaslt=false "
                                         "--xla_gpu_enable_command_buffer=",
}

# How a GEMM shows in compiled GPU HLO: a cuBLAS custom call, or a fusion whose backend
# config names the Triton (or cuBLAS) GEMM emitter. XLA keeps a scheduling group id on the
# GPU only on these (gpu_hlo_schedule.cc, SchedulingAnnotationsConfig).
GEMM_MARKS = ('custom_call_target="__cublas', '"kind":"__triton_gemm"', '"kind":"__cublas')


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


def _has_gemm(comps: dict, line: str, seen=()) -> bool:
    """The instruction is a GEMM or calls a computation (a command buffer, say) holding one."""
    if any(m in line for m in GEMM_MARKS):
        return True
    for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
        if callee in comps and callee not in seen and any(
                _has_gemm(comps, inner, seen + (callee,)) for inner in comps[callee]):
            return True
    return False


def schedule_report(hlo: str) -> dict:
    """Where, in the compiled entry computation, the independent GEMMs sit relative to each
    call-start / call-done pair, and which of them carry a scheduling group id."""
    comps, entry = _computations(hlo)
    lines = comps.get(entry, [])
    group = re.compile(r'_scheduling_group_id="([^"]*)"')
    thread = re.compile(r'async_execution_thread="([^"]*)"')

    def gid(line):
        m = group.search(line)
        return m.group(1) if m else None
    pairs = []
    for i, line in enumerate(lines):
        if " call-start(" not in line:
            continue
        start = _result_name(line)
        done = next((j for j, ln in enumerate(lines)
                     # the operand may be printed with its shape before the name
                     if re.search(rf" call-done\([^%]*%?{re.escape(start)}\)", ln)),
                    None)
        m = thread.search(line)
        pairs.append(dict(start=start, start_at=i, done_at=done, group=gid(line),
                          done_group=gid(lines[done]) if done is not None else None,
                          # XLA prints the attribute only for a thread other than "main"
                          thread=m.group(1) if m else "main"))
    gemms = []
    for i, line in enumerate(lines):
        if " call-start(" in line or " call-done(" in line or not _has_gemm(comps, line):
            continue
        where = []
        for p in pairs:
            if i < p["start_at"]:
                where.append("before call-start")
            elif p["done_at"] is None or i < p["done_at"]:
                where.append("between call-start and call-done")
            else:
                where.append("after call-done")
        gemms.append(dict(name=_result_name(line), at=i, group=gid(line), where=where))
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


def probe() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_summary

    import jax_ep
    from jax_ep.backends.cuda._stream import on_side_stream, scheduling_group

    mesh = jax.make_mesh((1,), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep", side_stream=True)
    plain = jax_ep.Buffer(mesh, "ep")  # compute stream: the grouped region moves it
    n = 8192
    k = jax.random.split(jax.random.key(0), 4)
    a, b, c, d = (jax.random.normal(kk, (n, n), jnp.bfloat16) for kk in k)
    T, H, K, E = 4096, 7168, 8, 64
    on_mesh = jax.sharding.NamedSharding(mesh, P("ep"))
    x = jax.device_put(jax.random.normal(k[0], (T, H), jnp.bfloat16), on_mesh)
    idx = jax.device_put(jax.random.randint(k[1], (T, K), 0, E, jnp.int32), on_mesh)
    w = jax.device_put(jnp.ones((T, K), jnp.float32), on_mesh)

    def dots(a, b, c, d):
        inside = on_side_stream(lambda c, d: c @ d)(c, d)
        return a @ b, inside

    def grouped_dots(a, b, c, d):
        """The region's call and the matmul beside it in XLA scheduling group 1."""
        inside = on_side_stream(lambda c, d: c @ d, group=1)(c, d)
        with scheduling_group(1):
            outside = a @ b
        return outside, inside

    def exchange(a, b, x, idx, w):
        sm = jax.shard_map(
            lambda x, idx, w: jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                              layout="expert", buffer=buf).recv_x,
            mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        return a @ b, sm(x, idx, w)

    def grouped_exchange(a, b, x, idx, w):
        """A dispatch region and the matmul in scheduling group 2, in one shard_map body (a
        group lives in one computation)."""
        def body(a, b, x, idx, w):
            recv = on_side_stream(
                lambda x, idx, w: jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                                  layout="expert", buffer=plain).recv_x,
                group=2)(x, idx, w)
            with scheduling_group(2):
                outside = a @ b
            return outside, recv
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("ep"), P("ep"), P("ep")),
                             out_specs=(P(), P("ep")))(a, b, x, idx, w)

    hlo_dir = os.environ.get("PROBE_HLO_DIR", "/tmp/stream_probe/hlo")
    os.makedirs(hlo_dir, exist_ok=True)
    out = {}
    programs = (
        ("dot_in_region", dots, (a, b, c, d)),
        ("dot_in_region_scheduling_group", grouped_dots, (a, b, c, d)),
        ("dispatch_in_region", exchange, (a, b, x, idx, w)),
        ("dispatch_in_region_scheduling_group", grouped_exchange, (a, b, x, idx, w)),
    )
    only = os.environ.get("PROBE_PROGRAMS")  # comma-separated labels, to run fewer
    if only:
        programs = [p for p in programs if p[0] in only.split(",")]
    for label, fn, args in programs:
        jitted = jax.jit(fn)
        try:
            stablehlo = jitted.lower(*args).as_text()
            call_has_group = any("_scheduling_group_id" in ln and "_xla_stream_annotation" in ln
                                 for ln in stablehlo.splitlines() if " call @" in ln)
            hlo = jitted.lower(*args).compile().as_text()
        except Exception as err:  # report it and go on with the other program
            out[label] = dict(error=f"{type(err).__name__}: {str(err)[:800]}")
            continue
        with open(os.path.join(hlo_dir, f"{os.environ.get('PROBE_FLAG_SET', 'run')}-"
                               f"{label}.txt"), "w") as f:
            f.write(hlo)
        summary = trace_summary.profile(jitted, args, "/tmp/stream_probe", label,
                                        all_kernels=True)
        g = next(iter(summary.get("gpus", {}).values()), {})
        kernels = g.get("kernels_in_order", [])
        out[label] = dict(
            call_starts=hlo.count("call-start("), call_has_group=call_has_group,
            schedule=schedule_report(hlo), cross_stream_us=cross_stream_us(kernels),
            streams=g.get("streams"),
            jax_ep_concurrent_us=g.get("jax_ep_concurrent_us"),
            kernels=[(k_[0][:48], k_[1], k_[2], k_[3]) for k_ in kernels],
            error=summary.get("error"))
    buf.close()
    plain.close()
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(probe()))
        return 0
    results = {}
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(FLAG_SETS)
    for name in chosen:
        flags = FLAG_SETS[name]
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
                   PROBE_FLAG_SET=name)
        try:
            run = subprocess.run([sys.executable, __file__, "--child"], env=env, text=True,
                                 capture_output=True,
                                 timeout=int(os.environ.get("PROBE_TIMEOUT", "360")))
            out, err = run.stdout, run.stderr
        except subprocess.TimeoutExpired as exc:  # report it and go on with the next set
            out, err = "", f"timed out after {exc.timeout} s"
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        results[name] = (json.loads(line[0][7:]) if line else
                         dict(error=(err or out)[-1500:]))
        print(f"== {name} ({flags or 'no flags'})")
        for label, r in results[name].items() if line else [("error", results[name])]:
            if not isinstance(r, dict) or "kernels" not in r:
                print(f"  {label}: {r}")
                continue
            print(f"  {label}: call-start x{r['call_starts']} (group id on the StableHLO call: "
                  f"{r['call_has_group']}), streams {r['streams']}, kernels of two streams at "
                  f"once {r['cross_stream_us']} us, jax_ep beside others "
                  f"{r['jax_ep_concurrent_us']} us")
            sched = r["schedule"]
            for p in sched["pairs"]:
                print(f"    {p['start']}: group id {p['group']} (done: {p['done_group']}), "
                      f"thread {p['thread']}, "
                      f"entry position {p['start_at']} to {p['done_at']} of "
                      f"{sched['entry_instructions']} (scheduled: {sched['scheduled']})")
            for gm in sched["gemms"]:
                print(f"    matmul {gm['name']} at {gm['at']} (group id {gm['group']}): "
                      f"{', '.join(gm['where']) or 'no call-start'}")
            for kern in r["kernels"][:12]:
                print(f"    {kern}")
    with open(os.environ.get("PROBE_OUT", "/tmp/stream_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
