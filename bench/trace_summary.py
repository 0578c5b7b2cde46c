"""Where the GPU time of a jitted call goes: run it under ``jax.profiler`` and summarise the
kernels each GPU ran (from the profile's xplane, parsed by ``jax.profiler.ProfileData``).

The benchmarks time whole chains of calls; this says whether a chain is bound by the GPU
(kernels back to back: busy ~ span) or by the host (gaps between kernels), how long each
kernel ran, and how far apart the GPUs started the same kernel (the skew a cross-GPU wait
absorbs). Usage from a benchmark::

    summary = trace_summary.profile(fn, args, out_dir, "ll_dispatch_x42", match="ll_")

``match`` picks the kernels whose per-call numbers are reported (substring of the name).
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import tempfile

import jax


def _gpu_planes(profile_data):
    return [p for p in profile_data.planes if p.name.startswith("/device:GPU")]


def _kernels(plane):
    """(name, start_ns, duration_ns) of every event on the plane's stream lines."""
    out = []
    for line in plane.lines:
        if not line.name.startswith("Stream"):
            continue
        for e in line.events:
            out.append((e.name, float(e.start_ns), float(e.duration_ns)))
    out.sort(key=lambda k: k[1])
    return out


CATEGORIES = (("jax_ep", ("jax_ep",)), ("nccl", ("nccl",)),
              ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma")),
              ("copy", ("memcpy", "memset", "copy")))


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "xla_fusion_or_other"


def _union(intervals):
    """Sorted disjoint [start, end) covering the given (start, duration) pairs."""
    out = []
    for s, d in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], s + d)
        else:
            out.append([s, s + d])
    return out


def concurrent_ns(a, b) -> float:
    """Time during which some interval of ``a`` and some of ``b`` run at once (both lists
    of (start, duration)): how much of one kind of kernel another kind overlapped."""
    ua, ub = _union(a), _union(b)
    total, j = 0.0, 0
    for s, e in ua:
        while j < len(ub) and ub[j][1] <= s:
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < e:
            total += min(e, ub[k][1]) - max(s, ub[k][0])
            k += 1
    return total


def _streams_by_category(plane):
    """{category: names of the stream lines that ran kernels of it}: whether the
    exchanges ran on a stream of their own."""
    out = {}
    for line in plane.lines:
        if line.name.startswith("Stream"):
            for e in line.events:
                out.setdefault(category(e.name), set()).add(line.name)
    return {c: sorted(v) for c, v in sorted(out.items())}


def _stream_of_kernel(plane):
    """{(name, start_ns): stream line name} of the plane's kernels."""
    return {(e.name, float(e.start_ns)): line.name for line in plane.lines
            if line.name.startswith("Stream") for e in line.events}


def summarize(xplane_path: str, match: str | None = None, top: int = 12,
              all_kernels: bool = False, gap_count: int = 12) -> dict:
    """Per GPU: span (first start to last end), busy (kernel time, overlaps merged), the
    kernels with the most total time; for kernels whose name contains ``match``: count,
    median duration, median start-to-start gap, and across GPUs the median start skew of
    the i-th such kernel. ``all_kernels``: also every kernel (name, start, duration in µs
    on the common clock)."""
    from jax.profiler import ProfileData  # jax >= 0.4.30

    data = ProfileData.from_file(xplane_path)
    gpus = {}
    matched_starts = []
    planes = {plane.name: plane for plane in _gpu_planes(data)}
    kernels = {name: _kernels(plane) for name, plane in planes.items()}  # parsed once
    for plane_name, ks in kernels.items():
        if not ks:
            continue
        span = max(s + d for _, s, d in ks) - ks[0][1]
        busy = sum(e - s for s, e in _union([(s, d) for _, s, d in ks]))
        by_name = {}
        for name, _, d in ks:
            by_name.setdefault(name, []).append(d)
        heavy = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        cats = {}
        for name, _, d in ks:
            cats[category(name)] = cats.get(category(name), 0.0) + d
        comm = [(s, d) for name, s, d in ks if category(name) == "jax_ep"]
        rest = [(s, d) for name, s, d in ks if category(name) != "jax_ep"]
        rec = dict(kernels=len(ks), span_us=round(span / 1e3, 1), busy_us=round(busy / 1e3, 1),
                   category_us={c: round(v / 1e3, 1) for c, v in sorted(cats.items())},
                   # jax_ep kernels running at the same time as other kernels (overlap)
                   jax_ep_concurrent_us=round(concurrent_ns(comm, rest) / 1e3, 1),
                   jax_ep_busy_us=round(sum(e - s for s, e in _union(comm)) / 1e3, 1),
                   streams=_streams_by_category(planes[plane_name]),
                   top=[dict(name=n[:120], count=len(v), total_us=round(sum(v) / 1e3, 1),
                             median_us=round(statistics.median(v) / 1e3, 2)) for n, v in heavy])
        if match:
            sel = [(s, d) for name, s, d in ks if match in name]
            if sel:
                starts = [s for s, _ in sel]
                gaps = [b - a for a, b in zip(starts, starts[1:])]
                rec["matched"] = dict(
                    count=len(sel), median_us=round(statistics.median(d for _, d in sel) / 1e3, 2),
                    median_start_gap_us=round(statistics.median(gaps) / 1e3, 2) if gaps else None)
                matched_starts.append(starts)
        gpus[plane_name] = rec
    # Communication kernels on a common clock (CUPTI puts every GPU on the host's): where
    # one GPU waits for another, its kernel starts early and runs long.
    t0 = min((ks[0][1] for ks in kernels.values() if ks), default=0.0)
    for plane_name, ks in kernels.items():
        if plane_name in gpus:
            gpus[plane_name]["comm_timeline"] = [
                (name[:60], round((s - t0) / 1e3, 1), round(d / 1e3, 1))
                for name, s, d in ks if category(name) in ("jax_ep", "nccl")][:64]
            if all_kernels:  # every kernel in order: maps a step's time to its ops
                stream = _stream_of_kernel(planes[plane_name])
                gpus[plane_name]["kernels_in_order"] = [
                    (name[:80], round((s - t0) / 1e3, 1), round(d / 1e3, 1),
                     stream.get((name, s), "?"))
                    for name, s, d in ks]
    summary = dict(gpus=gpus)
    # Where the GPUs sit idle (the longest gaps between kernels, with their neighbours)
    # and what the host was doing meanwhile (its longest events): a step that is slower
    # per call than its GPU span waits on the host somewhere.
    for plane_name, ks in kernels.items():
        if plane_name in gpus and len(ks) > 1:
            gaps = sorted(((b[1] - (a[1] + a[2]), a[0], b[0], a[1] + a[2])
                           for a, b in zip(ks, ks[1:])), reverse=True)[:gap_count]
            gpus[plane_name]["longest_gaps"] = [
                (round(g / 1e3, 1), round((at - t0) / 1e3, 1), before[:50], after[:50])
                for g, before, after, at in gaps]
    host = []
    for plane in data.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    if e.duration_ns >= 200e3:
                        host.append((round(e.duration_ns / 1e3, 1),
                                     round((e.start_ns - t0) / 1e3, 1), line.name[:30],
                                     e.name[:80]))
    summary["host_events_over_200us"] = sorted(host, reverse=True)[:40]
    if len(matched_starts) > 1:
        n = min(len(s) for s in matched_starts)
        skews = [max(s[i] for s in matched_starts) - min(s[i] for s in matched_starts)
                 for i in range(n)]
        summary["matched_start_skew_us"] = dict(median=round(statistics.median(skews) / 1e3, 2),
                                                max=round(max(skews) / 1e3, 2))
    return summary


def profile(fn, args, out_dir: str, label: str, match: str | None = None,
            all_kernels: bool = False, calls: int = 1) -> dict:
    """Runs ``fn(*args)`` once to warm up, ``calls`` times back to back under the
    profiler (one ``block_until_ready`` at the end); writes
    ``{out_dir}/profile_{label}.json`` and returns the summary (an ``error`` entry when
    the profile could not be taken or read)."""
    jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix=f"jax_ep_trace_{label}_")
    try:
        with jax.profiler.trace(trace_dir):
            out = None
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"no .xplane.pb under {trace_dir}")
        summary = summarize(paths[0], match, all_kernels=all_kernels)
    except Exception as err:  # a diagnostic: report, do not fail the benchmark
        summary = dict(error=f"{type(err).__name__}: {err}")
    summary["label"] = label
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_{label}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_summary(summary: dict) -> None:
    if "error" in summary:
        print(f"profile {summary['label']}: {summary['error']}")
        return
    print(f"profile {summary['label']}: skew {summary.get('matched_start_skew_us')}")
    for name, g in summary["gpus"].items():
        print(f"  {name}: {g['kernels']} kernels, span {g['span_us']} us, busy {g['busy_us']} us,"
              f" {g['category_us']}, matched {g.get('matched')}; jax_ep kernels "
              f"{g['jax_ep_busy_us']} us on {g['streams'].get('jax_ep')} (matmuls on "
              f"{g['streams'].get('matmul')}), "
              f"{g['jax_ep_concurrent_us']} us of it beside other kernels")
    first = next(iter(summary["gpus"].values()), None)
    if first:
        for k in first["top"][:8]:
            print(f"    {k['total_us']:>9.1f} us  x{k['count']:<4} {k['median_us']:>8.2f} us  "
                  f"{k['name'][:80]}")
