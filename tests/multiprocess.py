"""Starts EP ranks as processes on this host: whole pytest sessions, or one test body.

Ranks go to the visible GPUs round-robin, so there may be more ranks than GPUs: ranks that
share a GPU reach each other through the one-process-per-GPU path (CUDA IPC), run on it
concurrently under a CUDA MPS control daemon started for the run and stopped after, where
one can be started (else, or with ``--no-mps``, they take turns by time slicing), and split
the GPU's SMs (``JAX_EP_TEST_RANKS_PER_GPU``, read by tests/harness.py) and its memory (no XLA
preallocation). The placement is printed.

Command line: one pytest per rank, for each EP size asked for (1 = this process alone,
driving every local GPU)::

    python -m tests.multiprocess --ranks 1,2,4,8 -- -m gpu tests/gpu -q

Each rank's pytest runs with ``--distributed`` (tests/conftest.py): every rank runs the same
tests in the same order; rank 0's output is shown, the others' go to ``--logs``. The run
fails if any rank fails. A rank that dies makes the others stop within ``GRACE_S``.

From a test: ``launch("tests.mp_bodies:dispatch_combine", 4)`` runs one function in N
processes under ``jax.distributed`` and returns each rank's JSON-able result, or raises
:class:`RankFailure` with each failed rank's output (a hung rank fails at ``timeout``;
one rank's failure stops the others at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_TAG = "JAX_EP_RESULT:"
GRACE_S = 60.0  # after one rank of a pytest job exits, how long the others may go on
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}  # never NVLink multicast


class RankFailure(AssertionError):
    """One or more ranks failed; the message holds each failed rank's output."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """GPUs this host shows (``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([g for g in listed.split(",") if g.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len([l for l in out.stdout.splitlines() if l.startswith("GPU ")])


def rank_env(rank: int, num_ranks: int, port: int, platform: str, num_gpus: int,
             mps_env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of rank ``rank``: the job, its GPU (round-robin), its share of the GPU."""
    env = {**os.environ, **SAFE_ENV}
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_EP_TEST_NUM_PROCESSES": str(num_ranks),
        "JAX_EP_TEST_PROCESS_ID": str(rank),
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("JAX_EP_REAL_DEVICES", None)
        return env
    per_gpu = -(-num_ranks // num_gpus)
    env.update({"JAX_EP_REAL_DEVICES": "1", "JAX_LOCAL_DEVICE_IDS": str(rank % num_gpus),
                "JAX_EP_TEST_RANKS_PER_GPU": str(per_gpu)})
    env.pop("JAX_PLATFORMS", None)
    if per_gpu > 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    else:  # the launching process may hold most of the GPU already
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.15")
    if mps_env:  # no CUDA_MPS_ACTIVE_THREAD_PERCENTAGE: a percentage could leave a rank fewer
        env.update(mps_env)  # SMs than its kernels' co-resident grid; num_sms splits the GPU
    return env


@contextlib.contextmanager
def mps_daemon(wanted: bool):
    """Runs a CUDA MPS control daemon for the block when ``wanted`` and possible; yields
    the environment its clients need (None: no MPS, the ranks are time-sliced)."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not wanted or control is None:
        yield None
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="jax_ep_mps_"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        os.makedirs(d, exist_ok=True)
    started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True,
                             text=True)
    if started.returncode != 0:
        print(f"tests.multiprocess: CUDA MPS did not start (exit {started.returncode}: "
              f"{started.stderr.strip()}); ranks sharing a GPU are time-sliced", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        yield None
        return
    try:
        yield env
    finally:
        subprocess.run([control], input="quit\n", env={**os.environ, **env}, text=True,
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def placement(num_ranks: int, platform: str, num_gpus: int, mps: bool) -> str:
    if platform == "cpu":
        return f"{num_ranks} ranks as processes on the CPU"
    per_gpu = -(-num_ranks // num_gpus)
    how = ("one GPU per rank" if per_gpu == 1 else
           f"up to {per_gpu} ranks per GPU, " + ("concurrent under CUDA MPS" if mps else
                                                 "time-sliced (no CUDA MPS)"))
    return f"{num_ranks} ranks on {num_gpus} GPU(s) round-robin: {how}"


def _watch(procs, timeout: float, grace: Optional[float]) -> str:
    """Waits for every process; returns why it stopped them early ("" if it did not).
    ``grace=None``: one failure stops the others at once; else the others get ``grace``
    seconds after the first exit of any kind."""
    deadline = time.monotonic() + timeout
    first_exit = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        codes = [p.poll() for p in procs]
        if first_exit is None and any(c is not None for c in codes):
            first_exit = now
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        why = ""
        if now > deadline:
            why = "timed out"
        elif grace is None and failed:
            why = f"rank {failed[0]} failed"
        elif grace is not None and first_exit is not None and now - first_exit > grace:
            why = f"still running {grace:.0f} s after another rank exited"
        if why:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return why
        time.sleep(0.05)
    return ""


# ----------------------------------------------------------------------------- test bodies

def launch(body: str, num_processes: int, *, timeout: float = 240.0,
           platform: str = "cpu", env: Optional[Dict[str, str]] = None,
           args: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Runs ``body`` ("module:function") in ``num_processes`` processes; returns their results."""
    port = _free_port()
    gpus = max(1, visible_gpus()) if platform == "gpu" else 0
    procs = []
    for rank in range(num_processes):
        child_env = rank_env(rank, num_processes, port, platform, gpus)
        child_env.update(env or {})
        child_env.update({"JAX_EP_MP_BODY": body, "JAX_EP_MP_ARGS": json.dumps(args or {})})
        if platform == "cpu":
            child_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess"], env=child_env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    why = _watch(procs, timeout, grace=None)
    results, errors = [], []
    for rank, p in enumerate(procs):
        out = p.stdout.read() if p.stdout else ""
        p.wait()
        lines = [l for l in out.splitlines() if l.startswith(RESULT_TAG)]
        if p.returncode == 0 and lines:
            results.append(json.loads(lines[-1][len(RESULT_TAG):]))
        else:
            status = ("timed out" if why == "timed out" and p.returncode in (-9, None) else
                      "killed after another rank failed" if why and p.returncode == -9
                      else f"exit code {p.returncode}")
            errors.append(f"--- rank {rank} ({status}) ---\n{out[-3000:]}")
    if errors:
        raise RankFailure(f"{len(errors)} of {num_processes} ranks failed running {body}:\n" +
                          "\n".join(errors))
    return results


def _child() -> None:
    """Entry point of each process started by :func:`launch`."""
    import importlib

    import jax

    if os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(num_processes=int(os.environ["JAX_EP_TEST_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_EP_TEST_PROCESS_ID"]),
                               local_device_ids=[int(ids)] if ids else None,
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


# ----------------------------------------------------------------------------- pytest jobs

_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|error|errors|skipped|deselected)\b.*)$")


def _summary(text: str) -> str:
    lines = [m.group(1).strip(" =") for m in map(_SUMMARY.match, text.splitlines()) if m]
    return lines[-1] if lines else "(no pytest summary line)"


def run_pytest_job(num_ranks: int, pytest_args: List[str], *, platform: str, num_gpus: int,
                   mps_env: Optional[Dict[str, str]], logs: pathlib.Path,
                   timeout: float) -> int:
    """One pytest per rank (``num_ranks == 1``: one plain pytest); returns the exit code."""
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    if num_ranks == 1:
        env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(ROOT)}
        if platform == "gpu":
            env["JAX_EP_REAL_DEVICES"] = "1"
        proc = subprocess.Popen(base + pytest_args, env=env, cwd=ROOT)
        if _watch([proc], timeout, grace=None):
            print(f"tests.multiprocess: 1 process stopped: timed out after {timeout:.0f} s",
                  flush=True)
            return 1
        return proc.returncode
    port = _free_port()
    seed = os.environ.get("JAX_EP_TEST_SEED", str(time.time_ns() % (1 << 31)))
    print(f"tests.multiprocess: JAX_EP_TEST_SEED={seed}", flush=True)
    procs, files = [], []
    for rank in range(num_ranks):
        env = rank_env(rank, num_ranks, port, platform, num_gpus, mps_env)
        env["JAX_EP_TEST_SEED"] = seed  # every rank builds the same inputs
        out = None if rank == 0 else open(logs / f"ranks{num_ranks}-rank{rank}.log", "w")
        files.append(out)
        procs.append(subprocess.Popen(base + ["--distributed"] + pytest_args, env=env,
                                      cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    why = _watch(procs, timeout, grace=GRACE_S)
    for f in files:
        if f is not None:
            f.close()
    codes = [p.returncode for p in procs]
    for rank in range(1, num_ranks):
        text = (logs / f"ranks{num_ranks}-rank{rank}.log").read_text(errors="replace")
        print(f"tests.multiprocess: rank {rank} of {num_ranks}: exit {codes[rank]}: "
              f"{_summary(text)}", flush=True)
        if codes[rank] not in (0, 5) and codes[0] in (0, 5):  # its failures are not on screen
            print("\n".join(text.splitlines()[-60:]), flush=True)
    if why:
        print(f"tests.multiprocess: {num_ranks} ranks stopped: {why}", flush=True)
        return 1
    bad = [c for c in codes if c not in (0, 5)]
    return bad[0] if bad else codes[0]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.multiprocess",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8",
                        help="EP sizes to run, comma-separated (1: one process)")
    parser.add_argument("--platform", choices=("gpu", "cpu"), default=None,
                        help="default: gpu when this host shows GPUs")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to place ranks on")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True,
                        help="ranks that share a GPU run concurrently under a CUDA MPS daemon "
                             "started for the run, where one can be started (default); "
                             "--no-mps: they take turns by time slicing (several times slower)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per EP size")
    parser.add_argument("--logs", default=None, help="folder for the other ranks' output")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --: the pytest arguments")
    a = parser.parse_args(argv)
    pytest_args = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    gpus = a.gpus if a.gpus is not None else visible_gpus()
    platform = a.platform or ("gpu" if gpus else "cpu")
    if platform == "gpu" and gpus < 1:
        parser.error("--platform gpu: no GPU visible")
    logs = pathlib.Path(a.logs or tempfile.mkdtemp(prefix="jax_ep_rank_logs_"))
    logs.mkdir(parents=True, exist_ok=True)
    sizes = [int(r) for r in a.ranks.split(",") if r.strip()]
    shares = platform == "gpu" and any(r > gpus for r in sizes)
    results = []
    with mps_daemon(shares and a.mps) as mps_env:
        for r in sizes:
            where = ("1 process driving every local device" if r == 1 else
                     placement(r, platform, gpus, mps_env is not None and r > gpus))
            print(f"\ntests.multiprocess: EP size {r}: {where}; other ranks' logs in {logs}",
                  flush=True)
            t0 = time.monotonic()
            code = run_pytest_job(r, pytest_args, platform=platform, num_gpus=gpus,
                                  mps_env=mps_env if r > gpus else None, logs=logs,
                                  timeout=a.timeout)
            results.append((r, code, time.monotonic() - t0))
    print("\ntests.multiprocess: " + "; ".join(
        f"EP {r}: {'ok' if c in (0, 5) else f'FAILED (exit {c})'} in {s:.0f} s"
        for r, c, s in results), flush=True)
    bad = [c for _, c, _ in results if c not in (0, 5)]
    return bad[0] if bad else 0


if __name__ == "__main__":
    if "JAX_EP_MP_BODY" in os.environ:
        _child()
    else:
        sys.exit(main())
