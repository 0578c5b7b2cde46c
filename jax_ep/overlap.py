"""Compute that runs while an exchange is in flight: :func:`beside`.

``beside(exchange, compute, *args)`` calls ``exchange()`` (which makes one jax_ep normal
op: ``dispatch`` or ``combine``) and ``compute(*args)``, and places ``compute`` between
that op's launch and its end. With a :class:`jax_ep.Buffer` made with
``side_stream=True`` the op's kernels run on the library's side stream, so the GPU runs
them and ``compute`` at the same time; the backward pass does the same with the op's
backward exchange and ``compute``'s backward.

How the order is pinned (``jax_ep/backends/cuda/side_stream.py``): the op is a launch
custom call on the side stream, then a join custom call that makes XLA's stream wait for
it; ``compute``'s inputs pass through an optimization barrier with the launch's results,
and the join's inputs through one with ``compute``'s results, so XLA can only schedule
launch, compute, join. The compute travels into the op's custom VJP as explicit inputs
and outputs (this module's hooks), so it is traced where the launch is, and its
gradients flow as any other.

Elsewhere (the reference backend, a Buffer without ``side_stream``, an exchange that
makes no normal op) ``compute`` simply runs after the exchange: the same values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional, Tuple

import jax

_local = threading.local()


@dataclasses.dataclass
class Hook:
    """A compute armed to run beside the next exchange of its kind: ``fn(*args)``."""

    fn: Callable
    args: Tuple[Any, ...]
    result: Any = None
    ran: bool = False
    taken: bool = False

    def run(self, args=None):
        self.result = self.fn(*(self.args if args is None else args))
        self.ran = True
        return self.result

    def finish(self):
        """The compute's result, running it now if no exchange did."""
        return self.result if self.ran else self.run()


def _stack(kind: str) -> list:
    stacks = getattr(_local, "stacks", None)
    if stacks is None:
        stacks = _local.stacks = {"op": [], "call": []}
    return stacks[kind]


@contextlib.contextmanager
def armed(kind: str, fn: Optional[Callable], args=()):
    """Arms ``fn(*args)`` for the next :func:`take` of ``kind`` inside the block.

    ``kind`` ``"op"``: taken by the next jax_ep normal op (``jax_ep.ops``), which carries
    it into its custom VJP; ``"call"``: taken by the next side-stream custom call
    (``jax_ep/backends/cuda/side_stream.py``). With ``fn=None`` nothing is armed and the
    yielded hook is None."""
    if fn is None:
        yield None
        return
    hook = Hook(fn, tuple(args))
    stack = _stack(kind)
    stack.append(hook)
    try:
        yield hook
    finally:
        if stack and stack[-1] is hook:
            stack.pop()


def take(kind: str) -> Optional[Hook]:
    """The innermost hook of ``kind`` armed and not yet taken (and takes it), or None."""
    stack = _stack(kind)
    if not stack or stack[-1].taken:
        return None
    hook = stack[-1]
    hook.taken = True
    return hook


def tie(first, second):
    """``(first, second)`` through one optimization barrier: whatever uses either result
    runs after both are computed. Leaves that are not arrays of a real dtype (float0
    cotangents, Python values) pass around it."""
    leaves, tree = jax.tree.flatten((first, second))
    pick = [i for i, a in enumerate(leaves)
            if isinstance(a, jax.Array) and a.dtype != jax.dtypes.float0]
    if pick:
        held = jax.lax.optimization_barrier([leaves[i] for i in pick])
        for i, a in zip(pick, held):
            leaves[i] = a
    return jax.tree.unflatten(tree, leaves)


def run_between(hook: Hook, launched):
    """``hook``'s compute after ``launched`` (a launch's results) exist; returns
    ``launched`` again, ordered after the compute."""
    launched, args = tie(launched, hook.args)
    out = hook.run(args)
    launched, hook.result = tie(launched, out)
    return launched


def carried(hook: Optional[Hook]):
    """``(fn, args)`` of an op-level hook for the op's custom VJP: ``(None, ())`` without."""
    return (None, ()) if hook is None else (hook.fn, hook.args)


def deliver(hook: Optional[Hook], result):
    """Hands the result that came out of the op's custom VJP back to :func:`beside`."""
    if hook is not None:
        hook.result, hook.ran = result, True


def exchange_beside(fn: Optional[Callable], args, exchange: Callable[[], Any]):
    """``(exchange(), fn(*args))`` with ``fn`` armed for the first side-stream custom call
    that ``exchange`` makes (or run after it); ``(exchange(), None)`` when ``fn`` is None.
    The ops' custom VJPs call this with the compute they carry."""
    with armed("call", fn, args) as hook:
        out = exchange()
    return out, (None if hook is None else hook.finish())


def forward_beside(compute: Optional[Callable], args, exchange: Callable[[], Any]):
    """A custom VJP's forward half: ``(exchange(), compute(*args), compute's vjp)``, the
    compute beside the exchange (``None, None`` for the last two without one). The vjp
    is a pytree of residuals."""
    fn = None if compute is None else (lambda *a: jax.vjp(compute, *a))
    out, got = exchange_beside(fn, args, exchange)
    return (out, None, None) if got is None else (out, *got)


def backward_beside(compute: Optional[Callable], vjp, cotangent, exchange: Callable[[], Any]):
    """A custom VJP's backward half: ``(exchange(), cotangents of the compute's inputs)``,
    the compute's backward beside the backward exchange (``()`` without a compute)."""
    fn = None if compute is None else (lambda f, c: f(c))
    out, d_args = exchange_beside(fn, (vjp, cotangent), exchange)
    return out, (() if compute is None else d_args)


def beside(exchange: Callable[[], Any], compute: Callable, *args):
    """Runs ``compute(*args)`` while the exchange that ``exchange()`` makes is in flight.

    Returns ``(exchange(), compute(*args))``, the same values as calling the two one after
    the other, in forward and backward. ``exchange`` takes no arguments (close over the
    arrays it sends) and makes one jax_ep normal op (:func:`jax_ep.dispatch` or
    :func:`jax_ep.combine`); ``compute`` beside it is issued after the op's kernels are
    launched and before the op's results are used. On a :class:`jax_ep.Buffer` made with
    ``side_stream=True`` those kernels run on a stream of their own, so the two overlap on
    the GPU (README "Overlapping exchanges with compute"); the backward pass puts the op's
    backward exchange beside ``compute``'s backward the same way. ``compute`` may close
    over arrays (they are made explicit inputs, so they get gradients) and may itself call
    :func:`beside` (exchanges in flight together: launched in order, joined in reverse).

    Example (inside ``shard_map``; two micro-batches, the second one's dispatch beside the
    first one's experts)::

        buf = jax_ep.Buffer(mesh, "ep", side_stream=True)
        d_a = jax_ep.dispatch(x_a, idx_a, w_a, num_experts=64, axis_name="ep", buffer=buf)
        d_b, y_a = jax_ep.beside(
            lambda: jax_ep.dispatch(x_b, idx_b, w_b, num_experts=64, axis_name="ep",
                                    buffer=buf),
            experts, d_a.recv_x)
    """
    if not callable(exchange) or not callable(compute):
        raise TypeError("beside(exchange, compute, *args): exchange and compute must be "
                        f"callables, got {type(exchange).__name__} and "
                        f"{type(compute).__name__}")
    fn, consts = jax.closure_convert(compute, *args)
    with armed("op", fn, (*args, *consts)) as hook:
        out = exchange()
    return out, hook.finish()
