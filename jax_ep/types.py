"""Result types, handles and static op configurations shared by every backend.

Results are NamedTuples (pytrees), so they pass through ``jit``, ``shard_map``
and ``lax.scan`` unchanged. Handles carry the routing of one dispatch so that
its combine (and both backward passes) can reuse it without recomputing it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple, Union

import jax

Array = jax.Array
# A dispatch payload: a plain array, or an FP8 pair (e4m3 values, f32 scales per 128 channels).
Payload = Union[Array, Tuple[Array, Array]]

# SMs (blocks) of the normal CUDA kernels unless a Buffer or a call says otherwise.
DEFAULT_NUM_SMS = 24


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """Static description of one normal dispatch; also the static half of its handle."""

    num_experts: int
    num_ranks: int
    axis_name: str
    layout: str  # "rank" or "expert"
    capacity: int  # static number of received rows
    expert_alignment: int
    num_tokens: int  # T, tokens on each rank before dispatch
    num_topk: int  # K
    backend: str  # resolved: "reference" or "cuda"
    buffer_id: Optional[int] = None
    num_sms: int = DEFAULT_NUM_SMS
    cast_fp8: bool = False  # bf16 x cast to an FP8 pair on the way (dispatch(cast_fp8=True))
    # CUDA: the ops run on the side stream (the Buffer's side_stream; jax_ep.beside)
    side_stream: bool = False
    # Ranks per node when the EP axis spans several NVLink domains (None: one): combine sums
    # the ranks of each node, then the nodes, as the internode kernels do.
    node_size: Optional[int] = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


@dataclasses.dataclass(frozen=True)
class LowLatencyConfig:
    """Static description of one low-latency dispatch; also the static half of its handle."""

    num_experts: int
    num_ranks: int
    axis_name: str
    max_tokens_per_rank: int
    num_tokens: int
    num_topk: int
    hidden: int
    use_fp8: bool
    backend: str
    buffer_id: Optional[int] = None
    # Rows of recv_x past each (local expert, source rank) count: zeros when True; when
    # False the CUDA kernels leave them undefined (never read by jax_ep's ops) and skip
    # writing them. Differentiated dispatches, and the combine's VJP, always zero them.
    zero_padding: bool = False
    # Blocks of the CUDA kernels of this dispatch and its combine (None: the backend's
    # default, nearly every SM of an H100/H200).
    num_sms: Optional[int] = None
    # recv_x packed per expert: rows [0, recv_count[e]) in (source rank, token) order, zeros
    # after (low_latency_dispatch(packed=True)); combine's y then comes in the same layout.
    packed: bool = False

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


class HandleArrays(NamedTuple):
    """Where every received row came from and where every sent token went.

    recv_src_rank, recv_src_token, recv_src_slot: ``[cap]`` int32, -1 on empty and
    padding rows (``recv_src_slot`` is -1 on every row of the rank layout).
    send_pos: row index at the destination, -1 where nothing was sent or the row
    was dropped for lack of capacity; ``[T, R]`` (rank layout) or ``[T, K]``
    (expert layout, indexed by top-k slot).
    """

    recv_src_rank: Array
    recv_src_token: Array
    recv_src_slot: Array
    send_pos: Array


class InternodeHandleArrays(NamedTuple):
    """The handle of a dispatch over several nodes (the CUDA backend's internode path).

    recv_src_rank, recv_src_token, recv_src_slot: as in :class:`HandleArrays` (global
    source ranks; equal to the reference backend's).
    rows: ``[cap]`` the row of each received row among the node hop's ``[N * cap]``
    rows (node hop n's row i is ``n * cap + i``), -1 on empty and padding rows.
    node_hops: :class:`HandleArrays` of the NVLink hop inside this node, one per source
    node (leading axis ``N``): its "ranks" are this node's ranks and its "tokens" the
    ``T`` rows that source node's rank with this local index forwarded.
    sent_to_node: ``[N, T]`` int32, 1 where token t went to node m (the RDMA hop).
    recv_from_node: ``[N, T]`` int32, 1 where source node n's token t came here.
    """

    recv_src_rank: Array
    recv_src_token: Array
    recv_src_slot: Array
    rows: Array
    node_hops: HandleArrays
    sent_to_node: Array
    recv_from_node: Array


class _Handle:
    """Routing of one dispatch: traced arrays (pytree children) plus its static config.

    ``num_invalid_ids`` (``[]`` int32 or None) rides along here rather than as a result
    field, so the result tuples keep their length (code unpacks them by position)."""

    def __init__(self, arrays, config, num_invalid_ids=None):
        self.arrays = arrays
        self.config = config
        self.num_invalid_ids = num_invalid_ids

    def tree_flatten(self):
        return (self.arrays, self.num_invalid_ids), self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        return cls(children[0], config, children[1])


@jax.tree_util.register_pytree_node_class
class DispatchHandle(_Handle):
    """Routing of one normal dispatch (:class:`HandleArrays` + :class:`DispatchConfig`)."""

    def __repr__(self):
        return f"DispatchHandle(layout={self.config.layout!r}, capacity={self.config.capacity})"


class LowLatencyHandleArrays(NamedTuple):
    """recv_src_token ``[L, R*M]`` (-1 on empty rows), recv_count_per_rank ``[L, R]``,
    send_pos ``[T, K]``: the row (within the expert's ``R*M`` rows) that slot k of
    token t went to, -1 where masked; duplicate experts in one token share a row."""

    recv_src_token: Array
    recv_count_per_rank: Array
    send_pos: Array


@jax.tree_util.register_pytree_node_class
class LowLatencyHandle(_Handle):
    """Routing of one low-latency dispatch (:class:`LowLatencyHandleArrays` + config)."""

    def __repr__(self):
        return f"LowLatencyHandle(max_tokens_per_rank={self.config.max_tokens_per_rank})"


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: Array  # [R] int32
    num_tokens_per_expert: Array  # [E] int32
    is_token_in_rank: Array  # [T, R] bool


class DispatchResult(NamedTuple):
    """What :func:`jax_ep.dispatch` returns (per rank, inside ``shard_map``).

    recv_x: ``[cap, H]`` (or an FP8 pair ``([cap, H] e4m3, [cap, H/128] f32)``).
    recv_topk_idx: rank layout ``[cap, K]`` local expert ids or -1; expert layout
        ``[cap]`` the row's local expert, -1 on padding and unused rows.
    recv_topk_weights: ``[cap, K]`` / ``[cap]`` f32, 0 where the index is -1.
    num_recv_tokens: ``[]`` int32, rows in use (alignment padding included).
    num_recv_tokens_per_expert: ``[E/R]`` int32, (token, slot) pairs per local expert.
    group_sizes: ``[E/R]`` int32, rows per local expert group (expert layout: padded
        to ``expert_alignment``; feed to ``jax.lax.ragged_dot``).
    num_overflow: ``[]`` int32, rows dropped on this rank because ``max_recv_tokens``
        was too small (always 0 with the default capacity).
    handle: routing for :func:`jax_ep.combine`.
    num_invalid_ids (a property, kept on the handle): ``[]`` int32, slots of this rank's
        ``topk_idx`` holding an id outside ``[-1, E)`` (treated as -1;
        :func:`jax_ep.check` reports them).
    """

    recv_x: Payload
    recv_topk_idx: Array
    recv_topk_weights: Array
    num_recv_tokens: Array
    num_recv_tokens_per_expert: Array
    group_sizes: Array
    num_overflow: Array
    handle: DispatchHandle

    @property
    def num_invalid_ids(self):
        return self.handle.num_invalid_ids


class LowLatencyDispatchResult(NamedTuple):
    """recv_x ``[E/R, R*M, H]`` (or FP8 pair with scales ``[E/R, R*M, H/128]``);
    recv_count ``[E/R]`` received (token, expert) rows per local expert; handle.

    Rows of expert e from source rank s sit at ``[e, s*M : s*M + n]`` in source
    token order (n = ``handle.arrays.recv_count_per_rank[e, s]``). Other rows are
    undefined on the CUDA backend unless ``zero_padding=True`` or the dispatch is
    differentiated (then zero); the reference backend always writes zeros. With
    ``packed=True`` expert e's rows sit at ``[e, 0 : recv_count[e]]`` instead, in (source
    rank, source token) order, and every row after them is zero.
    num_invalid_ids (a property, kept on the handle) ``[]`` int32: slots of ``topk_idx``
    outside ``[-1, E)`` (ignored; :func:`jax_ep.check` reports them)."""

    recv_x: Payload
    recv_count: Array
    handle: LowLatencyHandle

    @property
    def num_invalid_ids(self):
        return self.handle.num_invalid_ids
