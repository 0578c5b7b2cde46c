"""MoE dispatch -> experts -> combine with one process per device (jax.distributed).

This is how jax_ep runs on a cluster: one process per GPU, the same program everywhere, the
EP axis over every device of the job. The example checks the result against jax_ep's
reference backend and prints one line per process.

On one machine (starts the processes itself; GPUs if present, else one CPU device each):
    python examples/multiprocess_dispatch.py --num-processes 4

As one rank of a job you launch yourself (e.g. SLURM with one task per GPU):
    python examples/multiprocess_dispatch.py --coordinator host0:12345 \\
        --num-processes $SLURM_NTASKS --process-id $SLURM_PROCID --local-device $SLURM_LOCALID
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(num_processes: int, platform: str) -> int:
    """Starts num_processes copies of this script on this machine; returns the worst exit code."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if platform == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    else:  # every process sees all GPUs (CUDA IPC needs that) and preallocates less
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(round(0.9 / num_processes, 2)))
    procs = [subprocess.Popen([sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(num_processes), "--process-id", str(i),
                               "--local-device", str(i), "--platform", platform], env=env)
             for i in range(num_processes)]
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=600))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(124)
    return max(codes)


def run_rank(args) -> None:
    import jax

    if args.platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               local_device_ids=[args.local_device] if args.platform == "gpu"
                               else None)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_ep

    R, me = jax.process_count(), jax.process_index()
    T, H, K, E = args.tokens, args.hidden, args.top_k, args.experts_per_rank * jax.process_count()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    # Collective: every process creates its Buffers in the same order (and closes them).
    buffer = jax_ep.Buffer(mesh, "ep")

    # Each process makes only its own tokens; the global arrays are assembled from them.
    rng = np.random.default_rng(me)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.argsort(-rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    sharding = NamedSharding(mesh, P("ep"))
    glob = [jax.make_array_from_process_local_data(sharding, a) for a in (x, idx, w)]
    scale = jnp.linspace(0.5, 2.0, E)  # expert e multiplies its rows by scale[e]

    def moe(backend):
        def body(x, idx, w):
            r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout="expert",
                                buffer=buffer, backend=backend)
            local = jax.lax.axis_index("ep") * (E // R)
            e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + local, 0)
            y = r.recv_x * scale[e][:, None]
            return jax_ep.combine(y, r.handle, r.recv_topk_weights), r.num_recv_tokens[None]
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"),
                                     out_specs=(P("ep"), P("ep"))))

    out, rows = moe(buffer.backend)(*glob)
    ref, _ = moe("reference")(*glob)
    mine = np.asarray(out.addressable_shards[0].data)
    want = np.asarray(ref.addressable_shards[0].data)
    err = float(np.max(np.abs(mine - want)))
    line = (f"process {me}/{R} on {jax.local_devices()[0]}: backend={buffer.backend}, "
            f"received {int(np.asarray(rows.addressable_shards[0].data)[0])} rows, "
            f"max |jax_ep - reference| = {err:.2e}\n")
    os.write(1, line.encode())  # one write: lines of concurrent processes do not interleave
    buffer.close()
    jax.distributed.shutdown()
    if err > 1e-5:
        sys.exit(f"process {me}: result differs from the reference by {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--process-id", type=int, help="this rank (omit to start all on this host)")
    ap.add_argument("--coordinator", help="host:port of process 0")
    ap.add_argument("--local-device", type=int, default=0, help="GPU index of this process")
    ap.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--experts-per-rank", type=int, default=4)
    args = ap.parse_args()
    if args.platform == "auto":
        import shutil
        args.platform = "gpu" if shutil.which("nvidia-smi") and \
            subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 else "cpu"
    if args.process_id is None:
        sys.exit(spawn(args.num_processes, args.platform))
    if args.coordinator is None:
        ap.error("--coordinator is required with --process-id")
    run_rank(args)


if __name__ == "__main__":
    main()
