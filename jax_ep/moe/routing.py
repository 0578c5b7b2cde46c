"""Top-k routing of tokens to experts (softmax or sigmoid scores, DeepSeek-V3 groups)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = ["SCORE_FUNCS", "Routing", "route"]

SCORE_FUNCS = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """Router output for ``N`` tokens: ``topk_idx [N, K]`` int32 expert ids,
    ``topk_weights [N, K]`` f32 combine weights, ``scores [N, E]`` f32 (unbiased).

    Example::

        idx, weights, scores = route(logits, top_k=2)
    """

    topk_idx: jax.Array
    topk_weights: jax.Array
    scores: jax.Array


def route(logits: jax.Array, *, top_k: int, score_func: str = "softmax",
          bias: Optional[jax.Array] = None, n_groups: int = 1, topk_groups: int = 1,
          normalize: Optional[bool] = None, scaling: float = 1.0) -> Routing:
    """Top-k routing from router logits, as in DeepSeek-V3.

    ``scores = softmax(logits)`` or ``sigmoid(logits)``; the experts are chosen by the top
    ``top_k`` of ``scores + bias`` (``bias`` only steers selection and gets no gradient).
    With ``n_groups > 1`` the experts are split into ``n_groups`` contiguous groups, each
    group is scored by the sum of its two best biased scores, and only experts of the
    best ``topk_groups`` groups can be chosen. The weights are the unbiased scores of the
    chosen experts, divided by their sum when ``normalize`` (default: True for sigmoid,
    False for softmax), times ``scaling``.

    Args:
      logits: ``[N, E]`` router logits (any float dtype; computed in f32).
      top_k: experts per token, ``1 <= top_k <= E``.
      score_func: ``"softmax"`` or ``"sigmoid"``.
      bias: optional ``[E]`` selection bias.
      n_groups, topk_groups: group-limited routing (``E % n_groups == 0``).
      normalize: renormalise the top-k weights to sum to 1.
      scaling: multiplies the weights (DeepSeek's ``routed_scaling_factor``).

    Returns:
      :class:`Routing`.

    Example::

        r = route(jnp.array([[0.1, 2.0, -1.0, 0.5]]), top_k=2)
        # r.topk_idx == [[1, 3]]
    """
    num_experts = logits.shape[-1]
    _check_routing_args("route", num_experts, top_k, score_func, n_groups, topk_groups)
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)
    select = scores
    if bias is not None:
        select = select + jax.lax.stop_gradient(bias.astype(jnp.float32))
    select = jax.lax.stop_gradient(select)
    if n_groups > 1:
        per_group = num_experts // n_groups
        grouped = select.reshape(select.shape[:-1] + (n_groups, per_group))
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)
        _, best_groups = jax.lax.top_k(group_score, topk_groups)
        keep = jnp.sum(jax.nn.one_hot(best_groups, n_groups, dtype=jnp.int32), axis=-2) > 0
        keep = jnp.repeat(keep, per_group, axis=-1)
        select = jnp.where(keep, select, -jnp.inf)
    _, topk_idx = jax.lax.top_k(select, top_k)
    weights = jnp.take_along_axis(scores, topk_idx, axis=-1)
    if normalize is None:
        normalize = score_func == "sigmoid"
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return Routing(topk_idx.astype(jnp.int32), weights.astype(jnp.float32), scores)


def _check_routing_args(where, num_experts, top_k, score_func, n_groups, topk_groups):
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"{where}: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{where}: top_k must be an int in [1, num_experts={num_experts}], "
                         f"got {top_k!r}")
    if not isinstance(n_groups, int) or n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"{where}: n_groups must be a positive int dividing num_experts="
                         f"{num_experts}, got {n_groups!r}")
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= n_groups:
        raise ValueError(f"{where}: topk_groups must be an int in [1, n_groups={n_groups}], "
                         f"got {topk_groups!r}")
    if top_k > topk_groups * (num_experts // n_groups):
        raise ValueError(
            f"{where}: top_k={top_k} exceeds the {topk_groups * (num_experts // n_groups)} "
            f"experts reachable in topk_groups={topk_groups} groups of "
            f"{num_experts // n_groups}; raise topk_groups or lower top_k")
