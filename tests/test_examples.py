"""The multi-process example runs as written (it starts its own processes)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_multiprocess_example_matches_the_reference_in_every_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    proc = subprocess.run(
        [sys.executable, "examples/multiprocess_dispatch.py", "--num-processes", "3",
         "--platform", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"process (\d)/3 .* max \|jax_ep - reference\| = ([0-9.e+-]+)", proc.stdout)
    assert sorted(int(p) for p, _ in lines) == [0, 1, 2], proc.stdout[-3000:]
    assert all(float(e) <= 1e-5 for _, e in lines)
