"""Timing shared by the benchmarks: medians of whole jitted chains of calls."""

import statistics
import time

import jax


def timed(fn, args, reps):
    """Median wall time of ``fn(*args)`` over ``reps`` runs, after one warm-up run."""
    jax.block_until_ready(fn(*args))  # warm-up (compile, first touch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_call_us(make, args, n_short, n_long, reps):
    """Median time of one call in µs, from jits holding n_short and n_long calls
    (the difference cancels launch and dispatch overheads)."""
    ts = timed(make(n_short), args, reps)
    tl = timed(make(n_long), args, reps)
    return (tl - ts) / (n_long - n_short) * 1e6
