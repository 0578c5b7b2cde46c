"""The MoE layer on global arrays: placement, ``jax.shard_map`` over the mesh, reshapes.

The Flax module ``jax_ep.flax.MoE`` is a thin layer of parameters over
:func:`moe_forward`, which runs :func:`jax_ep.moe.moe_per_rank`'s code on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from jax_ep.moe.experts import _check_ragged_dot_cost
from jax_ep.moe.layer import (MoEConfig, MoEParams, MoEStats, _cast, _check_hidden,
                              _check_low_latency, _check_mesh, _check_params, _per_rank)

__all__ = ["moe_forward"]


def moe_forward(x: jax.Array, params: MoEParams, config: MoEConfig, mesh, *, dtype=None,
                low_latency: bool = False, max_tokens_per_rank: Optional[int] = None):
    """The MoE layer on global arrays: :func:`moe_per_rank` under ``jax.shard_map``.

    The tokens are sharded over ``config.token_axes`` and ``config.axis_name`` (in that
    order), the routed experts over ``config.axis_name`` on their first dim; the router,
    bias and shared expert are replicated. Inputs are placed with those shardings first
    (on Explicit meshes too). The output has the input's sharding on an Explicit mesh
    (replicated for an input on no mesh, e.g. without ``jax.set_mesh``, so the user's
    unplaced layers around it can take gradients); on an Auto mesh it is a sharding
    constraint over the token axes. Auto or Explicit, with or without ``jax.set_mesh``:
    all work. :class:`jax_ep.flax.MoE` calls this.

    Args:
      x: ``[..., H]`` tokens; the product of the leading dims must be divisible by R times
        the sizes of ``token_axes``.
      params: :class:`MoEParams` with all ``E`` experts.
      config: :class:`MoEConfig`.
      mesh: the ``jax.sharding.Mesh`` holding ``config.axis_name``.
      dtype, low_latency, max_tokens_per_rank: as in :func:`moe_per_rank`
        (``max_tokens_per_rank`` defaults to the tokens per rank).

    Returns:
      ``(out [..., H], MoEStats)``.

    Example::

        out, stats = jax.jit(moe_forward, static_argnums=(2, 3))(x, params, config, mesh)
    """
    where = "MoE"
    if not hasattr(x, "shape") or x.ndim < 2:
        raise ValueError(f"{where}: x must be an array [..., hidden], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"{where}: config must be a jax_ep.moe.MoEConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(params, MoEParams):
        raise TypeError(f"{where}: params must be a jax_ep.moe.MoEParams, got "
                        f"{type(params).__name__}")
    hidden = params.router.shape[0]
    if x.shape[-1] != hidden:
        raise ValueError(f"{where}: x.shape[-1]={x.shape[-1]} != hidden={hidden}")
    token_shards = _check_mesh(where, config, mesh)
    _check_params(where, params, config, hidden, config.num_experts)
    lead = x.shape[:-1]
    n = math.prod(lead)
    if n % token_shards:
        raise ValueError(f"{where}: {n} tokens are not divisible by the {token_shards} "
                         f"shards of mesh axes {config.token_axes + (config.axis_name,)}; "
                         "pad the batch")
    dtype = dtype or x.dtype
    _check_hidden(where, hidden, dtype)
    max_tokens_per_rank = _check_low_latency(where, low_latency, max_tokens_per_rank,
                                             n // token_shards)
    num_ranks = int(mesh.shape[config.axis_name])
    if not low_latency and config.expert_capacity is None:
        # XLA's dense lowering of ragged_dot multiplies [rows, E/R * H]
        rows = config.capacity or num_ranks * (n // token_shards) * config.top_k
        _check_ragged_dot_cost(mesh, config.num_experts // num_ranks, rows, hidden,
                               params.w_gate.shape[-1], dtype)
    params = _cast(params, dtype)
    x_in = _flatten(x, mesh, config, token_shards).astype(dtype)
    out, stats = _forward_jit(config, mesh, bool(low_latency), max_tokens_per_rank, x_in,
                              params)
    return _like_input(_unflatten(out, lead, mesh, config, token_shards), x, mesh), stats


def _token_dim(token_axes, axis_name):
    """PartitionSpec entry of the token dim: sharded over the extra axes, then EP."""
    return token_axes + (axis_name,) if token_axes else axis_name


def _forward(cfg, mesh, low_latency, max_tokens_per_rank, x, params):
    ax = cfg.axis_name
    tok = P(_token_dim(cfg.token_axes, ax), None)
    expert_spec = P(ax, None, None)
    specs = MoEParams(router=P(None, None), w_gate=expert_spec, w_up=expert_spec,
                      w_down=expert_spec,
                      expert_bias=None if params.expert_bias is None else P(None),
                      shared=tuple(P(None, None) for _ in params.shared))
    fn = jax.shard_map(
        lambda x, p: _per_rank(cfg, low_latency, max_tokens_per_rank, x, p), mesh=mesh,
        in_specs=(tok, specs), out_specs=(tok, MoEStats(P(None), P(), P())))
    place = lambda a, spec: a if a is None else _place(mesh, a, spec)  # noqa: E731
    placed = MoEParams(*(place(a, s) for a, s in zip(params[:5], specs[:5])),
                       shared=tuple(place(a, s) for a, s in zip(params.shared, specs.shared)))
    return fn(place(x, tok), placed)


_forward_jit = jax.jit(_forward, static_argnums=(0, 1, 2, 3))


def _is_explicit(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _place(mesh, a, spec):
    """Puts ``a`` on ``mesh`` with ``spec`` (explicit meshes need it before shard_map)."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if _is_explicit(mesh):
        return jax.sharding.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)


def _like_input(out, x, mesh):
    """On an Explicit mesh the output gets the input's sharding type. A token-sharded
    output of an input on no mesh (a model whose other layers are not placed, no
    ``jax.set_mesh``) breaks those layers' backward pass: their weight gradients would
    contract a sharded token dim ("Contracting dimensions are sharded"). Such inputs get
    a replicated output; inputs on the mesh get their own spec back."""
    if not _is_explicit(mesh):
        return out
    src = getattr(jax.typeof(x), "sharding", None)
    src_mesh = getattr(src, "mesh", None)
    on_mesh = src_mesh is not None and not src_mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in src_mesh.axis_types)
    spec = src.spec if on_mesh else P()
    return jax.sharding.reshard(out, jax.sharding.NamedSharding(mesh, spec))


def _lead_spec(lead, config, token_shards):
    """Sharding of the leading token dim when reshaping on an explicit mesh."""
    return (_token_dim(config.token_axes, config.axis_name)
            if lead[0] % token_shards == 0 else None)


def _flatten(x, mesh, config, token_shards):
    """``[..., H]`` → ``[N, H]``; explicit meshes need the reshape's output sharding."""
    lead, hidden = x.shape[:-1], x.shape[-1]
    n = math.prod(lead)
    if x.ndim == 2:
        return x
    if not _is_explicit(mesh):
        return x.reshape(n, hidden)
    ax = _lead_spec(lead, config, token_shards)
    spec = P(*((ax,) + (None,) * (x.ndim - 1)))
    x = jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.lax.reshape(x, (n, hidden),
                           out_sharding=jax.sharding.NamedSharding(mesh, P(ax, None)))


def _unflatten(out, lead, mesh, config, token_shards):
    if len(lead) == 1:
        return out
    shape = lead + (out.shape[-1],)
    if not _is_explicit(mesh):
        return out.reshape(shape)
    ax = _lead_spec(lead, config, token_shards)
    out = jax.sharding.reshard(out, jax.sharding.NamedSharding(mesh, P(ax, None)))
    spec = P(*((ax,) + (None,) * len(lead)))
    return jax.lax.reshape(out, shape,
                           out_sharding=jax.sharding.NamedSharding(mesh, spec))
