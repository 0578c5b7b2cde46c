"""The examples run as written: --help starts nothing, smoke runs exit 0, the training demo
writes its plot and runs under jax.distributed, the multi-process example starts its own
processes."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.multiprocess import _free_port, _watch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
# a small model: the smoke runs check the program, not the training
SMALL = ["--batch", "8", "--seq", "16", "--dim", "32", "--ffn", "32", "--shared-ffn", "0",
         "--devices", "4"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


_HELP = """import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("EXIT", code, "JAX_IMPORTED", "jax" in sys.modules)
"""


def test_every_example_is_covered():
    assert EXAMPLES == ["decode_moe.py", "dispatch_combine.py", "multiprocess_dispatch.py",
                        "stacked_moe.py", "train_moe.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_prints_usage_and_runs_nothing(name):
    proc = _run("-c", _HELP, f"examples/{name}", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    # jax is never imported: nothing was set up or run
    assert proc.stdout.strip().endswith("EXIT 0 JAX_IMPORTED False"), proc.stdout[-2000:]


def test_training_smoke_run_exits_0_and_writes_its_plot(tmp_path):
    png = tmp_path / "curve.png"
    proc = _run("examples/train_moe.py", "--steps", "3", *SMALL, "--plot", str(png))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout + proc.stderr
    assert re.search(r"^done: 3 steps \(a smoke run", proc.stdout, re.M), proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the demo says so and goes on
        assert "no plot: matplotlib is not installed" in proc.stdout
        return
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_smoke_run_exits_0():
    proc = _run("examples/decode_moe.py", "--train-steps", "2", "--new-tokens", "2",
                "--prompt-len", "4", "--batch", "4", "--devices", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy tokens match" in proc.stdout


def test_stacked_layers_scan_compile_once_and_restore_from_orbax(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    proc = _run("examples/stacked_moe.py", "--steps", "2", "--layers", "2", "--devices", "4",
                "--tokens", "64", "--checkpoint-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded P(None, 'ep')" in proc.stdout
    assert "train step compiled 1 time(s)" in proc.stdout
    assert "restored w_gate sharded P(None, 'ep'); outputs bitwise equal" in proc.stdout
    assert (tmp_path / "state").is_dir()


def _first_loss(out):
    m = re.search(r"^first loss ([0-9.]+)  last loss ([0-9.]+)", out, re.M)
    assert m, out[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_training_under_jax_distributed_two_processes_on_loopback():
    """One CPU process per device joined by --coordinator (gloo collectives), as a cluster
    launcher would start them; the losses are those of one process driving 2 devices."""
    args = ["examples/train_moe.py", "--steps", "3", "--batch", "4", "--seq", "16", "--dim",
            "32", "--ffn", "32", "--shared-ffn", "0", "--plot", ""]
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    why = _watch(procs, timeout=300, grace=None)
    outs = [p.stdout.read() for p in procs]
    for p in procs:
        p.stdout.close()
    assert not why and all(p.returncode == 0 for p in procs), why + "\n".join(
        o[-3000:] for o in outs)
    assert "devices: 2 x cpu (cpu, 2 processes)" in outs[0], outs[0]
    assert "done: 3 steps" in outs[0]
    assert "first loss" not in outs[1]  # process 0 reports for the job
    single = _run(*args, "--devices", "2")
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    assert _first_loss(outs[0]) == pytest.approx(_first_loss(single.stdout), abs=2e-4)


def test_multiprocess_example_matches_the_reference_in_every_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    proc = subprocess.run(
        [sys.executable, "examples/multiprocess_dispatch.py", "--num-processes", "3",
         "--platform", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"process (\d)/3 .* max \|jax_ep - reference\| = ([0-9.e+-]+)", proc.stdout)
    assert sorted(int(p) for p, _ in lines) == [0, 1, 2], proc.stdout[-3000:]
    assert all(float(e) <= 1e-5 for _, e in lines)
