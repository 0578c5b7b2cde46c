"""Running a custom call on a GPU stream beside XLA's compute stream.

``on_side_stream(f)`` wraps ``f`` (a function of arrays that makes one jax_ep custom call)
in a stream-annotated call region (``jax.experimental.compute_on`` with
``compute_type="gpu_stream:1"``). XLA turns that region into an async ``call-start`` /
``call-done`` pair on execution stream 1: the custom call gets that stream as its
``PlatformStream``, XLA inserts the cross-stream event waits (no host synchronisation),
keeps the operands alive until ``call-done``, and its scheduler may place independent work
(the expert matmuls) between start and done; with jax 0.11.2 it does not yet
(cuda/OVERLAP.md, which also says why this and not another mechanism).

Every op of one Buffer runs on the same stream (the option belongs to the Buffer), so
consecutive exchanges through it stay in issue order: none starts while an earlier one
still uses the buffer's counters and receive slots.
"""

from __future__ import annotations

import functools

import jax

SIDE_STREAM = "gpu_stream:1"


@functools.lru_cache(maxsize=None)
def _region_maker():
    """``make(f) -> g``: ``g`` runs ``f`` as one call region on :data:`SIDE_STREAM`.

    jax 0.11.1 and later spell it ``compute_on(compute_type=..., out_memory_spaces=...)(f)``;
    jax 0.10.1 to 0.11.0 ``compute_on2(f, compute_type=..., out_memory_spaces=...)``.
    """
    from jax.experimental import compute_on as impl
    device = jax.memory.Space.Device
    fn = getattr(impl, "compute_on2", None)
    if fn is not None:
        return lambda f: fn(f, compute_type=SIDE_STREAM, out_memory_spaces=device)
    public = impl.compute_on
    try:
        public(compute_type=SIDE_STREAM, out_memory_spaces=device)
    except TypeError:
        raise RuntimeError(
            f"jax_ep: Buffer(side_stream=True) needs jax >= 0.10.1 (a function form of "
            f"jax.experimental.compute_on); this is jax {jax.__version__}") from None
    return lambda f: public(compute_type=SIDE_STREAM, out_memory_spaces=device)(f)


def on_side_stream(f):
    """``f`` as a call region that XLA runs on :data:`SIDE_STREAM` (see the module doc)."""
    return _region_maker()(f)
