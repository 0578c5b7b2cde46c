"""The MoE layer on one rank: its settings, its arrays and its forward pass.

:func:`moe_per_rank` is one rank's layer: route the local tokens, move them with
``jax_ep.dispatch`` to the ranks holding their experts, run the local experts, bring
the results home with ``jax_ep.combine``, add the shared expert and compute
:class:`MoEStats`. Call it inside your own ``jax.shard_map`` over the EP axis;
:func:`jax_ep.moe.moe_forward` runs it under a ``shard_map`` of its own on global arrays.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jax_ep.low_latency import low_latency_combine, low_latency_dispatch, \
    low_latency_dispatch_recv, low_latency_dispatch_send
from jax_ep.moe.experts import batched_swiglu, ragged_swiglu, swiglu
from jax_ep.moe.routing import _check_routing_args, route
from jax_ep.moe.slots import fan_out, from_expert_slots, rank_slots, reduce_to_rows, \
    to_expert_slots
from jax_ep.ops import combine, dispatch
from jax_ep.overlap import beside

__all__ = ["EXCHANGES", "MoEConfig", "MoEParams", "MoEStats", "moe_per_rank"]

EXCHANGES = ("auto", "rank", "expert")
_BACKENDS = ("auto", "cuda", "reference")
_VECTOR_BYTES = 16  # jax_ep moves rows in 16-byte vectors


class MoEStats(NamedTuple):
    """Statistics of one MoE forward pass (replicated across ranks).

    load: ``[E]`` int32, (token, slot) pairs routed to each expert, over all ranks.
    dropped: ``[]`` int32, expert rows dropped because ``capacity`` or
        ``expert_capacity`` was too small, summed over ranks (always 0 with the defaults,
        None).
    aux_loss: ``[]`` f32, the Switch/GShard load-balancing loss
        ``E * sum_e f_e * p_e`` (``f_e`` fraction of slots routed to e, ``p_e`` mean
        score of e); differentiable, add it to the loss with a small weight if wanted.

    Example::

        out, stats = moe(x)
        loss = task_loss(out) + 1e-2 * stats.aux_loss
        print(stats.load, stats.dropped)          # [E] per-expert load, dropped rows
    """

    load: jax.Array
    dropped: jax.Array
    aux_loss: jax.Array


class MoEParams(NamedTuple):
    """The arrays of an MoE layer (a pytree).

    router: ``[H, E]`` router weights (routing runs in f32).
    w_gate, w_up: ``[E, H, F]`` routed experts; ``w_down``: ``[E, F, H]``. Global
        arrays for :func:`moe_forward`; the rank's ``E/R`` local experts (the shard of
        the first dim over the EP axis) inside :func:`moe_per_rank`.
    expert_bias: optional ``[E]`` selection bias (aux-loss-free balancing; no gradient).
    shared: ``()`` or the shared expert ``(gate [H, Fs], up [H, Fs], down [Fs, H])``,
        replicated.

    Example::

        params = MoEParams(router=r, w_gate=wg, w_up=wu, w_down=wd)
    """

    router: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    expert_bias: Optional[jax.Array] = None
    shared: Tuple[jax.Array, ...] = ()


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The static settings of an MoE layer (hashable: a ``jax.jit`` static argument).

    Fields as :class:`jax_ep.flax.MoE`'s arguments of the same names: ``num_experts``
    (E), ``top_k`` (K), ``axis_name`` (the EP mesh axis), ``token_axes`` (other mesh axes
    the tokens are sharded over), ``score_func``, ``n_groups``, ``topk_groups``,
    ``normalize_weights`` (None: True for sigmoid), ``routed_scaling``, ``capacity``,
    ``expert_capacity``, ``expert_alignment``, ``exchange``, ``buffer``, ``backend``,
    ``micro_batches``.
    The constructor checks them and resolves ``exchange="auto"`` and
    ``normalize_weights=None``; checks that need the mesh run in the forward functions.

    Example::

        config = MoEConfig(num_experts=16, top_k=2, expert_capacity=64)
        config.exchange   # "rank"
    """

    num_experts: int
    top_k: int
    axis_name: str = "ep"
    token_axes: Tuple[str, ...] = ()
    score_func: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    normalize_weights: Optional[bool] = None
    routed_scaling: float = 1.0
    capacity: Optional[int] = None
    expert_capacity: Optional[int] = None
    expert_alignment: int = 1
    exchange: str = "auto"
    buffer: Any = None
    backend: str = "auto"
    micro_batches: int = 1

    def __post_init__(self):
        where = "MoEConfig"
        for name in ("num_experts", "expert_alignment", "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        token_axes = self.token_axes
        token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
        for a in token_axes:
            if a == self.axis_name or token_axes.count(a) > 1:
                raise ValueError(f"{where}: token_axes must be distinct mesh axes other than "
                                 f"axis_name={self.axis_name!r}, got {token_axes!r}")
        _check_routing_args(where, self.num_experts, self.top_k, self.score_func,
                            self.n_groups, self.topk_groups)
        for name in ("capacity", "expert_capacity"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {name} must be None or a positive int, got "
                                 f"{value!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{where}: backend must be 'auto', 'cuda' or 'reference', got "
                             f"{self.backend!r}")
        exchange = self.exchange
        if exchange not in EXCHANGES:
            raise ValueError(f"{where}: exchange must be one of {EXCHANGES}, got {exchange!r}")
        if exchange == "auto":
            exchange = "rank" if self.expert_capacity is not None and \
                self.expert_alignment == 1 else "expert"
        if exchange == "rank" and self.expert_capacity is None:
            raise ValueError(f"{where}: exchange='rank' builds fixed expert slots: pass "
                             "expert_capacity (rows per local expert) too, or use "
                             "exchange='expert'")
        if exchange == "rank" and self.expert_alignment != 1:
            raise ValueError(f"{where}: expert_alignment pads the expert layout's groups; it "
                             "does not apply to exchange='rank' (pass exchange='expert')")
        normalize = self.normalize_weights
        resolved = dict(token_axes=token_axes, exchange=exchange,
                        normalize_weights=(self.score_func == "sigmoid" if normalize is None
                                           else bool(normalize)),
                        routed_scaling=float(self.routed_scaling))
        for name, value in resolved.items():  # frozen: set the resolved values once
            object.__setattr__(self, name, value)


def _check_hidden(where, hidden, dtype):
    step = max(1, _VECTOR_BYTES // jnp.dtype(dtype).itemsize)
    if hidden % step:
        raise ValueError(f"{where}: hidden={hidden} must be a multiple of {step} for dtype "
                         f"{jnp.dtype(dtype).name} (jax_ep moves {_VECTOR_BYTES}-byte "
                         "vectors); pad the hidden size")


def _check_mesh(where, config, mesh) -> int:
    """Checks ``mesh`` against ``config``; returns the number of token shards."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh, got "
                        f"{type(mesh).__name__}")
    ax = config.axis_name
    if ax not in mesh.shape:
        raise ValueError(f"{where}: axis_name {ax!r} is not an axis of the mesh "
                         f"(axes: {tuple(mesh.shape)})")
    for a in config.token_axes:
        if a not in mesh.shape:
            raise ValueError(f"{where}: token_axes must be distinct mesh axes other than "
                             f"axis_name={ax!r} (mesh axes: {tuple(mesh.shape)}), got "
                             f"{config.token_axes!r}")
    num_ranks = int(mesh.shape[ax])
    if config.num_experts % num_ranks:
        raise ValueError(f"{where}: num_experts={config.num_experts} is not divisible by the "
                         f"{num_ranks} ranks of mesh axis {ax!r}")
    # Tokens are sharded over axis_name and token_axes only: over any other axis of size
    # > 1 every device of it runs the same tokens (replicated work, easy to miss).
    other = [a for a in mesh.shape if a != ax and a not in config.token_axes
             and int(mesh.shape[a]) > 1]
    if other:
        warnings.warn(
            f"{where}: mesh axes {tuple(other)} are neither axis_name={ax!r} nor in "
            f"token_axes={config.token_axes!r}: the layer runs replicated over them (each "
            f"device of those axes computes the same tokens). Pass token_axes="
            f"{tuple(config.token_axes) + tuple(other)!r} to shard the tokens over them "
            "(data parallelism), or filter this warning if the replication is intended.",
            UserWarning, stacklevel=3)
    return num_ranks * math.prod(int(mesh.shape[a]) for a in config.token_axes)


def _check_params(where, params, config, hidden, num_experts_here):
    if not isinstance(params, MoEParams):
        raise TypeError(f"{where}: params must be a jax_ep.moe.MoEParams, got "
                        f"{type(params).__name__}")
    E = config.num_experts
    if tuple(params.router.shape) != (hidden, E):
        raise ValueError(f"{where}: params.router must be [hidden={hidden}, num_experts={E}], "
                         f"got {tuple(params.router.shape)}")
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(params, name)
        if w.ndim != 3 or w.shape[0] != num_experts_here:
            raise ValueError(f"{where}: params.{name} must have {num_experts_here} experts "
                             f"on its first dim, got shape {tuple(w.shape)}")
    if len(params.shared) not in (0, 3):
        raise ValueError(f"{where}: params.shared must be () or (gate, up, down), got "
                         f"{len(params.shared)} arrays")


def _cast(params, dtype):
    """The experts in the compute dtype; the router and bias stay as they are (f32)."""
    c = lambda a: a.astype(dtype)  # noqa: E731
    return params._replace(w_gate=c(params.w_gate), w_up=c(params.w_up),
                           w_down=c(params.w_down), shared=tuple(c(a) for a in params.shared))


def _check_low_latency(where, low_latency, max_tokens_per_rank, per_rank):
    if low_latency:
        if max_tokens_per_rank is None:
            max_tokens_per_rank = per_rank
        if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < per_rank:
            raise ValueError(f"{where}: max_tokens_per_rank must be an int >= the {per_rank} "
                             f"tokens per rank, got {max_tokens_per_rank!r}")
        return max_tokens_per_rank
    if max_tokens_per_rank is not None:
        raise ValueError(f"{where}: max_tokens_per_rank applies to low_latency=True only")
    return None


def moe_per_rank(x: jax.Array, params: MoEParams, config: MoEConfig, *, dtype=None,
                 low_latency: bool = False, max_tokens_per_rank: Optional[int] = None):
    """One rank's MoE layer, for use inside ``jax.shard_map`` over ``config.axis_name``.

    Routes the rank's tokens with ``params.router`` (f32), exchanges them with the other
    ranks of the EP axis (``jax_ep.dispatch``/``combine``, or the low-latency ops), runs
    the rank's local experts as SwiGLU FFNs, adds the shared expert, and returns the
    statistics summed over the EP axis and ``config.token_axes``. The same code runs
    inside :class:`jax_ep.flax.MoE`; ``exchange``, ``capacity`` and ``expert_capacity``
    work as documented there.

    Args:
      x: ``[T, H]`` this rank's tokens.
      params: :class:`MoEParams` with this rank's ``E/R`` local experts (``w_gate [E/R,
        H, F]`` ...) and the replicated router, bias and shared expert.
      config: :class:`MoEConfig`.
      dtype: compute dtype of the experts: ``x`` and the expert weights are cast to it
        (default: ``x``'s dtype; the weights must then match it).
      low_latency: use the low-latency ops (decoding); the shared expert runs between
        ``jax_ep.low_latency_dispatch_send`` and ``_recv``.
      max_tokens_per_rank: low-latency capacity M (default: T).

    Returns:
      ``(out [T, H], MoEStats)``; the stats are the same on every rank.

    Example (4 simulated CPU devices or more)::

        >>> import functools, jax, jax.numpy as jnp, numpy as np
        >>> from jax.sharding import PartitionSpec as P
        >>> from jax_ep.moe import MoEConfig, MoEParams, moe_per_rank
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))
        >>> E, H, F = 8, 32, 64
        >>> k = jax.random.split(jax.random.key(0), 4)
        >>> params = MoEParams(router=jax.random.normal(k[0], (H, E)),
        ...                    w_gate=jax.random.normal(k[1], (E, H, F)) / H ** 0.5,
        ...                    w_up=jax.random.normal(k[2], (E, H, F)) / H ** 0.5,
        ...                    w_down=jax.random.normal(k[3], (E, F, H)) / F ** 0.5)
        >>> specs = MoEParams(router=P(), w_gate=P("ep"), w_up=P("ep"), w_down=P("ep"))
        >>> config = MoEConfig(num_experts=E, top_k=2, backend="reference")
        >>> @jax.jit
        ... @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("ep"), specs),
        ...                    out_specs=(P("ep"), P()))
        ... def block(x, params):                 # your own per-rank code around the MoE
        ...     out, stats = moe_per_rank(x, params, config)
        ...     return x + out, stats.load
        >>> y, load = block(jnp.ones((4 * 16, H)), params)
        >>> y.shape, int(load.sum())
        ((64, 32), 128)
    """
    where = "moe_per_rank"
    if not isinstance(config, MoEConfig):
        raise TypeError(f"{where}: config must be a jax_ep.moe.MoEConfig, got "
                        f"{type(config).__name__}")
    if not hasattr(x, "shape") or x.ndim != 2:
        raise ValueError(f"{where}: x must be this rank's tokens [T, hidden], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    try:
        num_ranks = jax.lax.axis_size(config.axis_name)
    except NameError:
        raise ValueError(f"{where}: run it inside jax.shard_map over the mesh axis "
                         f"axis_name={config.axis_name!r} (for global arrays use "
                         "jax_ep.moe.moe_forward)") from None
    if config.num_experts % num_ranks:
        raise ValueError(f"{where}: num_experts={config.num_experts} is not divisible by the "
                         f"{num_ranks} ranks of mesh axis {config.axis_name!r}")
    _check_params(where, params, config, x.shape[1], config.num_experts // num_ranks)
    if dtype is not None:
        x, params = x.astype(dtype), _cast(params, dtype)
    _check_hidden(where, x.shape[1], x.dtype)
    max_tokens_per_rank = _check_low_latency(where, low_latency, max_tokens_per_rank,
                                             x.shape[0])
    return _per_rank(config, bool(low_latency), max_tokens_per_rank, x, params)


def _per_rank(cfg: MoEConfig, low_latency, max_tokens_per_rank, x, p: MoEParams):
    """One rank's MoE: x ``[T, H]`` local tokens, expert weights ``[E/R, ...]`` local."""
    ax = cfg.axis_name
    all_axes = cfg.token_axes + (ax,)  # every axis the tokens are sharded over
    E, K = cfg.num_experts, cfg.top_k
    logits = jnp.dot(x.astype(jnp.float32), p.router.astype(jnp.float32))
    r = route(logits, top_k=K, score_func=cfg.score_func, bias=p.expert_bias,
              n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
              normalize=cfg.normalize_weights, scaling=cfg.routed_scaling)
    if low_latency:
        out = _low_latency_experts(cfg, max_tokens_per_rank, x, r, p)
        dropped = jnp.zeros((), jnp.int32)
    else:
        out, dropped = _micro_batched(cfg, x, r.topk_idx, r.topk_weights, p)
        dropped = jax.lax.psum(dropped, all_axes)
    if p.shared and not low_latency:  # (the low-latency path overlaps it with dispatch)
        out = out + swiglu(x, *p.shared)
    # Statistics over every rank's tokens.
    local_load = jnp.zeros((E,), jnp.int32).at[r.topk_idx.reshape(-1)].add(1)
    load = jax.lax.psum(local_load, all_axes)
    num_slots = jax.lax.psum(jnp.asarray(x.shape[0] * K, jnp.float32), all_axes)
    mean_score = jax.lax.psum(jnp.sum(r.scores, axis=0), all_axes) / (num_slots / K)
    frac = jax.lax.stop_gradient(load.astype(jnp.float32) / jnp.maximum(num_slots, 1.0))
    aux = E * jnp.sum(frac * mean_score)
    return out, MoEStats(load, dropped, aux)


def _micro_batched(cfg: MoEConfig, x, topk_idx, topk_weights, p: MoEParams):
    """Dispatch, local experts and combine of ``x [T, H]`` in ``cfg.micro_batches`` parts;
    returns ``(out [T, H], rows dropped on this rank)``.

    With several parts the program is a pipeline: part i's experts run beside part i-1's
    combine and part i+1's dispatch (:func:`jax_ep.beside`, launched in that order), so
    with ``Buffer(side_stream=True)`` those exchanges run while the experts compute, and
    in the backward pass their backward exchanges beside the experts' backward."""
    n = cfg.micro_batches
    sizes = [x.shape[0] // n + (i < x.shape[0] % n) for i in range(n)]
    bounds = [sum(sizes[:i]) for i in range(n + 1)]
    parts = [(x[a:b], topk_idx[a:b], topk_weights[a:b]) for a, b in zip(bounds, bounds[1:])]
    d = [None] * n
    y = [None] * n
    outs = [None] * n
    d[0] = _dispatch_part(cfg, *parts[0])
    dropped = 0
    for i in range(n):
        exchanges = []
        if i > 0:
            exchanges.append(lambda j=i - 1: _combine_part(cfg, y[j], d[j]))
        if i + 1 < n:
            exchanges.append(lambda j=i + 1: _dispatch_part(cfg, *parts[j]))
        done, (y[i], lost) = _beside_all(exchanges, lambda di: _expert_part(cfg, di, p), d[i])
        if i > 0:
            outs[i - 1] = done.pop(0)
        if i + 1 < n:
            d[i + 1] = done.pop(0)
        dropped = dropped + d[i].num_overflow + lost
    outs[n - 1] = _combine_part(cfg, y[n - 1], d[n - 1])
    return (jnp.concatenate(outs) if n > 1 else outs[0]), dropped


def _beside_all(exchanges, compute, *args):
    """``([e() for e in exchanges], compute(*args))``, compute beside all of them (nested
    :func:`jax_ep.beside`: launched in order, joined in reverse)."""
    if not exchanges:
        return [], compute(*args)
    rest = exchanges[1:]
    first, (others, result) = beside(exchanges[0],
                                     lambda *a: _beside_all(rest, compute, *a), *args)
    return [first] + others, result


def _limits(cfg: MoEConfig, num_tokens: int):
    """(dispatch capacity, rows per local expert) of one micro-batch of ``num_tokens``."""
    n = cfg.micro_batches
    capacity = None if cfg.capacity is None else -(-cfg.capacity // n)
    expert_capacity = None if cfg.expert_capacity is None else -(-cfg.expert_capacity // n)
    if capacity is not None and cfg.exchange == "rank":
        # (token, rank) rows: more than every token of every rank is never needed
        capacity = min(capacity, jax.lax.axis_size(cfg.axis_name) * num_tokens)
    return capacity, expert_capacity


def _dispatch_part(cfg: MoEConfig, x, topk_idx, topk_weights):
    capacity, _ = _limits(cfg, x.shape[0])
    if cfg.exchange == "rank":  # one row per (token, rank) both ways; slots built here
        return dispatch(x, topk_idx, topk_weights, num_experts=cfg.num_experts,
                        axis_name=cfg.axis_name, layout="rank", max_recv_tokens=capacity,
                        buffer=cfg.buffer, backend=cfg.backend)
    return dispatch(x, topk_idx, topk_weights, num_experts=cfg.num_experts,
                    axis_name=cfg.axis_name, layout="expert", max_recv_tokens=capacity,
                    expert_alignment=cfg.expert_alignment, buffer=cfg.buffer,
                    backend=cfg.backend)


def _expert_part(cfg: MoEConfig, d, p: MoEParams):
    """The local experts on a dispatch's rows: ``(rows for combine, rows dropped)``."""
    _, expert_capacity = _limits(cfg, d.handle.config.num_tokens)
    w_gate, w_up, w_down = p.w_gate, p.w_up, p.w_down
    if cfg.exchange == "rank":  # each row's local experts, weighted and summed here
        num_local = w_gate.shape[0]
        plan, lost = rank_slots(d.recv_topk_idx, num_local, expert_capacity)
        slots = fan_out(d.recv_x, plan.slot_row, plan.pair_slot)
        y = batched_swiglu(slots.reshape(num_local, expert_capacity, -1),
                           w_gate, w_up, w_down)
        weights = jnp.where(d.recv_topk_idx >= 0, d.recv_topk_weights, 0.0)
        rows = reduce_to_rows(y.reshape(num_local * expert_capacity, -1), weights,
                              plan.pair_slot, plan.slot_pair)
        return rows, lost
    if expert_capacity is None:
        return (ragged_swiglu(d.recv_x, w_gate, w_up, w_down, d.group_sizes),
                jnp.zeros((), jnp.int32))
    # fixed rows per expert: dense batched matmuls instead of ragged_dot
    slots, slot_map, lost = to_expert_slots(d.recv_x, d.group_sizes,
                                            d.num_recv_tokens_per_expert, expert_capacity)
    return from_expert_slots(batched_swiglu(slots, w_gate, w_up, w_down), slot_map), lost


def _combine_part(cfg: MoEConfig, y, d):
    if cfg.exchange == "rank":  # the weights were applied on this (the experts') rank
        return combine(y, d.handle)
    return combine(y, d.handle, d.recv_topk_weights)


def _low_latency_experts(cfg: MoEConfig, max_tokens_per_rank, x, r, p: MoEParams):
    """The decode path: low-latency dispatch, experts, combine. A shared expert runs
    between the dispatch's send and receive halves, while the tokens travel (optimization
    barriers pin it there in XLA's schedule); without one the fused dispatch (one launch
    instead of two) has nothing to wait beside."""
    kw = dict(num_experts=cfg.num_experts, max_tokens_per_rank=max_tokens_per_rank,
              axis_name=cfg.axis_name, buffer=cfg.buffer, backend=cfg.backend)
    shared = None
    if p.shared:
        pending = low_latency_dispatch_send(x, r.topk_idx, **kw)
        pending, x_shared = jax.lax.optimization_barrier((pending, x))
        shared = swiglu(x_shared, *p.shared)
        pending, shared = jax.lax.optimization_barrier((pending, shared))
        d = low_latency_dispatch_recv(pending)
    else:
        d = low_latency_dispatch(x, r.topk_idx, **kw)
    y = batched_swiglu(d.recv_x, p.w_gate, p.w_up, p.w_down)
    out = low_latency_combine(y, r.topk_idx, r.topk_weights, d.handle)
    return out if shared is None else out + shared
