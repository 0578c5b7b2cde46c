"""Runs a test body in N processes under ``jax.distributed`` (one rank each) on this host.

``launch("tests.mp_bodies:dispatch_roundtrip", num_processes=4)`` starts N Python
processes that each call ``jax.distributed.initialize`` over loopback, run the
body, and print its JSON-able result. With ``platform="gpu"`` rank i drives GPU i
(``local_device_ids=[i]``; every process sees all GPUs, as CUDA IPC between them needs),
and XLA preallocates 15% of that GPU (``XLA_PYTHON_CLIENT_MEM_FRACTION``; the pytest
process itself may hold most of the memory already). The launcher returns every rank's result,
or fails with each failing rank's traceback; a rank that hangs fails the test
at ``timeout`` instead of hanging the run, and one rank's failure stops the
others at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_TAG = "JAX_EP_RESULT:"


class RankFailure(AssertionError):
    """One or more ranks failed; the message holds each failed rank's output."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(body: str, num_processes: int, *, timeout: float = 240.0,
           platform: str = "cpu", env: Optional[Dict[str, str]] = None,
           args: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Runs ``body`` ("module:function") in ``num_processes`` processes; returns their results."""
    port = _free_port()
    procs = []
    for rank in range(num_processes):
        child_env = {**os.environ, **(env or {})}
        child_env.update({
            "JAX_EP_MP_COORDINATOR": f"127.0.0.1:{port}",
            "JAX_EP_MP_NUM_PROCESSES": str(num_processes),
            "JAX_EP_MP_RANK": str(rank),
            "JAX_EP_MP_BODY": body,
            "JAX_EP_MP_ARGS": json.dumps(args or {}),
            "JAX_EP_MP_PLATFORM": platform,
            "PYTHONPATH": os.pathsep.join([str(ROOT), child_env.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        })
        if platform == "cpu":
            child_env["JAX_PLATFORMS"] = "cpu"
            child_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        else:  # one GPU per process; every process sees all GPUs (CUDA IPC needs that)
            child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.15")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess"], env=child_env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    deadline = time.monotonic() + timeout
    failed_early = None
    while any(p.poll() is None for p in procs):
        bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad and failed_early is None:
            failed_early = bad  # a dead rank would leave the others waiting in a collective
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    timed_out = time.monotonic() > deadline

    results, errors = [], []
    for rank, p in enumerate(procs):
        out = p.stdout.read() if p.stdout else ""
        p.wait()
        lines = [l for l in out.splitlines() if l.startswith(RESULT_TAG)]
        if p.returncode == 0 and lines:
            results.append(json.loads(lines[-1][len(RESULT_TAG):]))
        else:
            why = ("timed out" if timed_out and p.returncode in (-9, None) else
                   "killed after another rank failed" if failed_early and rank not in failed_early
                   else f"exit code {p.returncode}")
            errors.append(f"--- rank {rank} ({why}) ---\n{out[-3000:]}")
    if errors:
        raise RankFailure(f"{len(errors)} of {num_processes} ranks failed running {body}:\n" +
                          "\n".join(errors))
    return results


def _child() -> None:
    """Entry point of each spawned rank."""
    import importlib

    import jax

    if os.environ["JAX_EP_MP_PLATFORM"] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    rank = int(os.environ["JAX_EP_MP_RANK"])
    gpu = os.environ["JAX_EP_MP_PLATFORM"] == "gpu"
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_EP_MP_COORDINATOR"],
        num_processes=int(os.environ["JAX_EP_MP_NUM_PROCESSES"]),
        process_id=rank,
        local_device_ids=[rank] if gpu else None,
        initialization_timeout=60)
    module, func = os.environ["JAX_EP_MP_BODY"].split(":")
    try:
        result = getattr(importlib.import_module(module), func)(
            **json.loads(os.environ["JAX_EP_MP_ARGS"]))
    except BaseException:
        # Exit at once: the normal exit runs jax.distributed's shutdown barrier, which
        # waits minutes for the other ranks; the launcher must see this failure now.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    print(RESULT_TAG + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _child()
