"""Which GPU stream a stream-annotated region runs on, under which XLA flags (a probe).

Profiles three jitted programs, each with an independent 8192^3 bf16 matmul beside a
region made by ``jax_ep.backends.cuda._stream.on_side_stream``: (a) the region holds a
second matmul, (b) the same with the region and the matmul in one XLA scheduling group
(``_scheduling_group_id``), (c) the region holds a ``jax_ep.dispatch`` on a
``Buffer(side_stream=True)``.
Prints, per XLA flag set (each in a fresh process), the stream of every kernel and how long
the region's kernels ran beside the other matmul.

Run (GPU)::

    PYTHONPATH=. python3 bench/stream_probe.py               # every flag set
    PYTHONPATH=. python3 bench/stream_probe.py lhs,default   # some of them
"""

from __future__ import annotations

import json
import os
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
}


def probe() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_summary

    import jax_ep
    from jax_ep.backends.cuda._stream import on_side_stream

    mesh = jax.make_mesh((1,), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep", side_stream=True)
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
        """The region and the matmul beside it in one XLA scheduling group: with the
        context-manager form of compute_on (jax 0.10.x) the region's call op keeps the
        group id; the function form drops it (``call_has_group`` says which happened)."""
        from jax.experimental import compute_on as co
        from jax.experimental.xla_metadata import set_xla_metadata

        with set_xla_metadata(_scheduling_group_id="1"):
            try:
                with co.compute_on("gpu_stream:1"):
                    inside = jax.jit(lambda c, d: c @ d)(c, d)
            except (TypeError, AttributeError):  # no context-manager form in this jax
                inside = on_side_stream(lambda c, d: c @ d)(c, d)
            return a @ b, inside

    def exchange(a, b, x, idx, w):
        sm = jax.shard_map(
            lambda x, idx, w: jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                              layout="expert", buffer=buf).recv_x,
            mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        return a @ b, sm(x, idx, w)

    out = {}
    for label, fn, args in (("dot_in_region", dots, (a, b, c, d)),
                            ("dot_in_region_scheduling_group", grouped_dots, (a, b, c, d)),
                            ("dispatch_in_region", exchange, (a, b, x, idx, w))):
        jitted = jax.jit(fn)
        try:
            stablehlo = jitted.lower(*args).as_text()
            call_has_group = any("_scheduling_group_id" in ln and "_xla_stream_annotation" in ln
                                 for ln in stablehlo.splitlines() if " call @" in ln)
            hlo = jitted.lower(*args).compile().as_text()
        except Exception as err:  # report it and go on with the other program
            out[label] = dict(error=f"{type(err).__name__}: {str(err)[:800]}")
            continue
        summary = trace_summary.profile(jitted, args, "/tmp/stream_probe", label,
                                        all_kernels=True)
        g = next(iter(summary.get("gpus", {}).values()), {})
        out[label] = dict(
            call_starts=hlo.count("call-start("), call_has_group=call_has_group,
            streams=g.get("streams"),
            jax_ep_concurrent_us=g.get("jax_ep_concurrent_us"),
            kernels=[(k_[0][:48], k_[1], k_[2], k_[3]) for k_ in g.get("kernels_in_order", [])],
            error=summary.get("error"))
    buf.close()
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(probe()))
        return 0
    results = {}
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(FLAG_SETS)
    for name in chosen:
        flags = FLAG_SETS[name]
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        run = subprocess.run([sys.executable, __file__, "--child"], env=env, text=True,
                             capture_output=True, timeout=240)
        line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        results[name] = (json.loads(line[0][7:]) if line else
                         dict(error=(run.stderr or run.stdout)[-1500:]))
        print(f"== {name} ({flags or 'no flags'})")
        for label, r in results[name].items() if line else [("error", results[name])]:
            if not isinstance(r, dict) or "kernels" not in r:
                print(f"  {label}: {r}")
                continue
            print(f"  {label}: call-start x{r['call_starts']} (group id on the call: "
                  f"{r['call_has_group']}), streams {r['streams']}, "
                  f"jax_ep beside others {r['jax_ep_concurrent_us']} us")
            for kern in r["kernels"][:12]:
                print(f"    {kern}")
    with open(os.environ.get("PROBE_OUT", "/tmp/stream_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
