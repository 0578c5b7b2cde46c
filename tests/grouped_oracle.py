"""NumPy oracle of jax_ep.grouped_matmul and the random cases its tests share."""

from __future__ import annotations

import numpy as np


def grouped_matmul(x, w, sizes):
    """out[r] = x[r] @ w[g] over each group's rows (float64); rows past the groups: 0."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    o = 0
    for g, m in enumerate(np.asarray(sizes)):
        out[o:o + m] = x[o:o + m] @ w[g]
        o += m
    return out


def grads(x, w, sizes, dy):
    """(dx, dw) of sum(grouped_matmul(x, w, sizes) * dy)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    dy = np.asarray(dy, np.float64)
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    o = 0
    for g, m in enumerate(np.asarray(sizes)):
        dx[o:o + m] = dy[o:o + m] @ w[g].T
        dw[g] = x[o:o + m].T @ dy[o:o + m]
        o += m
    return dx, dw


def sizes_for(rng, case: str, G: int, M: int) -> np.ndarray:
    """Group sizes of one test case, summing to at most M."""
    if case == "random":  # uneven, some groups empty, a few rows left at the end
        p = rng.dirichlet(np.ones(G) * 0.7)
        s = np.floor(p * (M - 5)).astype(np.int64)
        s[rng.random(G) < 0.2] = 0
        return s.astype(np.int32)
    if case == "one_group":  # every row in the last group
        s = np.zeros(G, np.int32)
        s[-1] = M
        return s
    if case == "all_empty":
        return np.zeros(G, np.int32)
    if case == "aligned":  # expert_alignment=128 padding: sizes multiples of 128
        s = (rng.integers(0, max(1, M // (128 * G)) + 1, G) * 128).astype(np.int32)
        while s.sum() > M:
            s[np.argmax(s)] -= 128
        return s
    raise ValueError(case)


def close(got, want, what: str, rel: float = 1e-2) -> None:
    """BF16 results of float32 accumulation: within ``rel`` of the result's scale."""
    got = np.asarray(got, np.float64)
    scale = max(float(np.sqrt(np.mean(want ** 2))) if want.size else 0.0, 1e-6)
    err = np.abs(got - want)
    bad = err > rel * np.abs(want) + rel * scale
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values off, first at {i}: "
                             f"got {got[i]}, want {want[i]} (scale {scale:.3g})")
