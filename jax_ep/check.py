"""Capacity and expert-id checks: a dispatch that drops rows is reported, never silent."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify, io_callback

MODES = ("auto", "callback", "checkify")


class CapacityError(RuntimeError):
    """A dispatch dropped rows because ``max_recv_tokens`` was too small."""


class ExpertIdError(ValueError):
    """``topk_idx`` held expert ids outside ``[-1, num_experts)`` (they were ignored)."""


def _capacity_message(overflow, needed) -> str:
    return (f"jax_ep dispatch dropped {int(overflow.max())} rows on at least one rank "
            f"({int((overflow > 0).sum())} rank(s) overflowed): set max_recv_tokens >= "
            f"{int(needed.max())} (or leave it None for a capacity that cannot overflow)")


def _ids_message(invalid, num_experts=None) -> str:
    bound = f"[-1, {num_experts})" if num_experts is not None else "[-1, num_experts)"
    return (f"jax_ep: topk_idx held {int(invalid.sum())} expert id(s) outside {bound} "
            f"({int((invalid > 0).sum())} rank(s)); they were treated as -1 (not sent). "
            "Make the router's width equal num_experts")


def _raise_if_bad(overflow, recv, invalid, num_experts=None) -> None:
    """Host side: raises the jax_ep error for concrete per-rank counts (any may be None)."""
    if invalid is not None:
        invalid = np.asarray(invalid, dtype=np.int64)
        if np.any(invalid > 0):
            raise ExpertIdError(_ids_message(invalid, num_experts))
    if overflow is not None:
        overflow = np.asarray(overflow, dtype=np.int64)
        # rows each rank needed: num_recv_tokens is clipped to the capacity
        needed = np.asarray(recv, dtype=np.int64) + overflow
        if np.any(overflow > 0):
            raise CapacityError(_capacity_message(overflow, needed))


def under_checkify() -> bool:
    """Whether ``jax.experimental.checkify.checkify`` is tracing the caller right now.

    checkify stages the wrapped function to a jaxpr first, so its ``checked_fun`` is on
    the Python stack for as long as the function (and any jit inside it) is traced."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "checked_fun" and code.co_filename.endswith("checkify.py"):
            return True
        frame = frame.f_back
    return False


def _is_tracer(*values) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in values if a is not None)


def emit(overflow, recv, invalid, *, mode: str = "auto", num_experts=None, axis_name=None,
         what: str = "jax_ep.check") -> None:
    """Traced form of the checks, for use inside ``jit``/``shard_map``.

    ``mode="checkify"`` (and ``"auto"`` under a ``checkify.checkify`` wrapper) adds a
    ``checkify.check``; ``"callback"`` (and ``"auto"`` otherwise) raises the jax_ep error
    from an ``io_callback`` when the step runs, which needs no wrapper and works on every
    mesh kind (checkify itself fails on Explicit meshes and under ``jax.set_mesh`` in JAX
    0.10). With ``axis_name`` the ranks first gather each other's counts, so all of them
    fail at the same point: a rank that failed alone would leave the others waiting in
    the next collective."""
    if mode not in MODES:
        raise ValueError(f"{what}: mode must be one of {MODES}, got {mode!r}")
    wrapped = under_checkify()
    if mode == "checkify" and not wrapped:
        raise ValueError(
            f"{what}(mode='checkify') inside jit needs a checkify wrapper: wrap the step in "
            "jax.experimental.checkify.checkify(step, errors=checkify.user_checks) and call "
            "err.throw() on its error, or pass mode='callback' (raises when the step runs, "
            "no wrapper, any mesh)")
    if mode == "checkify" or (mode == "auto" and wrapped):
        if invalid is not None:
            bound = f"[-1, {num_experts})" if num_experts is not None else "[-1, E)"
            checkify.check(jnp.all(invalid == 0),
                           "jax_ep: topk_idx holds {n} expert ids outside " + bound,
                           n=jnp.max(invalid))
        if overflow is not None:
            checkify.check(jnp.all(overflow == 0),
                           "jax_ep dispatch dropped {dropped} rows: set max_recv_tokens >= "
                           "{needed}", dropped=jnp.max(overflow),
                           needed=jnp.max(recv + overflow))
        return
    # stop_gradient: an io_callback has no JVP, and these integer counts need none
    args = jax.lax.stop_gradient(tuple(a for a in (overflow, recv, invalid) if a is not None))
    if axis_name is not None:
        args = tuple(jax.lax.all_gather(a, axis_name) for a in args)
    have = (overflow is not None, recv is not None, invalid is not None)

    def host(*got):
        it = iter(got)
        vals = [next(it) if h else None for h in have]
        _raise_if_bad(*vals, num_experts=num_experts)

    io_callback(host, None, *args)


def check(result=None, *, num_recv_tokens=None, num_overflow=None, num_invalid_ids=None,
          mode: str = "auto") -> None:
    """Raises if a dispatch dropped rows (naming the ``max_recv_tokens`` that would fit) or
    was given expert ids outside ``[-1, num_experts)``.

    Pass the :class:`DispatchResult` or :class:`LowLatencyDispatchResult`, or the per-rank
    counts as keywords (e.g. values returned from ``shard_map`` with an added axis). Inside
    ``shard_map`` pass the result itself: its ranks then agree on the outcome (keyword
    counts there are checked per rank, and a rank failing alone can hang the others).

    Outside ``jit`` (concrete arrays) it raises :class:`ExpertIdError` or
    :class:`CapacityError` at once. Inside ``jit``/``shard_map`` (traced values), by mode:

    - ``"auto"`` (default): a ``checkify.check`` when the step is wrapped in
      ``jax.experimental.checkify.checkify`` (call ``err.throw()``), otherwise
      ``"callback"``.
    - ``"callback"``: the same error is raised when the step runs (from an
      ``io_callback``; JAX reports it as a ``JaxRuntimeError`` whose message holds the
      jax_ep one). Works on Auto and Explicit meshes, with or without ``jax.set_mesh``.
    - ``"checkify"``: always a ``checkify.check``; without the wrapper it fails at trace
      time naming the fix.

    Example::

        r = step(x, idx)              # returns the DispatchResult from shard_map
        jax_ep.check(r)               # CapacityError: ... max_recv_tokens >= 5123
    """
    num_experts = axis_name = None
    if result is not None:
        num_recv_tokens = getattr(result, "num_recv_tokens", None)
        num_overflow = getattr(result, "num_overflow", None)
        num_invalid_ids = getattr(result, "num_invalid_ids", None)
        handle = getattr(result, "handle", None)
        num_experts = getattr(getattr(handle, "config", None), "num_experts", None)
        axis_name = getattr(getattr(handle, "config", None), "axis_name", None)
    if (num_recv_tokens is None) != (num_overflow is None) or (
            num_overflow is None and num_invalid_ids is None):
        raise TypeError("check needs a dispatch result, or num_recv_tokens= and "
                        "num_overflow= (and/or num_invalid_ids=)")
    if mode not in MODES:
        raise ValueError(f"jax_ep.check: mode must be one of {MODES}, got {mode!r}")
    if _is_tracer(num_overflow, num_recv_tokens, num_invalid_ids):
        emit(num_overflow, num_recv_tokens, num_invalid_ids, mode=mode,
             num_experts=num_experts, axis_name=axis_name)
        return
    _raise_if_bad(num_overflow, num_recv_tokens, num_invalid_ids, num_experts)
