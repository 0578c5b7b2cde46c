"""Capacity checks: a dispatch that drops rows is reported, never silent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


class CapacityError(RuntimeError):
    """A dispatch dropped rows because ``max_recv_tokens`` was too small."""


def check(result=None, *, num_recv_tokens=None, num_overflow=None) -> None:
    """Raises if a dispatch dropped rows, naming the ``max_recv_tokens`` that would fit.

    Pass the :class:`DispatchResult` (or anything with ``num_overflow`` and
    ``num_recv_tokens``), or those two arrays as keywords (e.g. per-rank values returned
    from ``shard_map`` with an added axis).

    Outside ``jit`` (concrete arrays, e.g. returned from ``shard_map``) it raises
    :class:`CapacityError` at once. Inside ``jit``/``shard_map`` it emits a
    ``checkify.check``: wrap the caller in ``jax.experimental.checkify.checkify``
    and call ``err.throw()``.

    Example::

        r = step(x, idx)              # returns the DispatchResult from shard_map
        jax_ep.check(r)               # CapacityError: ... max_recv_tokens >= 5123
    """
    if result is not None:
        num_recv_tokens, num_overflow = result.num_recv_tokens, result.num_overflow
    if num_recv_tokens is None or num_overflow is None:
        raise TypeError("check needs a DispatchResult or num_recv_tokens= and num_overflow=")
    overflow, recv = num_overflow, num_recv_tokens
    try:
        overflow_np = np.asarray(overflow, dtype=np.int64)
        # rows each rank needed: num_recv_tokens is clipped to the capacity
        needed_np = np.asarray(recv, dtype=np.int64) + overflow_np
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        checkify.check(jnp.all(overflow == 0),
                       "jax_ep dispatch dropped {dropped} rows: set max_recv_tokens >= {needed}",
                       dropped=jnp.max(overflow), needed=jnp.max(recv + overflow))
        return
    overflow, needed = overflow_np, needed_np
    if np.any(overflow > 0):
        raise CapacityError(
            f"jax_ep dispatch dropped {int(overflow.max())} rows on at least one rank "
            f"({int((overflow > 0).sum())} rank(s) overflowed): set max_recv_tokens >= "
            f"{int(needed.max())} (or leave it None for a capacity that cannot overflow)")
