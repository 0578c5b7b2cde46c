"""The MoE layer as plain functions: routing, expert FFNs, expert slots, the forward pass.

No Flax needed: ``jax_ep.flax.MoE`` is a thin NNX module of parameters over these.

- ``routing``: :func:`route` (top-k, softmax or sigmoid scores, DeepSeek-V3 groups, a
  selection bias) and :class:`Routing`.
- ``experts``: :func:`swiglu`, :func:`ragged_swiglu` (``jax.lax.ragged_dot`` over the
  expert layout), :func:`batched_swiglu` (``[E/R, C, H]`` slots, low-latency layout).
- ``slots``: gathers between the dispatch layouts and fixed expert slots, with
  gather-only backward passes: :func:`to_expert_slots` / :func:`from_expert_slots`
  (expert layout), :func:`rank_slots`, :func:`fan_out`, :func:`reduce_to_rows` (rank
  layout), :func:`take_rows`.
- ``layer``: :func:`moe_per_rank`, one rank's MoE layer, to call inside your own
  ``jax.shard_map`` over the EP axis; :class:`MoEConfig`, :class:`MoEParams`,
  :class:`MoEStats`.
- ``sharded``: :func:`moe_forward`, the layer on global arrays over a mesh.
"""

from jax_ep.moe.experts import batched_swiglu, ragged_swiglu, swiglu
from jax_ep.moe.layer import EXCHANGES, MoEConfig, MoEParams, MoEStats, moe_per_rank
from jax_ep.moe.routing import SCORE_FUNCS, Routing, route
from jax_ep.moe.sharded import moe_forward
from jax_ep.moe.slots import (ExpertSlotMap, RankSlots, fan_out, from_expert_slots,
                              rank_slots, reduce_to_rows, take_rows, to_expert_slots)

__all__ = [
    "EXCHANGES", "ExpertSlotMap", "MoEConfig", "MoEParams", "MoEStats", "RankSlots",
    "Routing", "SCORE_FUNCS", "batched_swiglu", "fan_out", "from_expert_slots",
    "moe_forward", "moe_per_rank", "ragged_swiglu", "rank_slots", "reduce_to_rows", "route",
    "swiglu", "take_rows", "to_expert_slots",
]
