"""MoE dispatch -> experts -> combine with one process per device (jax.distributed).

This is how jax_ep runs on a cluster: one process per GPU, the same program everywhere. The
devices form a (data, ep) mesh: --data N splits the job into N data-parallel rows, each an
EP group of num_processes / N consecutive processes holding all experts (--data 1, the
default: one EP group over the whole job). Tokens are sharded over both axes; dispatch and
combine run inside each EP group. Every process checks its output against jax_ep's
reference backend and against NumPy, and prints one line.

On one machine (starts the processes itself; GPUs if present, else one CPU device each):
    python examples/multiprocess_dispatch.py --num-processes 4
    python examples/multiprocess_dispatch.py --num-processes 4 --data 2 --backend reference

As one rank of a job you launch yourself (SLURM: one task per GPU, every task sees all GPUs
of its node, hence no --gpus-per-task; single quotes, so that each task expands its own
variables):
    export COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12345
    srun --ntasks-per-node=8 --gpus-per-node=8 --gpu-bind=none bash -c 'python \\
        examples/multiprocess_dispatch.py --coordinator $COORDINATOR \\
        --num-processes $SLURM_NTASKS --process-id $SLURM_PROCID \\
        --local-device $SLURM_LOCALID --data $SLURM_NNODES'

The EP axis may span nodes (the internode path: NVSHMEM between nodes, NVLink inside them;
one process per GPU), and so may the data axis. On one machine, --node-size N cuts each EP
group into logical nodes of N ranks (JAX_EP_NODE_SIZE), so the internode path runs there
too (its "RDMA" hop over P2P), and combine sums node by node on every backend:
    python examples/multiprocess_dispatch.py --num-processes 4 --node-size 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(argv: list, num_processes: int, platform: str) -> int:
    """Starts num_processes copies of this script on this machine; returns the worst exit code."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if platform == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    else:  # every process sees all GPUs (CUDA IPC needs that) and preallocates less
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(round(0.9 / num_processes, 2)))
    # The user's options first; the options that make each copy one rank come last (the
    # last occurrence of an option wins).
    procs = [subprocess.Popen([sys.executable, __file__, *argv,
                               "--coordinator", f"127.0.0.1:{port}",
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

    me, devices = jax.process_index(), jax.devices()  # devices in process order
    if len(devices) % args.data:
        sys.exit(f"--data {args.data} does not divide the {len(devices)} devices of the job")
    D, EP = args.data, len(devices) // args.data
    T, H, K, E = args.tokens, args.hidden, args.top_k, args.experts_per_rank * EP
    # Row d of the mesh is EP group d: consecutive devices, so consecutive processes (with
    # srun's block placement: the GPUs of one node when EP divides the GPUs per node).
    mesh = Mesh(np.array(devices).reshape(D, EP), ("data", "ep"))
    if args.node_size:  # logical nodes: read when the Buffer is created
        from jax_ep import distributed
        os.environ[distributed.NODE_SIZE_ENV] = str(args.node_size)
    # Collective: every process creates its Buffers in the same order (and closes them).
    # One Buffer serves every EP group of the mesh (one communication group per data row).
    try:
        buffer = jax_ep.Buffer(mesh, "ep", backend=args.backend)
    except RuntimeError as e:
        jax.distributed.shutdown()
        sys.exit(f"process {me}: {e}")

    # Each process makes only its own tokens; the global arrays are assembled from them.
    tokens = P(("data", "ep"))  # tokens sharded over both axes
    n_local = T * jax.local_device_count()
    rng = np.random.default_rng(me)
    x = rng.standard_normal((n_local, H)).astype(np.float32)
    idx = np.argsort(-rng.random((n_local, E)), axis=1)[:, :K].astype(np.int32)
    w = rng.random((n_local, K)).astype(np.float32)
    sharding = NamedSharding(mesh, tokens)
    glob = [jax.make_array_from_process_local_data(sharding, a) for a in (x, idx, w)]
    scale_np = np.linspace(0.5, 2.0, E, dtype=np.float32)  # expert e multiplies by scale[e]
    scale = jnp.asarray(scale_np)

    def moe(backend):
        def body(x, idx, w):
            r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", layout="expert",
                                buffer=buffer, backend=backend)
            local = jax.lax.axis_index("ep") * (E // EP)  # first expert of this rank
            e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + local, 0)
            y = r.recv_x * scale[e][:, None]
            return jax_ep.combine(y, r.handle, r.recv_topk_weights), r.num_recv_tokens[None]
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tokens,
                                     out_specs=(tokens, tokens)))

    def local(a):  # this process's rows of a global array, in order
        shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    out, rows = moe(buffer.backend)(*glob)
    ref, _ = moe("reference")(*glob)
    mine = local(out)
    err = float(np.max(np.abs(mine - local(ref))))
    want = x * (w * scale_np[idx]).sum(axis=1, keepdims=True)  # sum_k w_k * scale[e_k] * x
    err_np = float(np.max(np.abs(mine - want)))
    row, rank = divmod(devices.index(jax.local_devices()[0]), EP)
    line = (f"process {me}/{jax.process_count()} (data row {row}/{D}, ep rank {rank}/{EP}) "
            f"on {jax.local_devices()[0]}: backend={buffer.backend}, "
            f"received {int(local(rows).sum())} rows, "
            f"max |jax_ep - reference| = {err:.2e}, max |jax_ep - numpy| = {err_np:.2e}, "
            f"{EP // buffer.node_size} node(s) of {buffer.node_size}\n")
    os.write(1, line.encode())  # one write: lines of concurrent processes do not interleave
    buffer.close()
    jax.distributed.shutdown()
    if err > 1e-5 or err_np > 1e-4:
        sys.exit(f"process {me}: result differs from the reference by {err}, "
                 f"from NumPy by {err_np}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-processes", type=int, default=2, help="processes in the job")
    ap.add_argument("--process-id", type=int, help="this rank (omit to start all on this host)")
    ap.add_argument("--coordinator", help="host:port of process 0")
    ap.add_argument("--local-device", type=int, default=0,
                    help="GPU index of this process on its node (SLURM_LOCALID)")
    ap.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto",
                    help="auto: gpu when nvidia-smi lists GPUs")
    ap.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto",
                    help="jax_ep backend: auto (CUDA kernels where built and on GPUs), "
                         "reference (pure JAX, any platform), cuda (the kernels, or fail)")
    ap.add_argument("--data", type=int, default=1,
                    help="data-parallel rows of the (data, ep) mesh; each row is one EP "
                         "group of num_processes/data processes (default 1)")
    ap.add_argument("--node-size", type=int, default=0,
                    help="ranks per logical node (JAX_EP_NODE_SIZE; default: the hosts): "
                         "less than the EP size makes the EP axis span nodes")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per device")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--experts-per-rank", type=int, default=4)
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    args = ap.parse_args(argv)
    if args.data < 1 or args.num_processes % args.data:
        ap.error(f"--data {args.data} must divide --num-processes {args.num_processes}")
    ep = args.num_processes // args.data
    if args.node_size < 0 or (args.node_size and ep % args.node_size):
        ap.error(f"--node-size {args.node_size} must divide the EP size {ep} "
                 "(--num-processes / --data)")
    if args.platform == "auto":
        import shutil
        args.platform = "gpu" if shutil.which("nvidia-smi") and \
            subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 else "cpu"
    if args.backend == "cuda" and args.platform == "cpu":
        ap.error("--backend cuda needs GPUs (--platform gpu); use --backend reference on CPU")
    if args.process_id is None:
        sys.exit(spawn(argv, args.num_processes, args.platform))
    if args.coordinator is None:
        ap.error("--coordinator is required with --process-id")
    run_rank(args)


if __name__ == "__main__":
    main()
