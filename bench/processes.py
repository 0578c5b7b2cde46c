"""One process per GPU for the benchmarks: ``--processes N`` re-runs the script N times on
this machine under ``jax.distributed`` (rank i drives GPU i, every GPU visible, as CUDA IPC
between the processes needs), so the one-process-per-GPU path (IPC-mapped buffers, rows
through the staging areas) can be timed beside the single-process one."""

import argparse
import os
import socket
import subprocess
import sys

import jax


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--processes", type=int, default=0,
                    help="run as this many processes, one GPU each (jax.distributed)")
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)  # set for the children
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)


def start(args, script: str) -> None:
    """Parent: runs the children and exits with the worst code. Child: joins the job."""
    if args.processes and args.process_id is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *sys.argv[1:],
                                   "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"])
                 for i in range(args.processes)]
        sys.exit(max(p.wait() for p in procs))
    if args.process_id is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.processes, process_id=args.process_id,
                                   local_device_ids=[args.process_id])


def tag(args) -> str:
    """Suffix of the result's device name."""
    return f"-{args.processes}proc" if args.processes else ""
