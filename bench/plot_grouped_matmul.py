"""Plot a bench/grouped_matmul.py result: per expert count, the forward and forward+backward
times (ms) and useful TFLOP/s (real rows only) of jax_ep.grouped_matmul, the dense
capacity-padded batched einsum and jax.lax.ragged_dot, on log scales (ragged_dot is
tens of times slower than the other two).

    python3 bench/plot_grouped_matmul.py bench/results/grouped_matmul-1xNVIDIA-H200.json \
        [--out PNG]   # default: the JSON's path with .png
"""

from __future__ import annotations

import argparse
import json
import os

IMPLS = (("jax_ep", "jax_ep.grouped_matmul", "tab:blue"),
         ("dense_capacity", "dense einsum, capacity-padded", "tab:orange"),
         ("ragged_dot", "jax.lax.ragged_dot", "tab:gray"))
STEPS = (("fwd", "fwd", ""), ("fwd_bwd", "fwd+bwd", "//"))


def _label(case) -> str:
    rows = case["rows"]
    text = f"E={case['experts']}\n{rows} rows (~{rows // case['experts']}/expert)"
    if "capacity_factor" in case:
        text += f"\ncap {case['capacity']} (cf {case['capacity_factor']:g})"
    if "jax_ep_tiles" in case:  # the kernel's tile configuration for this shape
        text += "\n" + case["jax_ep_tiles"].split(",")[0]
    return text


def _panel(ax, cases, metric: str, unit: str, fmt: str) -> None:
    n = len(IMPLS) * len(STEPS)
    width = 0.8 / n
    for i, (impl, name, color) in enumerate(IMPLS):
        for j, (step, step_name, hatch) in enumerate(STEPS):
            xs, ys = [], []
            for c, case in enumerate(cases):
                value = case.get(impl, {}).get(f"{step}_{metric}")
                if value:  # a failed measurement (an "error" entry) leaves a gap
                    xs.append(c - 0.4 + width * (i * len(STEPS) + j + 0.5))
                    ys.append(value)
            bars = ax.bar(xs, ys, width, color=color, hatch=hatch, edgecolor="black",
                          linewidth=0.4, label=f"{name} ({step_name})")
            ax.bar_label(bars, labels=[format(y, fmt) for y in ys], fontsize=6, rotation=90,
                         padding=2)
    ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([_label(c) for c in cases], fontsize=8)
    ax.margins(y=0.25)
    ax.grid(axis="y", which="both", alpha=0.3)


def plot(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    if not cases:
        raise ValueError("the result holds no cases")
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 4.5 * len(cases)), 5.5))
    _panel(left, cases, "ms", "time per call, ms (log)", ".2f")
    left.set_title("time (lower is better)", fontsize=10)
    _panel(right, cases, "useful_tflops", "useful TFLOP/s, real rows only (log)", ".0f")
    right.set_title("useful TFLOP/s (higher is better)", fontsize=10)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    first = cases[0]
    shape = f"H={first['hidden']}, F={first['ffn']}, bf16"
    fig.suptitle(f"grouped matmul on {result.get('num_gpus', 1)}x {result.get('device', '?')}, "
                 f"{shape}, jax {result.get('jax', '?')}\n{result.get('date', '?')}, "
                 f"commit {result.get('commit', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a bench/grouped_matmul.py result")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's, .png)")
    a = p.parse_args(argv)
    with open(a.json) as f:
        result = json.load(f)
    out = a.out or os.path.splitext(a.json)[0] + ".png"
    print(plot(result, out))
    return out


if __name__ == "__main__":
    main()
