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

Scheduling groups (internal, for experiments; cuda/OVERLAP.md "Scheduling groups"):
``on_side_stream(f, group=g)`` makes the region's call op carry ``_scheduling_group_id=g``
beside ``_xla_stream_annotation``, and ``with scheduling_group(g):`` puts the same id on
the compute traced inside it (the matmuls to run between ``call-start`` and
``call-done``). XLA's latency-hiding scheduler then issues the whole group together: start,
the grouped compute, done. It needs ``--xla_gpu_enable_latency_hiding_scheduler=true``, and
on the GPU it keeps the id on compute only where that compute becomes a cuBLAS GEMM or a
Triton GEMM fusion.
"""

from __future__ import annotations

import contextlib
import functools

import jax

SIDE_STREAM = "gpu_stream:1"
# Frontend attribute names as XLA spells them (xla/side_effect_util.cc).
STREAM_ATTR = "_xla_stream_annotation"
GROUP_ATTR = "_scheduling_group_id"


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


def group_id(group) -> str:
    """``group`` as the string XLA parses: a non-negative integer (XLA rejects others when
    it compiles, so fail here, where the caller can see which call gave it)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ValueError(f"jax_ep: a scheduling group must be a non-negative int, got {group!r}")
    return str(group)


@functools.lru_cache(maxsize=None)
def _tagged_call():
    """``tag(f, attrs, ad_attrs) -> g``: ``g`` runs ``f`` as a call op whose frontend
    attributes are ``attrs``; regions that autodiff derives from it get ``ad_attrs`` where
    this jax lets us choose (jax >= 0.11.0), else ``attrs`` as well.

    Why not compute_on: its function form writes the call op's attributes afresh and the
    caller's ``set_xla_metadata`` lands on the memory-placement custom calls around the
    call's results, so the call never carries the group id. jax's own metadata call keeps
    what we give it and comes with the autodiff, batching and DCE rules of a call.
    """
    try:
        from jax.experimental.xla_metadata import xla_metadata_call2
    except ImportError:
        xla_metadata_call2 = None
    if xla_metadata_call2 is not None:
        return lambda f, attrs, ad_attrs: xla_metadata_call2(f, attrs, ad_metadata=ad_attrs)
    try:  # jax 0.10.x: the same primitive, attributes as keywords, the same ones under AD
        from jax.experimental.scheduling_groups import xla_metadata_call
    except ImportError:
        raise RuntimeError(
            f"jax_ep: a side-stream region in a scheduling group needs jax.experimental's "
            f"xla_metadata_call (jax >= 0.10.0); this is jax {jax.__version__}") from None
    return lambda f, attrs, ad_attrs: xla_metadata_call(f, **attrs)


def _grouped_region(f, gid: str):
    stream = SIDE_STREAM.split(":", 1)[1]
    # inlineable=false as compute_on sets it: XLA's call inliner must leave the region be.
    region = {STREAM_ATTR: stream, "inlineable": "false"}

    def body(*args):
        # Only the call (later call-start/done) may hold the id: XLA clears it from the
        # region's top-level ops but not from fusions nested in them.
        from jax.experimental.xla_metadata import set_xla_metadata
        with set_xla_metadata(**{GROUP_ATTR: None}):
            return f(*args)
    # The backward regions go on the side stream too, outside the group: a forward and a
    # backward pair with one id would make one group with a gap, which XLA refuses.
    return _tagged_call()(body, {**region, GROUP_ATTR: gid}, region)


def on_side_stream(f, group=None):
    """``f`` as a call region that XLA runs on :data:`SIDE_STREAM` (see the module doc).

    ``group``: a scheduling group id (non-negative int) for the region's call op; give
    the compute it should overlap the same id with :func:`scheduling_group`. On jax 0.10.x
    the regions that autodiff derives from a grouped region carry the same id (that jax
    has no way to say otherwise): group only code that is not differentiated there.
    """
    if group is None:
        return _region_maker()(f)
    return _grouped_region(f, group_id(group))


@contextlib.contextmanager
def scheduling_group(group):
    """Every op traced inside carries ``_scheduling_group_id=group``: the compute that XLA
    should schedule between the ``call-start`` and ``call-done`` of the region made by
    ``on_side_stream(..., group=group)``."""
    from jax.experimental.xla_metadata import set_xla_metadata
    with set_xla_metadata(**{GROUP_ATTR: group_id(group)}):
        yield
