"""bench/plot_grouped_matmul.py turns a bench/grouped_matmul.py result into a PNG: the
committed H200 result, and a result with a failed measurement and the tile field."""

import copy
import importlib.util
import json

from tests.multiprocess import ROOT

RESULT = ROOT / "bench" / "results" / "grouped_matmul-1xNVIDIA-H200.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plot_module():
    spec = importlib.util.spec_from_file_location(
        "bench_plot_grouped_matmul", ROOT / "bench" / "plot_grouped_matmul.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plots_the_committed_result(tmp_path):
    out = tmp_path / "gm.png"
    assert _plot_module().main([str(RESULT), "--out", str(out)]) == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_default_output_beside_the_json_and_a_failed_measurement_leaves_a_gap(tmp_path):
    result = json.loads(RESULT.read_text())
    case = copy.deepcopy(result["cases"][-1])
    case.update(experts=256, rows=32768, capacity=160,
                jax_ep_tiles="64x256x64 pingpong, cluster 1x2",
                ragged_dot={"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"})
    result["cases"].append(case)
    path = tmp_path / "grouped_matmul-1xTest.json"
    path.write_text(json.dumps(result))
    out = _plot_module().main([str(path)])
    assert out == str(tmp_path / "grouped_matmul-1xTest.png")
    assert (tmp_path / "grouped_matmul-1xTest.png").read_bytes().startswith(PNG_MAGIC)
