"""examples/multiprocess_dispatch.py's multi-host options, on CPU: processes on loopback
joined by jax.distributed (gloo collectives), as a cluster launcher would start them.

The 2-D mode (--data) and --backend are run by the example's own launcher; the rank mode
(--coordinator/--process-id/--local-device, what an srun line passes) is run by starting
each rank here. The README's (data, ep) snippet runs in 4 processes the same way. Last, the
CMake configure step says what a build makes (README's install notes point at those lines).
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = "examples/multiprocess_dispatch.py"
LINE = re.compile(r"process (\d+)/(\d+) \(data row (\d+)/(\d+), ep rank (\d+)/(\d+)\) .*"
                  r"backend=(\w+), received (\d+) rows, max \|jax_ep - reference\| = "
                  r"([0-9.e+-]+), max \|jax_ep - numpy\| = ([0-9.e+-]+)")


def _outputs(procs, timeout=300):
    """Each process's output; every process is killed if one overruns ``timeout``."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, EXAMPLE, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _lines(out: str):
    return [m.groups() for m in map(LINE.search, out.splitlines()) if m]


def test_help_describes_the_options_and_starts_nothing():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--backend", "--data", "--coordinator", "--process-id", "--local-device",
                "srun"):
        assert opt in proc.stdout
    assert "process 0/" not in proc.stdout and "Gloo" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_data_by_ep_mesh_every_process_matches_reference_and_numpy(backend):
    proc = _run("--num-processes", "4", "--data", "2", "--backend", backend,
                "--platform", "cpu", "--tokens", "16", "--hidden", "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = _lines(proc.stdout)
    assert sorted(int(l[0]) for l in lines) == [0, 1, 2, 3], proc.stdout[-3000:]
    for p, n, row, rows, rank, ep, used, recv, err_ref, err_np in lines:
        assert (n, rows, ep) == ("4", "2", "2")
        assert (int(row), int(rank)) == divmod(int(p), 2)  # EP groups: consecutive processes
        assert used == "reference"  # CPU: auto picks the reference backend
        assert int(recv) > 0
        assert float(err_ref) <= 1e-5 and float(err_np) <= 1e-4


def test_logical_nodes_sum_node_by_node_and_match_reference_and_numpy():
    """--node-size 2: 4 ranks as 2 nodes of 2 (the internode path's topology; on CPU the
    reference backend, whose combine then sums node by node)."""
    proc = _run("--num-processes", "4", "--node-size", "2", "--backend", "reference",
                "--platform", "cpu", "--tokens", "16", "--hidden", "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = _lines(proc.stdout)
    assert sorted(int(l[0]) for l in lines) == [0, 1, 2, 3], proc.stdout[-3000:]
    assert proc.stdout.count("2 node(s) of 2") == 4
    for *_, recv, err_ref, err_np in lines:
        assert int(recv) > 0 and float(err_ref) <= 1e-5 and float(err_np) <= 1e-4
    bad = _run("--num-processes", "4", "--node-size", "3", "--platform", "cpu", timeout=60)
    assert bad.returncode != 0 and "--node-size 3 must divide the EP size 4" in bad.stderr


def test_ranks_started_one_by_one_as_a_launcher_would():
    """What an srun line runs: each rank given its id, the job size and the coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen(
        [sys.executable, EXAMPLE, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--local-device", str(i), "--platform", "cpu",
         "--backend", "reference", "--data", "2", "--tokens", "8", "--hidden", "16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = _outputs(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    lines = [l for o in outs for l in _lines(o)]
    # --data 2 over 2 processes: two EP groups of one rank each.
    assert sorted((l[0], l[2], l[4], l[5]) for l in lines) == [("0", "0", "0", "1"),
                                                               ("1", "1", "0", "1")]


def test_bad_options_fail_before_starting_processes():
    proc = _run("--num-processes", "3", "--data", "2", "--platform", "cpu", timeout=60)
    assert proc.returncode == 2 and "--data 2 must divide" in proc.stderr
    proc = _run("--backend", "cuda", "--platform", "cpu", timeout=60)
    assert proc.returncode == 2 and "--backend cuda needs GPUs" in proc.stderr


def _readme_multihost_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Multi-process and multi-host"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


CHECK = """
import numpy as _np
_shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
_mine = _np.concatenate([_np.asarray(s.data) for s in _shards])
_err = float(_np.max(_np.abs(_mine - 2 * x_local)))  # the weights sum to 1: out == 2 x
_row, _rank = divmod(jax.devices().index(jax.local_devices()[0]), EP)
print(f"README snippet: process {jax.process_index()} mesh {dict(mesh.shape)} "
      f"row {_row} rank {_rank} err {_err:.2e}", flush=True)
jax.distributed.shutdown()
"""


def test_readme_multihost_snippet_runs_on_a_data_by_ep_mesh():
    """The README's (data, ep) snippet, as 4 srun tasks on one host would run it (EP 2)."""
    script = ('import jax\njax.config.update("jax_cpu_collectives_implementation", "gloo")\n'
              + _readme_multihost_snippet() + CHECK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = 4
    procs = []
    for i in range(n):
        env = dict(_env(), JAX_PLATFORMS="cpu", COORDINATOR=f"127.0.0.1:{port}",
                   SLURM_NTASKS=str(n), SLURM_PROCID=str(i), SLURM_LOCALID="0", EP_SIZE="2",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = _outputs(procs)
    assert [p.returncode for p in procs] == [0] * n, "\n".join(o[-2000:] for o in outs)
    found = sorted(re.findall(r"README snippet: process (\d) mesh (\{.*?\}) row (\d) rank (\d) "
                              r"err ([0-9.e+-]+)", "".join(outs)))
    assert [(p, r, k) for p, _, r, k, _ in found] == [("0", "0", "0"), ("1", "0", "1"),
                                                      ("2", "1", "0"), ("3", "1", "1")], outs
    assert all(m == "{'data': 2, 'ep': 2}" for _, m, _, _, _ in found)
    assert all(float(e) <= 1e-5 for *_, e in found)


def _cmake_configure(tmp_path, *defines):
    import importlib.util
    import shutil

    if shutil.which("cmake") is None or importlib.util.find_spec("nanobind") is None:
        pytest.skip("needs cmake and nanobind in this environment (the build's requirements)")
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"),
                           f"-DPython_EXECUTABLE={sys.executable}", *defines],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [l.split("-- ", 1)[1] for l in proc.stdout.splitlines() if "-- jax_ep:" in l]


def test_cmake_says_what_a_cpu_only_build_makes(tmp_path):
    lines = _cmake_configure(tmp_path, "-DJAX_EP_CUDA=OFF")
    assert "jax_ep: JAX_EP_CUDA=OFF (AUTO, ON or OFF; set it in pip's environment)" in lines
    assert any(l.startswith("jax_ep: module jax_ep._jax_ep_ffi: CPU-only") for l in lines)
    assert "jax_ep: module jax_ep._jax_ep_nvshmem: not built (needs the CUDA build)" in lines


def test_cmake_says_what_a_cuda_build_makes(tmp_path):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the CUDA build is not configured here")
    lines = _cmake_configure(tmp_path, "-DJAX_EP_CUDA=ON", "-DJAX_EP_NVSHMEM=AUTO")
    assert any(l.startswith("jax_ep: CUDA compiler ") for l in lines), lines
    assert any("sm_90a only (Hopper: H100, H200)" in l for l in lines), lines
    assert any(l.startswith("jax_ep: module jax_ep._jax_ep_ffi: XLA FFI handlers with the "
                            "CUDA kernels") for l in lines), lines
    assert any(l.startswith("jax_ep: module jax_ep._jax_ep_nvshmem: ") for l in lines), lines
