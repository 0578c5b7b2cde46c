"""Flax NNX mixture-of-experts layer on jax_ep's dispatch and combine.

:class:`MoE` is a drop-in MoE FFN: a router (linear, softmax or sigmoid scores),
top-k selection with optional DeepSeek-V3 group-limited routing and
aux-loss-free bias balancing, routed SwiGLU experts sharded over the
expert-parallel (EP) mesh axis, and an optional shared expert.

The module holds the parameters; the computation is :mod:`jax_ep.moe`'s
(:func:`jax_ep.moe.moe_forward` over :func:`jax_ep.moe.moe_per_rank`, which you can
call inside your own ``jax.shard_map``). The forward pass routes every token, moves it
with ``jax_ep.dispatch(layout="expert")`` to the ranks holding its experts, runs the
local experts with one ``jax.lax.ragged_dot`` per projection over the received rows
(grouped by local expert), and brings the results home with
``jax_ep.combine(y, handle, recv_topk_weights)``. With a fixed ``expert_capacity`` it
exchanges one row per (token, rank) instead (``layout="rank"``, DeepEP's normal mode):
rows are copied into their local experts' slots on arrival and each row's expert outputs
are weighted and summed before ``jax_ep.combine``: combine and both backward exchanges
then move less than half the rows (a token reaches ~3.6 of 4 ranks but 8 experts).
Everything from routing to combine runs inside ``jax.shard_map`` over the EP axis:
tokens are sharded over that axis and each rank holds ``num_experts / R`` experts.

Example (8 simulated CPU devices: set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax)::

    import jax, jax.numpy as jnp
    from flax import nnx
    from jax_ep.flax import MoE

    mesh = jax.make_mesh((8,), ("ep",))
    moe = MoE(hidden=64, ffn_hidden=128, num_experts=16, top_k=2, mesh=mesh,
              rngs=nnx.Rngs(0))
    x = jnp.ones((8 * 32, 64))               # [tokens, hidden], tokens % 8 == 0

    @nnx.jit
    def fwd(moe, x):
        return moe(x)

    out, stats = fwd(moe, x)                 # out [256, 64]; stats.load [16]
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_ep.moe import EXCHANGES, SCORE_FUNCS  # noqa: F401  (names this module had)
from jax_ep.moe import MoEConfig, MoEParams, MoEStats, Routing, moe_forward, route, swiglu
from jax_ep.moe.layer import _check_hidden, _check_mesh

__all__ = ["ExpertBias", "MoE", "MoEStats", "Routing", "linen_moe", "place_on_mesh", "route",
           "swiglu"]


class ExpertBias(nnx.Variable):
    """Non-trainable per-expert routing bias (DeepSeek-V3 aux-loss-free balancing).

    It is added to the scores for expert *selection* only; the combine weights use
    the unbiased scores. Optimizers built with ``wrt=nnx.Param`` leave it alone; update
    it with :meth:`MoE.update_bias`.

    Example::

        bias = ExpertBias(jnp.zeros((16,)))
    """


@functools.lru_cache(maxsize=None)
def _sharded_init(kind, shape, dtype, sharding):
    """A jitted initializer that creates each shard on its own device: no full copy of
    an ``[E, H, F]`` weight on one device. Cached, so equal layers compile it once."""
    if kind == "expert":  # fan-in scaled per expert ([E, in, out])
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=-2, out_axis=-1, batch_axis=(0,))
    elif kind == "router":
        init = nnx.initializers.normal(stddev=shape[0] ** -0.5)
    else:
        init = nnx.initializers.lecun_normal()
    return jax.jit(lambda key: init(key, shape, dtype), out_shardings=sharding)


def _config_field(name, doc):
    return property(lambda self: getattr(self.config, name), doc=doc)


class MoE(nnx.Module):
    """Mixture-of-experts SwiGLU FFN with expert parallelism through jax_ep.

    Parameters: ``router [H, E]`` (replicated, f32), routed experts ``w_gate, w_up
    [E, H, F]`` and ``w_down [E, F, H]`` sharded over ``axis_name`` on their first dim
    (``nnx.with_partitioning``), optional shared expert ``shared_gate, shared_up
    [H, Fs]``, ``shared_down [Fs, H]`` (replicated), and the non-trainable
    :class:`ExpertBias` ``expert_bias [E]``. The static settings are ``self.config``, a
    :class:`jax_ep.moe.MoEConfig`; :meth:`moe_params` gives the arrays as a
    :class:`jax_ep.moe.MoEParams` for the functional core.

    Args:
      hidden: model width H; ``H * itemsize(dtype)`` must be a multiple of 16 bytes.
      ffn_hidden: F, hidden width of each routed expert.
      num_experts: E, divisible by the size R of ``mesh.shape[axis_name]``.
      top_k: K experts per token, ``1 <= K <= E``.
      mesh: the ``jax.sharding.Mesh``; tokens and experts are sharded over ``axis_name``.
      axis_name: the expert-parallel mesh axis.
      token_axes: other mesh axes the tokens are also sharded over (e.g. ``("data",)``
        on a ``("data", "ep")`` mesh); experts are replicated over them, each group of
        EP ranks exchanges its own tokens, and the stats sum over all of them. A mesh
        axis of size > 1 that is neither ``axis_name`` nor in ``token_axes`` gets a
        ``UserWarning``: the layer would run replicated over it (every device of that
        axis computing the same tokens).
      score_func: ``"softmax"`` or ``"sigmoid"`` router scores.
      n_groups, topk_groups: DeepSeek-V3 group-limited routing (see :func:`route`).
      shared_ffn_hidden: width of the shared expert (0: none).
      capacity: ``max_recv_tokens`` of the dispatch (rows each rank can receive); None
        never drops. Rows beyond it are dropped and counted in ``MoEStats.dropped``.
      expert_capacity: rows per local expert for the expert matmuls. None: one
        ``jax.lax.ragged_dot`` per projection over the received rows. An int C: the
        received groups are gathered into ``[E/R, C, H]`` and the experts run as dense
        batched matmuls; rows past C are dropped and counted in ``MoEStats.dropped``.
        Use it on GPUs, where XLA lowers ``ragged_dot`` with many groups to a dense
        matmul over ``[rows, groups * H]`` (out of memory at DeepSeek-like shapes; a
        ``RuntimeWarning`` says so when that operand would exceed 1 GiB).
        Choosing C: a local expert receives the rows of all R ranks, on average
        ``R * T * K / E`` (T tokens per rank); set ``C = ceil(f * R * T * K / E)``
        (plus ``expert_alignment`` padding per group, which counts towards C). Because
        the rows of all ranks are pooled per expert, their relative spread is smaller
        than that of a per-source GShard capacity, so f can be tighter than a GShard
        capacity factor: with balanced routing at T=4096, E=256, K=8 on 4 ranks,
        f = 1.25 dropped nothing and f = 1.1 dropped a few rows (8 in one measurement)
        while saving ~12% of the expert FLOPs. Routing skew (an untrained or unbalanced
        router, few tokens per rank) needs a larger f. Nothing is dropped silently:
        watch ``MoEStats.dropped`` and raise f if it is not 0 (or is more than you
        accept). The default None never drops.
      buffer: a :class:`jax_ep.Buffer` for the CUDA kernels (None: reference backend).
      backend: ``"auto"``, ``"cuda"`` or ``"reference"``.
      normalize_weights: renormalise top-k weights (default: True for sigmoid).
      routed_scaling: multiplies the routed weights.
      expert_alignment: pad each local expert group of the dispatch to this multiple
        (``exchange="expert"`` only).
      exchange: how tokens travel. ``"expert"``: ``jax_ep.dispatch(layout="expert")``,
        one row per (token, local expert) each way; combine applies the weights on the
        token's rank. ``"rank"`` (needs ``expert_capacity``): ``layout="rank"``, one row
        per (token, rank) each way, as DeepEP's normal mode: the received row is copied
        into the slots of each of its local experts here, and each row's local expert
        outputs are weighted and summed (f32, rounded to the activation dtype) on the
        expert's rank before the combine sums the ranks' rows. A token reaches about 3.6
        of 4 ranks but 8 experts at K=8, so combine and both backward exchanges move
        less than half the bytes; the extra rounding of the per-rank partial sums is the
        numerical difference. ``"auto"`` (default): ``"rank"`` when ``expert_capacity``
        is set and ``expert_alignment`` is 1, else ``"expert"``. ``capacity`` counts
        (token, rank) rows with ``"rank"`` (at most ``R * T`` are ever needed).
      micro_batches: split each rank's tokens into this many micro-batches, each with its
        own dispatch, experts and combine (forward and backward), pipelined with
        :func:`jax_ep.beside` (part i's experts beside part i-1's combine and part i+1's
        dispatch), so that with a ``buffer`` made with ``side_stream=True`` the exchanges
        run while the experts compute; ``capacity`` and ``expert_capacity`` are then per
        micro-batch limits of ``ceil(value / n)``. Results equal the layer's with 1
        (default) where nothing is dropped: bitwise for the grouped experts (the rows meet
        the same experts, each token's sum runs in the same order), to rounding for dense
        slots and gradients. At EP1 the split costs time (0.76x of the serial step: the
        parts' weight gradients are added in extra passes; README "Overlapping exchanges
        with compute"). The low-latency path ignores it (it overlaps the shared expert
        with its dispatch).
      dtype: compute dtype of the experts (default: the input's dtype).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` for initialisation.

    Calling ``moe(x)`` with ``x [..., H]`` (all leading dims are tokens; their product
    must be divisible by R times the sizes of ``token_axes``) returns
    ``(out [..., H], MoEStats)``. ``moe(x, low_latency=True, max_tokens_per_rank=M)``
    uses the low-latency kernels instead (decoding; at most M tokens per rank).

    Example::

        mesh = jax.make_mesh((4,), ("ep",))
        moe = MoE(hidden=32, ffn_hidden=64, num_experts=8, top_k=2, mesh=mesh,
                  score_func="sigmoid", n_groups=4, topk_groups=2, shared_ffn_hidden=32,
                  rngs=nnx.Rngs(0))
        out, stats = nnx.jit(lambda m, x: m(x))(moe, jnp.ones((4, 16, 32)))
        moe.update_bias(stats.load, rate=1e-3)   # aux-loss-free balancing step
    """

    num_experts = _config_field("num_experts", "E, the number of routed experts.")
    top_k = _config_field("top_k", "K, experts per token.")
    axis_name = _config_field("axis_name", "The expert-parallel mesh axis.")
    token_axes = _config_field("token_axes", "Other mesh axes the tokens are sharded over.")
    score_func = _config_field("score_func", '"softmax" or "sigmoid".')
    n_groups = _config_field("n_groups", "Expert groups of group-limited routing.")
    topk_groups = _config_field("topk_groups", "Groups a token may choose experts from.")
    normalize_weights = _config_field("normalize_weights", "Renormalised top-k weights.")
    routed_scaling = _config_field("routed_scaling", "Factor on the routed weights.")
    capacity = _config_field("capacity", "max_recv_tokens of the dispatch (None: never drops).")
    expert_capacity = _config_field("expert_capacity", "Rows per local expert (None: ragged).")
    expert_alignment = _config_field("expert_alignment", "Padding of each expert group.")
    exchange = _config_field("exchange", '"rank" or "expert" (resolved from "auto").')
    buffer = _config_field("buffer", "The jax_ep.Buffer (None: reference backend).")
    backend = _config_field("backend", '"auto", "cuda" or "reference".')
    micro_batches = _config_field("micro_batches", "Micro-batches of the exchanges (1: none).")

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, mesh, *,
                 axis_name: str = "ep", token_axes: Sequence[str] = (),
                 score_func: str = "softmax", n_groups: int = 1,
                 topk_groups: int = 1, shared_ffn_hidden: int = 0,
                 capacity: Optional[int] = None, expert_capacity: Optional[int] = None,
                 buffer=None, backend: str = "auto",
                 normalize_weights: Optional[bool] = None, routed_scaling: float = 1.0,
                 expert_alignment: int = 1, exchange: str = "auto", micro_batches: int = 1,
                 dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        where = "MoE"
        for name, value in (("hidden", hidden), ("ffn_hidden", ffn_hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        if not isinstance(shared_ffn_hidden, int) or shared_ffn_hidden < 0:
            raise ValueError(f"{where}: shared_ffn_hidden must be an int >= 0, got "
                             f"{shared_ffn_hidden!r}")
        self.config = MoEConfig(
            num_experts=num_experts, top_k=top_k, axis_name=axis_name, token_axes=token_axes,
            score_func=score_func, n_groups=n_groups, topk_groups=topk_groups,
            normalize_weights=normalize_weights, routed_scaling=routed_scaling,
            capacity=capacity, expert_capacity=expert_capacity,
            expert_alignment=expert_alignment, exchange=exchange, buffer=buffer,
            backend=backend, micro_batches=micro_batches)
        self.token_shards = _check_mesh(where, self.config, mesh)
        _check_hidden(where, hidden, dtype if dtype is not None else param_dtype)
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.mesh, self.num_ranks = mesh, int(mesh.shape[axis_name])
        self.shared_ffn_hidden = shared_ffn_hidden
        self.dtype, self.param_dtype = dtype, param_dtype

        def param(kind, shape, spec, dtype=param_dtype):
            sharding = jax.sharding.NamedSharding(mesh, P(*spec))

            def init(key, shape, dtype):
                return _sharded_init(kind, shape, dtype, sharding)(key)

            return nnx.Param(nnx.with_partitioning(init, spec, mesh=mesh)(
                rngs.params(), tuple(shape), jnp.dtype(dtype)))

        E, H, F = num_experts, hidden, ffn_hidden
        self.router = param("router", (H, E), (None, None), jnp.float32)
        # Made in place: moving a one-device array onto a mesh that spans processes is a
        # collective (NCCL on GPUs).
        self.expert_bias = ExpertBias(jax.jit(
            lambda: jnp.zeros((E,), jnp.float32),
            out_shardings=jax.sharding.NamedSharding(mesh, P(None)))())
        expert_spec = (axis_name, None, None)
        self.w_gate = param("expert", (E, H, F), expert_spec)
        self.w_up = param("expert", (E, H, F), expert_spec)
        self.w_down = param("expert", (E, F, H), expert_spec)
        if shared_ffn_hidden:
            Fs = shared_ffn_hidden
            self.shared_gate = param("dense", (H, Fs), (None, None))
            self.shared_up = param("dense", (H, Fs), (None, None))
            self.shared_down = param("dense", (Fs, H), (None, None))

    def moe_params(self) -> MoEParams:
        """The layer's arrays as a :class:`jax_ep.moe.MoEParams` (parameter dtype), for
        :func:`jax_ep.moe.moe_forward` or, sharded, :func:`jax_ep.moe.moe_per_rank`.

        Example::

            out, stats = jax_ep.moe.moe_forward(x, moe.moe_params(), moe.config, moe.mesh)
        """
        shared = ((self.shared_gate[...], self.shared_up[...], self.shared_down[...])
                  if self.shared_ffn_hidden else ())
        return MoEParams(router=self.router[...], w_gate=self.w_gate[...],
                         w_up=self.w_up[...], w_down=self.w_down[...],
                         expert_bias=self.expert_bias[...], shared=shared)

    def route(self, x: jax.Array) -> Routing:
        """Routes tokens ``x [N, H]`` with this layer's router and bias (no communication).

        Example::

            r = moe.route(x.reshape(-1, moe.hidden))   # r.topk_idx [N, K]
        """
        logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return route(logits, top_k=self.top_k, score_func=self.score_func,
                     bias=self.expert_bias[...], n_groups=self.n_groups,
                     topk_groups=self.topk_groups, normalize=self.normalize_weights,
                     scaling=self.routed_scaling)

    def __call__(self, x: jax.Array, *, low_latency: bool = False,
                 max_tokens_per_rank: Optional[int] = None):
        """Applies the layer: ``x [..., H]`` → ``(out [..., H], MoEStats)``.

        Args:
          x: tokens; the product of the leading dims must be divisible by R times the
            sizes of ``token_axes`` (they are sharded over those axes and ``axis_name``).
          low_latency: use ``jax_ep.low_latency_dispatch/combine`` (decoding).
          max_tokens_per_rank: low-latency capacity M (default: the tokens per rank).

        Example::

            out, stats = moe(jnp.ones((8, 4, moe.hidden)))
        """
        return moe_forward(x, self.moe_params(), self.config, self.mesh, dtype=self.dtype,
                           low_latency=low_latency, max_tokens_per_rank=max_tokens_per_rank)

    def update_bias(self, load: jax.Array, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``.

        Overloaded experts become less likely to be chosen, underloaded ones more.
        Works eagerly and inside ``nnx.jit`` (the bias is module state).

        Example::

            out, stats = moe(x)
            moe.update_bias(stats.load, rate=1e-3)
        """
        load = jnp.asarray(load, jnp.float32)
        if load.shape != (self.num_experts,):
            raise ValueError(f"MoE.update_bias: load must have shape ({self.num_experts},), "
                             f"got {tuple(load.shape)}")
        step = rate * jnp.sign(jnp.mean(load) - load)
        self.expert_bias[...] = self.expert_bias[...] + step.astype(jnp.float32)


def linen_moe(**kwargs):
    """The :class:`MoE` layer as a Flax Linen module (through ``nnx.bridge.to_linen``).

    Takes :class:`MoE`'s constructor arguments except ``rngs``. Parameters live in the
    ``"params"`` collection (with their EP sharding) and the routing bias in
    ``"ExpertBias"``; ``apply`` returns ``(out, MoEStats)``.

    Example::

        layer = linen_moe(hidden=32, ffn_hidden=64, num_experts=8, top_k=2, mesh=mesh)
        variables = layer.init(jax.random.key(0), x)          # x [N, 32]
        out, stats = jax.jit(layer.apply)(variables, x)
    """
    from flax.nnx import bridge
    if "rngs" in kwargs:
        raise TypeError("linen_moe: pass no rngs; Linen's init supplies them")
    return bridge.to_linen(MoE, **kwargs)


def place_on_mesh(mesh, *objs) -> None:
    """Replicates every array of the NNX objects ``objs`` (modules, optimizers) that is
    not yet placed on a ``NamedSharding``, in place.

    :class:`MoE` places its parameters on ``mesh`` when it creates them; a model's other
    layers usually are not. Placing those too before the first step gives the first
    step's inputs the shardings of later steps: one compilation of the train step
    instead of two.

    Example::

        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        place_on_mesh(mesh, model, optimizer)
    """
    replicated = jax.sharding.NamedSharding(mesh, P())
    for obj in objs:
        state = nnx.state(obj)
        nnx.update(obj, jax.tree.map(
            lambda a: a if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding)
            else jax.device_put(a, replicated), state))
