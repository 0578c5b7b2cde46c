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
    """Time of one call in µs, from jits holding n_short and n_long calls (the difference
    cancels launch and dispatch overheads): the two run alternately, and the result is the
    median of the ``reps`` paired differences, so that a drift of the host or the GPU
    clocks between the runs does not enter it (timing all short runs, then all long ones,
    moved the result by 5-10 µs between runs of the same code)."""
    short, long_ = make(n_short), make(n_long)
    jax.block_until_ready(short(*args))  # warm-up (compile, first touch)
    jax.block_until_ready(long_(*args))
    diffs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(short(*args))
        t1 = time.perf_counter()
        jax.block_until_ready(long_(*args))
        diffs.append(time.perf_counter() - t1 - (t1 - t0))
    return statistics.median(diffs) / (n_long - n_short) * 1e6
