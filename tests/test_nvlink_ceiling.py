"""bench/nvlink_ceiling.cu builds (where nvcc is), and bench/normal.py reads its output
the way bench/NOTES.md describes: the best rate at the bench's SM count, the local-copy
(dispatch-like) push rate only at 2 ranks, pulls from plain runs only."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import normal  # noqa: E402  (bench/normal.py)


def _run(tmp_path, name, local_copy, rows, gpus=2, one_way=False):
    path = tmp_path / name
    path.write_text(json.dumps({
        "gpus": gpus, "one_way": one_way, "local_copy": local_copy, "row_bytes": 14336,
        "mb_per_peer": 128, "reps": 10,
        "results": [{"method": m, "sms": sms, "warps_per_sm": w, "us": 1.0,
                     "gb_per_s_per_gpu": gbs} for m, sms, w, gbs in rows]}))
    return str(path)


def test_normal_reads_the_ceiling(tmp_path):
    plain = _run(tmp_path, "lc0.json", False, [
        ("store", 24, 8, 330.0), ("store", 24, 16, 343.0), ("tma", 24, 2, 344.0),
        ("store", 48, 16, 355.0), ("pull", 24, 16, 329.0), ("ce", 0, 0, 387.0)])
    local = _run(tmp_path, "lc1.json", True, [
        ("tma_chunked", 24, 16, 302.0), ("store", 24, 16, 300.0), ("pull", 24, 16, 999.0)])
    one_way = _run(tmp_path, "ow.json", False, [("store", 24, 16, 999.0)], one_way=True)
    paths = ",".join([plain, local, one_way])
    # 2 ranks: dispatch's mix (one local copy per remote row) sets the push rate
    assert normal.nvlink_ceiling(paths, 24, 2) == {"push": 302.0, "pull": 329.0}
    # more ranks: a smaller local share, so the plain push rate (an upper bound) stays
    assert normal.nvlink_ceiling(paths, 24, 4) == {"push": 344.0, "pull": 329.0}
    assert normal.nvlink_ceiling(paths, 48, 4) == {"push": 355.0}
    assert normal.nvlink_ceiling(paths, 16, 4) == {}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_nvlink_ceiling_compiles(tmp_path):
    out = tmp_path / "nvlink_ceiling"
    proc = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-I", ROOT,
         os.path.join(ROOT, "bench", "nvlink_ceiling.cu"), "-o", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
