"""Several processes for the benchmarks: ``--processes N`` re-runs the script N times on
this machine under ``jax.distributed`` (rank i drives GPU i mod the GPU count, every GPU
visible, as CUDA IPC between the processes needs), so the one-process-per-GPU path
(IPC-mapped buffers, rows through the staging areas) can be timed beside the single-process
one. With more processes than GPUs the ranks share GPUs: such timings are fixed costs, never
NVLink figures (:func:`fixed_cost_reason`), and NCCL refuses the all_to_all baseline there."""

import argparse
import os
import socket
import subprocess
import sys
from typing import Optional

import jax

from tests.multiprocess import SAFE_ENV, visible_gpus  # the test launcher's placement rules


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--processes", type=int, default=0,
                    help="run as this many processes, GPUs round-robin (jax.distributed)")
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)  # set for the children
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, help=argparse.SUPPRESS)


def start(args, script: str) -> None:
    """Parent: runs the children and exits with the worst code. Child: joins the job."""
    if args.processes and args.process_id is None:
        gpus = max(1, visible_gpus())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, **SAFE_ENV}
        if args.processes > gpus:  # ranks share GPUs: no preallocation
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *sys.argv[1:],
                                   "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}",
                                   "--gpus", str(gpus)], env=env)
                 for i in range(args.processes)]
        sys.exit(max(p.wait() for p in procs))
    if args.process_id is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.processes, process_id=args.process_id,
                                   local_device_ids=[args.process_id % args.gpus])


def fixed_cost_reason(num_ranks: int, args) -> Optional[str]:
    """Why this run's timings are fixed costs and not exchange figures (None: they are)."""
    if num_ranks == 1:
        return "one rank: no exchange, every row is local"
    if args.processes and args.gpus and args.processes > args.gpus:
        return f"{args.processes} ranks share {args.gpus} GPU(s): not NVLink figures"
    return None


def device_name(num_ranks: int, kind: str, args) -> str:
    """``<GPUs>x<GPU name>[-<config>]`` of the result file."""
    kind = kind.replace(" ", "-")
    if not args.processes:
        return f"{num_ranks}x{kind}"
    if args.gpus and args.processes > args.gpus:
        return f"{args.gpus}x{kind}-{args.processes}ranks-shared"
    return f"{num_ranks}x{kind}-{args.processes}proc"
