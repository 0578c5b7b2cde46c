"""The normal ops' custom calls on XLA's stream, or on the side stream.

A Buffer made with ``side_stream=True`` runs each normal op (dispatch, cached dispatch,
combine) as two custom calls (xla_ffi/side_stream.h):

1. ``<op>_on_side_stream``: the op's handler, launching on a library stream of the GPU
   after everything XLA issued before it (an event), under a slot number unique to this
   call site;
2. ``jax_ep_side_stream_join``: XLA's stream waits for that slot's launch. Its operands
   are the op's inputs and results, so XLA keeps them alive and unwritten until then; its
   token result goes through an optimization barrier with the results, so that nothing
   reads them before the join.

Between the two, :func:`jax_ep.beside`'s compute (a hook armed by the op's custom VJP,
jax_ep/overlap.py) is pinned by two more barriers: after the launch, before the join.
XLA runs it on its own stream while the exchange runs on the side stream. All ops of a
side-stream Buffer use the one stream, so they stay in issue order. The launch handlers
are kept out of CUDA graphs (the join's wait must see the launch's event), the rest of
the program is not.
"""

from __future__ import annotations

import itertools

import jax

from jax_ep import overlap
from jax_ep.backends.cuda._ffi import I32, call, i64

JOIN = "jax_ep_side_stream_join"
# Slot numbers: one per traced call site; a slot's launch and join alternate at run time
# (also across the iterations of a loop).
_slots = itertools.count()


def exchange_call(name: str, results, *args, axis_name: str, side_stream: bool, **attrs):
    """``call(name, results, *args, **attrs)`` for a normal op: on XLA's stream, or with
    ``side_stream`` launched on the side stream and joined back (the module doc)."""
    if not side_stream:
        return call(name, results, *args, axis_name=axis_name, side_slot=i64(-1), **attrs)
    slot = next(_slots)
    # Not side-effecting: XLA's dynamic-slice fusion (operands that are slices) would leave
    # a side-effecting original behind, a second launch whose buffers nothing keeps
    # alive. The join (side-effecting) consumes every result, and the slot makes each
    # launch unique, so XLA can neither drop nor merge it.
    outs = call(name + "_on_side_stream", results, *args, axis_name=axis_name,
                has_side_effect=False, side_slot=i64(slot), **attrs)
    hook = overlap.take("call")
    if hook is not None:
        outs = overlap.run_between(hook, outs)
    token = call(JOIN, jax.ShapeDtypeStruct((), I32), *jax.tree.leaves(outs), *args,
                 axis_name=axis_name, side_slot=i64(slot))
    outs, _ = overlap.tie(outs, token)
    return outs
