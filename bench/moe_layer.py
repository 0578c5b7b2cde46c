"""Forward+backward time of an MoE layer: jax_ep vs ``jax.lax.all_to_all`` baselines.

Every implementation computes the same layer (router → top-k → routed SwiGLU experts
sharded over the ``"ep"`` mesh axis → weighted combine) with the same parameters and
routing, inside ``jax.shard_map``; only the token exchange and expert batching differ.
All run the layer's own SwiGLU code (``jax_ep.moe.batched_swiglu`` /
``ragged_swiglu``: matmul outputs in the activation dtype with f32 accumulation inside
the GEMMs, ``silu * up`` in f32, so that the backward matmuls take bf16 operands):

* ``jax_ep``: :class:`jax_ep.flax.MoE` (``jax_ep.dispatch(layout="expert")`` →
  ``jax.lax.ragged_dot`` → ``jax_ep.combine``), default capacity (never drops).
* ``jax_ep_cf``: the same with ``capacity = ceil(cf * T * K)`` received rows per rank and
  ``expert_capacity = R * ceil(cf * T * K / E)`` rows per expert (dense batched expert
  matmuls, the same rows per expert as ``a2a_cf``); drops rows past either.
* ``jax_ep_cf_expert``: ``jax_ep_cf`` with ``exchange="expert"`` (``layout="expert"``:
  one row per (token, local expert) in combine and both backward exchanges, where
  ``jax_ep_cf``'s default ``exchange="rank"`` moves one row per (token, rank)).
* ``a2a_cf``: GShard/MaxText "dropping" style: each rank packs ``C = ceil(cf * T * K / E)``
  rows per expert into ``[E, C, H]``, ``all_to_all``, dense batched expert matmuls,
  ``all_to_all`` back (drops rows past ``C``).
* ``a2a_peer``: capacity ``T`` per peer: each rank sends every token once to each rank
  holding one of its experts in a ``[R, T, H]`` slab (``all_to_all``, never drops), the
  receiver sorts (token, slot) rows by local expert for ``ragged_dot``, weights and sums
  them per token, and sends ``[R, T, H]`` back.

* ``jax_ep_cf_mb2``: ``jax_ep_cf`` with ``micro_batches=2`` (each rank's tokens in two
  halves, each with its own dispatch, experts and combine), exchanges on XLA's compute
  stream: what splitting alone costs.
* ``jax_ep_cf_overlap``: the same on a ``Buffer(side_stream=True)``: the exchanges run
  on the library's side stream, each beside the other half's experts
  (``jax_ep.beside``), so that one half's tokens move while the other half's experts
  compute (cuda/OVERLAP.md).
  ``--overlap`` runs these two beside ``jax_ep_cf`` and reports the ratios.

* ``no_comm``: a communication-free ceiling: the ``jax_ep_cf`` layer with dispatch and
  combine replaced by local work of the same shapes. Each rank sends its own (token, slot)
  rows to *its own* local expert ``e % (E/R)`` (so each local expert receives about
  ``R * T * K / E`` rows, as with EP): a local gather builds the same expert-layout
  ``[ceil(cf * T * K), H]`` buffer ``jax_ep.dispatch`` returns, then the layer's own code
  (``jax_ep.moe``'s expert-slot gather, batched SwiGLU and gather back) runs unchanged,
  and a local gather-and-weighted-sum stands in for ``jax_ep.combine``. The backward
  passes mirror jax_ep's (dispatch's backward is a combine, combine's a cached dispatch),
  each a local gather. Same router, same expert matmul shapes, no cross-device traffic
  (except the one-scalar ``psum`` of the dropped count). If ``1.5 * no_comm > a2a_cf``,
  jax_ep cannot be 1.5x faster than ``a2a_cf`` at this shape, however fast its
  communication is (without changing the expert computation itself).

``--breakdown`` then times the pieces of the layer separately (each forward and
forward+backward, inside the same ``shard_map``): ``router`` (scores, top-k, weights),
``jax_ep_dispatch_combine`` / ``a2a_dispatch_combine`` / ``local_dispatch_combine``
(the token exchange of ``jax_ep_cf`` / ``a2a_cf`` / ``no_comm`` with identity experts),
``expert_slots`` (``jax_ep_cf``'s gather of the expert layout into ``[E/R, C, H]`` slots
and gather back, without matmuls; forward and backward all gathers) and ``expert_ffn``
(the layer's batched SwiGLU alone on ``[E/R, C, H]``). ``--breakdown-only`` skips the
whole-layer implementations.

Default shape is DeepSeek-like (T=4096 tokens per rank, H=7168, E=256, K=8, expert FFN
2048, bf16); ``--small`` shrinks it to run on simulated CPU devices. Each result is the
median of ``--iters`` (>= 20) timed calls after ``--warmup``; the JSON (and a PNG bar plot
when matplotlib is importable) goes to ``bench/results/``.

Run::

    PYTHONPATH=. python3 bench/moe_layer.py --small             # CPU, 8 simulated devices
    PYTHONPATH=. python3 bench/moe_layer.py                     # GPUs, DeepSeek-like shape
    PYTHONPATH=. python3 bench/moe_layer.py --tokens 1024 --impls jax_ep,a2a_peer
    PYTHONPATH=. python3 bench/moe_layer.py --impls jax_ep_cf,a2a_cf,no_comm --breakdown
    PYTHONPATH=. python3 bench/moe_layer.py --overlap --profile   # serial vs overlapped
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time

DEFAULT_IMPLS = ("jax_ep", "jax_ep_cf", "jax_ep_cf_expert", "a2a_cf", "a2a_peer", "no_comm")
OVERLAP_IMPLS = ("jax_ep_cf", "jax_ep_cf_mb2", "jax_ep_cf_overlap")
IMPLS = DEFAULT_IMPLS + OVERLAP_IMPLS[1:]
PARTS = ("router", "jax_ep_dispatch_combine", "a2a_dispatch_combine",
         "local_dispatch_combine", "expert_slots", "expert_ffn")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# run from a checkout without PYTHONPATH=.: an installed jax_ep still comes first
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/trace_summary.py
import trace_summary  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny shape for CPU: T=64 H=128 E=16 K=4 F=64, f32, 5 warm-up")
    p.add_argument("--tokens", type=int, help="tokens per rank T (default 4096)")
    p.add_argument("--hidden", type=int, help="H (default 7168)")
    p.add_argument("--experts", type=int, help="E (default 256)")
    p.add_argument("--top-k", type=int, help="K (default 8)")
    p.add_argument("--ffn", type=int, help="expert FFN width F (default 2048)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default bf16 (f32 small)")
    p.add_argument("--score-func", choices=("softmax", "sigmoid"), default="sigmoid")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--expert-capacity-factor", type=float,
                   help="rows per expert of jax_ep_cf and no_comm as a factor of the mean "
                        "R*T*K/E (default: R * ceil(cf * T * K / E), a2a_cf's rows)")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"subset of {IMPLS}")
    p.add_argument("--breakdown", action="store_true",
                   help=f"also time the layer's parts separately: {', '.join(PARTS)}")
    p.add_argument("--breakdown-only", action="store_true",
                   help="time the parts only (no whole-layer --impls)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {PARTS}")
    p.add_argument("--iters", type=int, default=20, help="timed calls (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds (each times every impl, order rotated); "
                        "--iters calls are split over them")
    p.add_argument("--queued-reps", type=int, default=2,
                   help="back-to-back repetitions (10 queued calls each) per round")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices when no GPU is present")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--ragged-dot", choices=("default", "triton"), default="default",
                   help="GPU lowering of jax.lax.ragged_dot: XLA's (default) or the Pallas "
                        "Triton kernel (jax_ragged_dot_use_gpu_pallas_triton_lowering)")
    p.add_argument("--out", default=RESULTS, help="output directory")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fwd+bwd call per impl (kernel totals per GPU: "
                        "bench/trace_summary.py) into --out")
    p.add_argument("--profile-calls", type=int, default=1,
                   help="fwd+bwd calls queued back to back in the profile (>1 shows the "
                        "GPUs' idle time between steps)")
    p.add_argument("--dump-hlo", action="store_true",
                   help="write each impl's optimised fwd+bwd HLO (hlo_<impl>_fwd_bwd.txt) to "
                        "--out: maps the profile's fusion names to the ops they hold")
    p.add_argument("--overlap", action="store_true",
                   help=f"run {','.join(OVERLAP_IMPLS)}: the serial layer, split into two "
                        "micro-batches, and overlapped on a side stream (replaces --impls)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.overlap:
        args.impls = ",".join(OVERLAP_IMPLS)
    small = dict(tokens=64, hidden=128, experts=16, top_k=4, ffn=64, dtype="float32")
    full = dict(tokens=4096, hidden=7168, experts=256, top_k=8, ffn=2048, dtype="bfloat16")
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {IMPLS}")
    args.parts = [i.strip() for i in args.parts.split(",") if i.strip()]
    bad = [i for i in args.parts if i not in PARTS]
    if bad:
        p.error(f"unknown --parts {bad}; choose from {PARTS}")
    if args.breakdown_only:
        args.breakdown, args.impls = True, []
    if not args.breakdown:
        args.parts = []
    if args.iters < 20:
        p.error("--iters must be >= 20 (the medians are of at least 20 calls)")
    return args


def setup_platform(args):
    has_gpu = shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")
    if args.platform == "cpu" or (args.platform == "auto" and not has_gpu):
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={args.devices}").strip()


def local_ops(jax, jnp):
    """The communication-free stand-ins for ``jax_ep.dispatch`` / ``jax_ep.combine`` of
    ``no_comm`` (expert layout, one rank): each a gather, with custom VJPs that mirror
    jax_ep's (dispatch's backward is a combine, combine's a cached dispatch), so that no
    backward pass becomes a scatter-add.

    ``src_token [cap]``: the local token of each expert-layout row (T on padding rows,
    which read a zero row); ``row_of_slot [T, K]``: the row of each (token, slot)."""
    f32 = jnp.float32

    def pad_row(a):
        return jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])

    @jax.custom_vjp
    def dispatch(x, src_token, row_of_slot):
        return pad_row(x)[src_token]

    def dispatch_fwd(x, src_token, row_of_slot):
        return dispatch(x, src_token, row_of_slot), (src_token, row_of_slot)

    def dispatch_bwd(res, g):  # the unweighted combine of the rows' gradients
        _, row_of_slot = res
        return jnp.sum(g[row_of_slot].astype(f32), axis=1).astype(g.dtype), None, None

    dispatch.defvjp(dispatch_fwd, dispatch_bwd)

    @jax.custom_vjp
    def combine(y, w_rows, src_token, row_of_slot):
        rows = y[row_of_slot].astype(f32)  # [T, K, H]
        return jnp.sum(rows * w_rows[row_of_slot][..., None], axis=1).astype(y.dtype)

    def combine_fwd(y, w_rows, src_token, row_of_slot):
        return combine(y, w_rows, src_token, row_of_slot), (y, w_rows, src_token, row_of_slot)

    def combine_bwd(res, g):  # as jax_ep's: a cached dispatch of g, then the weights
        y, w_rows, src_token, _ = res
        rows = pad_row(g)[src_token].astype(f32)
        dy = (rows * w_rows[:, None]).astype(y.dtype)
        dw = jnp.sum(rows * y.astype(f32), axis=1)
        return dy, dw, None, None

    combine.defvjp(combine_fwd, combine_bwd)
    return dispatch, combine


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_platform(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    # the layer's own expert code: no_comm and the parts run exactly what jax_ep_cf runs
    from jax_ep.flax import MoE
    from jax_ep.moe import (batched_swiglu, from_expert_slots, ragged_swiglu, route,
                            to_expert_slots)

    if args.ragged_dot == "triton":
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    if not on_gpu:
        devices = devices[: args.devices]
    R = len(devices)
    T, H, E, K, F = args.tokens, args.hidden, args.experts, args.top_k, args.ffn
    L = E // R
    dtype = jnp.dtype(args.dtype)
    f32 = jnp.float32
    cf = args.capacity_factor
    if E % R:
        print(f"--experts={E} must be divisible by the {R} devices", file=sys.stderr)
        return 2
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    buffer = jax_ep.Buffer(mesh, "ep") if on_gpu else None
    side_buffer = (jax_ep.Buffer(mesh, "ep", side_stream=True)
                   if on_gpu and "jax_ep_cf_overlap" in args.impls else None)
    backend = buffer.backend if buffer is not None else "reference"
    print(f"{R} x {devices[0].device_kind}: T={T}/rank H={H} E={E} K={K} F={F} {dtype.name}, "
          f"jax_ep backend {backend}", flush=True)

    def make_layer(capacity, expert_capacity=None, exchange="auto", micro_batches=1,
                   buf=buffer):
        return MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
                   score_func=args.score_func, capacity=capacity,
                   expert_capacity=expert_capacity, exchange=exchange, buffer=buf,
                   backend="auto", micro_batches=micro_batches, dtype=dtype,
                   param_dtype=dtype, rngs=nnx.Rngs(args.seed))

    layer = make_layer(None)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    ep_cap = math.ceil(cf * T * K)
    a2a_C = max(1, math.ceil(cf * T * K / E))  # a2a_cf rows per (source rank, expert)
    if args.expert_capacity_factor is None:
        # same rows per expert as a2a_cf (R source ranks x C each): dense batched matmuls
        ep_expert_cap = R * a2a_C
    else:
        ep_expert_cap = max(1, math.ceil(args.expert_capacity_factor * R * T * K / E))
    graphdef_cf, _, _ = nnx.split(make_layer(ep_cap, ep_expert_cap), nnx.Param, ...)
    graphdef_cfx, _, _ = nnx.split(make_layer(ep_cap, ep_expert_cap, "expert"), nnx.Param, ...)
    # two micro-batches: capacities are per micro-batch (ceil(value / 2)), same totals
    graphdef_mb2, _, _ = nnx.split(make_layer(ep_cap, ep_expert_cap, micro_batches=2),
                                   nnx.Param, ...)
    graphdef_ovl, _, _ = nnx.split(make_layer(ep_cap, ep_expert_cap, micro_batches=2,
                                              buf=side_buffer), nnx.Param, ...)
    bias = layer.expert_bias[...]
    nc_cap = max(ep_cap, T * K)  # no_comm keeps every row (it has no dispatch capacity)

    key = jax.random.key(args.seed + 1)
    kx, kc = jax.random.split(key)
    tok_sharding = NamedSharding(mesh, P("ep", None))
    x = jax.device_put(jax.random.normal(kx, (R * T, H), jnp.float32).astype(dtype), tok_sharding)
    cot = jax.device_put(jax.random.normal(kc, (R * T, H), jnp.float32).astype(dtype),
                         tok_sharding)

    def routing(xl, router):
        logits = jnp.dot(xl.astype(jnp.float32), router)
        return route(logits, top_k=K, score_func=args.score_func, bias=bias,
                     normalize=layer.normalize_weights)

    # Every implementation runs the layer's own expert FFN code (jax_ep.moe): the same
    # matmuls (outputs in the activation dtype, f32 accumulation inside the GEMMs; silu *
    # up in f32), so only the token exchange and the expert batching differ.
    swiglu_ragged = ragged_swiglu
    swiglu_batched = batched_swiglu

    def a2a(v):
        return jax.lax.all_to_all(v, "ep", 0, 0, tiled=False)

    def a2a_cf_core(xl, topk_idx, topk_weights, expert_fn):
        """GShard: [E, C, H] per rank, C = ceil(cf*T*K/E) rows per expert; expert_fn maps
        the received [E/R, R*C, H] rows to outputs of the same shape."""
        C = a2a_C
        flat_e = topk_idx.reshape(-1)
        onehot = jax.nn.one_hot(flat_e, E, dtype=jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
        keep = pos < C
        slot = jnp.where(keep, flat_e * C + pos, E * C)
        tok = jnp.arange(T * K) // K
        send = jnp.zeros((E * C, H), dtype).at[slot].set(xl[tok], mode="drop")
        recv = a2a(send.reshape(R, L * C, H))  # [src rank, L*C, H]
        rows = recv.reshape(R, L, C, H).transpose(1, 0, 2, 3).reshape(L, R * C, H)
        y = expert_fn(rows).astype(dtype)
        back = a2a(y.reshape(L, R, C, H).transpose(1, 0, 2, 3).reshape(R, L * C, H))
        got = jnp.take(back.reshape(E * C, H), slot, axis=0, mode="fill", fill_value=0)
        w = jnp.where(keep, topk_weights.reshape(-1), 0.0)
        out = jnp.sum((got.astype(jnp.float32) * w[:, None]).reshape(T, K, H), axis=1)
        dropped = jax.lax.psum(jnp.sum(~keep, dtype=jnp.int32), "ep")
        return out.astype(dtype), dropped

    def a2a_cf_rank(xl, router, wg, wu, wd):
        r = routing(xl, router)
        return a2a_cf_core(xl, r.topk_idx, r.topk_weights,
                           lambda rows: swiglu_batched(rows, wg, wu, wd))

    def a2a_peer_rank(xl, router, wg, wu, wd):
        """Capacity T per peer: [R, T, H] slabs, receiver sorts rows for ragged_dot."""
        r = routing(xl, router)
        dest = r.topk_idx // L  # [T, K]
        ranks = jnp.arange(R)
        in_rank = jnp.any(dest[None] == ranks[:, None, None], axis=2)  # [R, T]
        send = jnp.where(in_rank[:, :, None], xl[None], jnp.zeros((), dtype))
        send_idx = jnp.where(dest[None] == ranks[:, None, None],
                             r.topk_idx[None] - ranks[:, None, None] * L, L)  # [R, T, K]
        send_w = jnp.where(send_idx < L, r.topk_weights[None], 0.0)
        recv, recv_idx, recv_w = a2a(send), a2a(send_idx), a2a(send_w)
        key = recv_idx.reshape(-1)  # [R*T*K], L = not here
        order = jnp.argsort(key, stable=True)
        gs = jnp.zeros((L,), jnp.int32).at[key].add(1, mode="drop")
        src_row = order // K
        rows = recv.reshape(R * T, H)[src_row]
        y = swiglu_ragged(rows, wg, wu, wd, gs)
        y = y * recv_w.reshape(-1)[order][:, None]
        per_token = jnp.zeros((R * T, H), jnp.float32).at[src_row].add(y)
        back = a2a(per_token.astype(dtype).reshape(R, T, H))
        out = jnp.sum(back.astype(jnp.float32), axis=0)
        return out.astype(dtype), jnp.zeros((), jnp.int32)

    local_dispatch, local_combine = local_ops(jax, jnp)

    def local_layout(topk_idx):
        """no_comm's expert layout of this rank's own rows: expert e -> local e % (E/R),
        rows grouped by local expert in token order, padded with zero rows to nc_cap."""
        n = T * K
        flat = (topk_idx % L).reshape(-1)
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)
        group_sizes = jnp.zeros((L,), jnp.int32).at[flat].add(1)
        src_token = jnp.concatenate([order // K, jnp.full((nc_cap - n,), T, jnp.int32)])
        row_of_slot = jnp.zeros((n,), jnp.int32).at[order].set(
            jnp.arange(n, dtype=jnp.int32)).reshape(T, K)
        return order, group_sizes, src_token, row_of_slot

    def no_comm_core(xl, topk_idx, topk_weights, expert_fn):
        """expert_fn(recv_x [nc_cap, H], group_sizes [L]) -> (y [nc_cap, H], dropped)."""
        order, group_sizes, src_token, row_of_slot = local_layout(topk_idx)
        w_rows = jnp.concatenate([topk_weights.reshape(-1)[order],
                                  jnp.zeros((nc_cap - T * K,), jnp.float32)])
        recv_x = local_dispatch(xl, src_token, row_of_slot)
        y, lost = expert_fn(recv_x, group_sizes)
        out = local_combine(y, w_rows, src_token, row_of_slot)
        return out, jax.lax.psum(lost, "ep")

    def slots_swiglu(recv_x, group_sizes, wg, wu, wd):
        """Exactly jax_ep_cf's expert step (jax_ep/moe/layer.py, expert_capacity path)."""
        slots, slot_map, lost = to_expert_slots(recv_x, group_sizes, group_sizes,
                                                 ep_expert_cap)
        y = from_expert_slots(batched_swiglu(slots, wg, wu, wd), slot_map)
        return y, lost

    def no_comm_rank(xl, router, wg, wu, wd):
        r = routing(xl, router)
        return no_comm_core(xl, r.topk_idx, r.topk_weights,
                            lambda rx, gs: slots_swiglu(rx, gs, wg, wu, wd))

    def baseline(fn):
        spec_e = P("ep", None, None)
        sm = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep", None), P(None, None), spec_e,
                                                   spec_e, spec_e),
                           out_specs=(P("ep", None), P()))

        def fwd(p, x):
            return sm(x, p["router"][...], p["w_gate"][...], p["w_up"][...],
                      p["w_down"][...])
        return fwd

    def layer_fwd(gdef):
        def fwd(p, x):
            out, stats = nnx.merge(gdef, p, rest)(x)
            return out, stats.dropped
        return fwd

    forwards = {"jax_ep": layer_fwd(graphdef), "jax_ep_cf": layer_fwd(graphdef_cf),
                "jax_ep_cf_expert": layer_fwd(graphdef_cfx),
                "jax_ep_cf_mb2": layer_fwd(graphdef_mb2),
                "jax_ep_cf_overlap": layer_fwd(graphdef_ovl),
                "a2a_cf": baseline(a2a_cf_rank), "a2a_peer": baseline(a2a_peer_rank),
                "no_comm": baseline(no_comm_rank)}
    method = {
        "timing": f"{args.rounds} interleaved rounds (each times every implementation, "
                  "the order rotated per round, so that GPU clock and temperature drift "
                  f"does not favour one); per round and implementation {args.warmup} "
                  f"warm-up and ceil({args.iters}/{args.rounds}) timed calls of "
                  "a jitted forward (fwd) and of jax.value_and_grad of sum(out * cot) with "
                  "respect to all parameters and x (fwd_bwd); wall time to block_until_ready "
                  "of each call; medians over all rounds' calls. fwd_bwd_ms_back_to_back: 10 "
                  "fwd+bwd calls queued before one block_until_ready (how a training loop "
                  "runs: the host launch of a step overlaps the previous step), per call, "
                  f"median of {args.queued_reps} per round, then over the rounds",
        "jax_ep": "jax_ep.flax.MoE, default capacity (never drops), ragged_dot experts",
        "jax_ep_cf": f"jax_ep.flax.MoE(capacity={ep_cap}, expert_capacity={ep_expert_cap}) "
                     "with its default exchange='rank': jax_ep dispatch (rank layout, one "
                     "row per (token, rank); never more than R*T rows) -> copy each row into "
                     "its local experts' [E/R, C, H] slots -> batched SwiGLU einsums -> "
                     "weighted sum of each row's local expert outputs -> jax_ep.combine "
                     "(one row per (token, rank))",
        "jax_ep_cf_expert": "the same layer with exchange='expert': jax_ep dispatch (expert "
                            "layout, one row per (token, local expert)) -> gather into "
                            "[E/R, C, H] slots -> batched SwiGLU -> gather back -> "
                            "jax_ep.combine with the routing weights",
        "expert_ffn": "all implementations use jax_ep.moe's SwiGLU (batched_swiglu / "
                      "ragged_swiglu): matmul outputs in the activation dtype (f32 "
                      "accumulation inside the GEMMs), silu * up in f32, so the backward "
                      "matmuls take bf16 operands at bf16",
        "jax_ep_cf_mb2": "jax_ep_cf with micro_batches=2 (capacities per micro-batch: "
                         "ceil(value / 2)), exchanges on XLA's compute stream",
        "jax_ep_cf_overlap": "jax_ep_cf_mb2 on jax_ep.Buffer(side_stream=True): the "
                             "exchanges run on the library's side stream, each placed "
                             "beside the other micro-batch's expert matmuls "
                             "(jax_ep.beside)",
        "a2a_cf": f"GShard style: pack [E, C={a2a_C}, H] per rank, jax.lax.all_to_all, "
                  "batched SwiGLU on [E/R, R*C, H], all_to_all back, weighted sum",
        "a2a_peer": "[R, T, H] slabs per peer over all_to_all, ragged_dot experts",
        "no_comm": "communication-free ceiling of jax_ep_cf: the same router, the same "
                   "expert code (jax_ep.moe to_expert_slots/batched_swiglu/"
                   f"from_expert_slots, {ep_expert_cap} rows per local expert), but each "
                   "rank sends its own (token, slot) rows to its own local expert e % (E/R) "
                   f"through a local gather into the same [{nc_cap}, H] expert-layout buffer "
                   "jax_ep.dispatch returns, and a local gather-and-weighted-sum replaces "
                   "jax_ep.combine (backward: gathers mirroring jax_ep's VJPs). Nothing "
                   "crosses devices but the psum of the dropped-row count. It bounds what "
                   "any token exchange can achieve with this expert computation: if "
                   "1.5 * no_comm > a2a_cf, a 1.5x speed-up over a2a_cf is out of reach by "
                   "faster communication alone.",
    }

    def timed(fn, *a):
        for _ in range(args.warmup):
            jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(1e3 * (time.perf_counter() - t0))
        return times

    def timed_back_to_back(fn, *a, steps=10, reps=5):
        """ms per call of `steps` calls queued back to back (as a training loop runs them:
        the host enqueues the next step while the GPUs run this one), median of reps."""
        jax.block_until_ready(fn(*a))
        per_call = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = None
            for _ in range(steps):  # only the last result is kept: a step's gradients are
                out = fn(*a)        # as large as the expert weights (10 of them do not fit)
            jax.block_until_ready(out)
            per_call.append(1e3 * (time.perf_counter() - t0) / steps)
            del out
        return statistics.median(per_call)

    results, outputs, compiled = {}, {}, {}
    for name in args.impls:  # compile and warm up every implementation first
        fwd = forwards[name]

        def loss(p, x, c, fwd=fwd):  # c: the cotangent, an argument (not an HLO constant)
            out, dropped = fwd(p, x)
            return jnp.sum(out.astype(jnp.float32) * c.astype(jnp.float32)), (out, dropped)

        fwd_jit = jax.jit(fwd)
        grad_jit = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        try:
            t0 = time.perf_counter()
            out, dropped = jax.block_until_ready(fwd_jit(params, x))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(grad_jit(params, x, cot))
            compile_bwd_s = time.perf_counter() - t0
        except Exception as err:  # e.g. out of memory at the full shape: record, go on
            print(f"  {name:12s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
            continue
        outputs[name] = np.asarray(out.astype(jnp.float32))
        compiled[name] = (fwd_jit, grad_jit)
        if args.dump_hlo:
            hlo = grad_jit.lower(params, x, cot).compile().as_text()
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"hlo_{name}_fwd_bwd.txt"), "w") as f:
                f.write(hlo)
        results[name] = {"dropped_rows": int(dropped),
                         "dropped_fraction": int(dropped) / (R * T * K),
                         "first_call_s": compile_s, "first_call_fwd_bwd_s": compile_bwd_s}
        del out

    # Timing in interleaved rounds, the order rotated each round: the GPUs' clocks move
    # with their power draw and temperature (a matmul-dense step draws 700 W and clocks
    # down), so timing one implementation after the other would favour whichever ran
    # on the cooler GPU.
    names = list(compiled)
    per_round = max(1, -(-args.iters // args.rounds))
    samples = {n: dict(fwd=[], fb=[], queued=[], round_fb=[], round_queued=[]) for n in names}
    saved_iters = args.iters
    args.iters = per_round
    try:
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)] if names else []
            for name in order:
                fwd_jit, grad_jit = compiled[name]
                smp = samples[name]
                try:
                    smp["fwd"] += timed(fwd_jit, params, x)
                    fb = timed(grad_jit, params, x, cot)
                    smp["fb"] += fb
                    smp["round_fb"].append(statistics.median(fb))
                    q = timed_back_to_back(grad_jit, params, x, cot, reps=args.queued_reps)
                    smp["queued"].append(q)
                except Exception as err:
                    results[name]["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
    finally:
        args.iters = saved_iters
    for name in names:
        smp, r = samples[name], results[name]
        if "error" in r or not smp["fb"]:
            continue
        r.update({
            "fwd_bwd_ms_median": statistics.median(smp["fb"]),
            "fwd_bwd_ms_min": min(smp["fb"]),
            "fwd_bwd_ms_mean": statistics.fmean(smp["fb"]),
            "fwd_bwd_ms_round_medians": smp["round_fb"],
            "fwd_ms_median": statistics.median(smp["fwd"]),
            "fwd_bwd_ms_back_to_back": statistics.median(smp["queued"]),
            "fwd_bwd_ms_back_to_back_rounds": smp["queued"],
            "iters": len(smp["fb"]),
            "rounds": args.rounds,
        })
        print(f"  {name:12s} fwd+bwd {r['fwd_bwd_ms_median']:9.2f} ms   "
              f"(back to back {r['fwd_bwd_ms_back_to_back']:8.2f} ms)   "
              f"fwd {r['fwd_ms_median']:9.2f} ms   dropped "
              f"{r['dropped_rows']}/{R * T * K} rows   rounds "
              f"{', '.join(f'{v:.2f}' for v in smp['round_fb'])}", flush=True)
    if args.profile:
        for name in names:
            trace_summary.print_summary(trace_summary.profile(
                compiled[name][1], (params, x, cot), args.out, f"moe_{name}_fwd_bwd",
                all_kernels=True, calls=args.profile_calls))
    compiled.clear()

    if "jax_ep" in outputs:  # sanity: implementations that drop nothing agree
        ref = outputs["jax_ep"]
        scale = float(np.max(np.abs(ref))) or 1.0
        for name, out in outputs.items():
            if name.startswith("no_comm"):  # a different function (experts remapped)
                continue
            diff = float(np.max(np.abs(out - ref))) / scale
            results[name]["max_rel_diff_vs_jax_ep"] = diff
            if results[name]["dropped_rows"] == 0 and name != "jax_ep":
                tol = 1e-4 if dtype == jnp.float32 else 5e-2
                status = "ok" if diff <= tol else "MISMATCH"
                print(f"  {name} vs jax_ep: max rel diff {diff:.2e} ({status})")
                results[name]["matches_jax_ep"] = diff <= tol
    base = results.get("a2a_cf", {})
    for name in ("jax_ep_cf", "jax_ep_cf_expert", "jax_ep"):
        r = results.get(name, {})
        if "fwd_bwd_ms_median" in r and "fwd_bwd_ms_median" in base:
            r["speedup_vs_a2a_cf"] = base["fwd_bwd_ms_median"] / r["fwd_bwd_ms_median"]
            r["speedup_vs_a2a_cf_back_to_back"] = (base["fwd_bwd_ms_back_to_back"] /
                                                   r["fwd_bwd_ms_back_to_back"])
            r["speedup_vs_a2a_cf_per_round"] = [  # same round: the closest in GPU state
                b / m for b, m in zip(base["fwd_bwd_ms_round_medians"],
                                      r["fwd_bwd_ms_round_medians"])]
            print(f"  {name} vs a2a_cf (fwd+bwd): {r['speedup_vs_a2a_cf']:.3f}x per call, "
                  f"{r['speedup_vs_a2a_cf_back_to_back']:.3f}x back to back (target 1.5x); "
                  f"per round {', '.join(f'{v:.3f}' for v in r['speedup_vs_a2a_cf_per_round'])}")
    serial = results.get("jax_ep_cf", {})
    for name in OVERLAP_IMPLS[1:]:  # the overlapped layer against the serial one
        r = results.get(name, {})
        if "fwd_bwd_ms_median" in r and "fwd_bwd_ms_median" in serial:
            r["speedup_vs_jax_ep_cf"] = serial["fwd_bwd_ms_median"] / r["fwd_bwd_ms_median"]
            r["speedup_vs_jax_ep_cf_per_round"] = [
                b / m for b, m in zip(serial["fwd_bwd_ms_round_medians"],
                                      r["fwd_bwd_ms_round_medians"])]
            print(f"  {name} vs jax_ep_cf (fwd+bwd): {r['speedup_vs_jax_ep_cf']:.3f}x; per "
                  f"round {', '.join(f'{v:.3f}' for v in r['speedup_vs_jax_ep_cf_per_round'])}")
    for base_name, nc_name in (("a2a_cf", "no_comm"),):
        if "fwd_bwd_ms_median" in results.get(nc_name, {}) and \
                "fwd_bwd_ms_median" in results.get(base_name, {}):
            nc = results[nc_name]["fwd_bwd_ms_median"]
            base = results[base_name]["fwd_bwd_ms_median"]
            results[nc_name][f"{base_name}_over_{nc_name}"] = base / nc
            faster = [n for n, r in results.items() if n.startswith("jax_ep")
                      and r.get("fwd_bwd_ms_median", float("inf")) < nc]
            if faster:  # its local stand-ins for the exchange cost more than the kernels
                print(f"  {nc_name} ({nc:.2f} ms) is slower than {', '.join(faster)}: not a "
                      "ceiling at this size (its local gathers and reduction stand in for the "
                      "exchange and cost more than jax_ep's kernels)")
                results[nc_name]["is_a_ceiling"] = False
                continue
            verdict = "out of reach" if 1.5 * nc > base else "not excluded"
            print(f"  ceiling: {base_name} / {nc_name} = {base / nc:.2f}x (fwd+bwd): 1.5x "
                  f"over {base_name} is {verdict} by faster communication alone")

    # ------------------------------------------------------------------ breakdown
    breakdown = {}
    expert_rows = {"jax_ep_cf": L * ep_expert_cap, "jax_ep_cf_expert": L * ep_expert_cap,
                   "no_comm": L * ep_expert_cap,
                   "a2a_cf": L * R * a2a_C}
    gflop_fwd = {k: 6.0 * n * H * F / 1e9 for k, n in expert_rows.items()}  # per rank
    if args.parts:
        espec = P("ep", None, None)

        def sharded_random(k, shape, dt, spec):
            return jax.jit(lambda k: jax.random.normal(k, shape, f32).astype(dt),
                           out_shardings=NamedSharding(mesh, spec))(k)

        # fixed routing of x (the layer's router and bias) for the exchange parts
        route_sm = jax.jit(jax.shard_map(
            lambda xl, rt: tuple(routing(xl, rt)[:2]), mesh=mesh,
            in_specs=(P("ep", None), P(None, None)), out_specs=(P("ep", None),) * 2))
        topk_idx, topk_w = route_sm(x, params["router"][...])
        gs_sm = jax.jit(jax.shard_map(lambda i: local_layout(i)[1], mesh=mesh,
                                      in_specs=P("ep", None), out_specs=P("ep")))
        group_sizes = gs_sm(topk_idx)  # [R * L], the no_comm grouping (same statistics)
        kk = jax.random.split(jax.random.key(args.seed + 2), 4)
        recv_x = sharded_random(kk[0], (R * nc_cap, H), dtype, P("ep", None))
        slots = sharded_random(kk[1], (R * L, ep_expert_cap, H), dtype, espec)
        w_params = (params["w_gate"][...], params["w_up"][...], params["w_down"][...])

        def identity_rows(rows):  # the barrier keeps XLA from cancelling a2a's transposes
            return jax.lax.optimization_barrier(rows)

        def jax_ep_dc(xl, w, idx):
            d = jax_ep.dispatch(xl, idx, w, num_experts=E, axis_name="ep", layout="expert",
                                max_recv_tokens=ep_cap, buffer=buffer, backend="auto")
            return jax_ep.combine(identity_rows(d.recv_x), d.handle, d.recv_topk_weights)

        def a2a_dc(xl, w, idx):
            return a2a_cf_core(xl, idx, w, identity_rows)[0]

        def local_dc(xl, w, idx):
            return no_comm_core(xl, idx, w,
                                lambda rx, gs: (identity_rows(rx), jnp.zeros((), jnp.int32)))[0]

        def expert_slots(rx, gs):  # jax_ep_cf's slot gathers there and back, identity experts
            s, slot_map, _ = to_expert_slots(rx, gs, gs, ep_expert_cap)
            return from_expert_slots(identity_rows(s), slot_map)

        def router_part(xl, rt):
            r = routing(xl, rt)
            return r.topk_weights

        tok, w_spec = P("ep", None), P("ep", None)
        # name: (per-rank fn, differentiated args, their specs, constant args, their specs,
        #        out spec, what it is)
        exchange = ((x, topk_w), (tok, w_spec), (topk_idx,), (P("ep", None),), tok)
        part_defs = {
            "router": (router_part, (x, params["router"][...]), (tok, P(None, None)), (), (),
                       w_spec, "logits = x @ router (f32), sigmoid/softmax scores, top-k "
                       "with the bias, normalised weights; the loss uses the weights"),
            "jax_ep_dispatch_combine": (jax_ep_dc,) + exchange + (
                f"jax_ep.dispatch(layout='expert', max_recv_tokens={ep_cap}) then "
                "jax_ep.combine(recv_x, handle, recv_topk_weights): jax_ep_cf's exchange "
                "with identity experts, fixed routing of x",),
            "a2a_dispatch_combine": (a2a_dc,) + exchange + (
                "a2a_cf's pack, all_to_all, [E/R, R*C, H] transposes, all_to_all back and "
                "weighted sum, with identity experts",),
            "local_dispatch_combine": (local_dc,) + exchange + (
                "no_comm's local stand-in for dispatch and combine, identity experts",),
            "expert_slots": (expert_slots, (recv_x,), (tok,), (group_sizes,), (P("ep"),), tok,
                             f"jax_ep_cf's gather of the [{nc_cap}, H] expert layout into "
                             f"[E/R, {ep_expert_cap}, H] slots and gather back (no matmuls; "
                             "both backward passes gathers too)"),
            "expert_ffn": (batched_swiglu, (slots,) + w_params, (espec,) * 4, (), (), espec,
                           f"the layer's batched SwiGLU on [E/R={L}, {ep_expert_cap}, H] "
                           "(jax_ep.moe.batched_swiglu: matmul outputs in the activation "
                           "dtype, silu * up in f32)"),
        }
        print(f"breakdown (per-rank work inside shard_map; {args.iters} calls each):",
              flush=True)
        for name in args.parts:
            fn, diff, dspecs, const, cspecs, ospec, what = part_defs[name]
            method[f"part:{name}"] = what
            sm = jax.shard_map(fn, mesh=mesh, in_specs=tuple(dspecs) + tuple(cspecs),
                               out_specs=ospec)
            try:
                shape = jax.eval_shape(sm, *diff, *const)
                c = sharded_random(kk[3], shape.shape, shape.dtype, ospec)

                def part_loss(d, cst, c, sm=sm):
                    out = sm(*d, *cst)
                    return jnp.sum(out.astype(f32) * c.astype(f32))

                fwd_jit = jax.jit(sm)
                grad_jit = jax.jit(jax.value_and_grad(part_loss))
                t0 = time.perf_counter()
                out = jax.block_until_ready(fwd_jit(*diff, *const))
                first = time.perf_counter() - t0
                fwd_times = timed(fwd_jit, *diff, *const)
                fb_times = timed(grad_jit, diff, const, c)
            except Exception as err:
                print(f"  {name:24s} FAILED: {type(err).__name__}: {str(err)[:300]}",
                      flush=True)
                breakdown[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
                continue
            rec = {"fwd_ms_median": statistics.median(fwd_times),
                   "fwd_bwd_ms_median": statistics.median(fb_times),
                   "fwd_bwd_ms_min": min(fb_times), "first_call_s": first}
            extra = ""
            if name.startswith("expert_ffn"):
                gf = gflop_fwd["jax_ep_cf"]
                rec["gflop_fwd_per_rank"] = gf
                rec["tflops_fwd"] = gf / rec["fwd_ms_median"]
                rec["tflops_fwd_bwd"] = 3 * gf / rec["fwd_bwd_ms_median"]
                extra = (f"   {rec['tflops_fwd']:.4g} / {rec['tflops_fwd_bwd']:.4g} "
                         "TFLOP/s per GPU (fwd / fwd+bwd)")
            if name.endswith("dispatch_combine"):  # identity experts: out = x * sum(w)
                ref = np.asarray(x.astype(f32)) * np.asarray(topk_w).sum(1, keepdims=True)
                got = np.asarray(out.astype(f32))
                rec["identity_max_rel_diff"] = float(np.max(np.abs(got - ref)) /
                                                     (np.max(np.abs(ref)) or 1.0))
                extra = f"   out vs x*sum(w): max rel diff {rec['identity_max_rel_diff']:.1e}"
                if name.startswith("a2a"):
                    extra += " (a2a_cf drops rows past C)"
            breakdown[name] = rec
            print(f"  {name:24s} fwd+bwd {rec['fwd_bwd_ms_median']:9.3f} ms   fwd "
                  f"{rec['fwd_ms_median']:9.3f} ms{extra}", flush=True)
            del out

        def total(names):
            if all("fwd_bwd_ms_median" in breakdown.get(n, {}) for n in names):
                return {k: sum(breakdown[n][k] for n in names)
                        for k in ("fwd_ms_median", "fwd_bwd_ms_median")}
            return None

        sums = {"jax_ep_cf": ("router", "jax_ep_dispatch_combine", "expert_slots",
                              "expert_ffn"),
                "a2a_cf": ("router", "a2a_dispatch_combine", "expert_ffn"),
                "no_comm": ("router", "local_dispatch_combine", "expert_slots", "expert_ffn")}
        for impl, names in sums.items():
            s = total(names)
            if s is None:
                continue
            breakdown[f"sum_for_{impl}"] = dict(s, parts=list(names))
            whole = results.get(impl, {}).get("fwd_bwd_ms_median")
            print(f"  sum of parts for {impl:9s} fwd+bwd {s['fwd_bwd_ms_median']:9.3f} ms   "
                  f"fwd {s['fwd_ms_median']:9.3f} ms"
                  + (f"   (whole layer {whole:.3f} ms)" if whole else ""), flush=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "moe_layer_fwd_bwd",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "num_devices": R,
        "host": platform.node(),
        "jax_version": jax.__version__,
        "jax_ep_backend": backend,
        "num_sms": getattr(buffer, "num_sms", None) if backend == "cuda" else None,
        "shape": {"tokens_per_rank": T, "hidden": H, "experts": E, "top_k": K, "ffn": F,
                  "dtype": dtype.name, "score_func": args.score_func},
        "ragged_dot_lowering": args.ragged_dot,
        "capacity_factor": cf,
        "expert_capacity_factor": args.expert_capacity_factor,
        "jax_ep_cf_capacity_rows": ep_cap,
        "jax_ep_cf_rows_per_expert": ep_expert_cap,
        "a2a_cf_rows_per_expert": a2a_C,
        "no_comm_capacity_rows": nc_cap,
        "expert_rows_per_rank": expert_rows,
        "expert_gflop_fwd_per_rank": gflop_fwd,
        "method": method,
        "results": results,
        "breakdown": breakdown,
    }
    os.makedirs(args.out, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in devices[0].device_kind.lower())
    stem = os.path.join(args.out, f"moe_layer_{tag}_x{R}_{now.strftime('%Y%m%dT%H%M%SZ')}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {stem}.json")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    ok = [n for n in args.impls if "fwd_bwd_ms_median" in results.get(n, {})]
    parts_ok = [n for n in args.parts if "fwd_bwd_ms_median" in breakdown.get(n, {})]
    if plt is not None and (ok or parts_ok):
        panels = [p for p in (ok, parts_ok) if p]
        fig, axes = plt.subplots(1, len(panels), squeeze=False,
                                 figsize=(6 if len(panels) == 1 else 12, 3.8))
        axes = axes[0]
        i = 0
        if ok:
            ax = axes[i]
            i += 1
            vals = [results[n]["fwd_bwd_ms_median"] for n in ok]
            colors = ["tab:green" if n.startswith("jax_ep") else
                      "tab:blue" if n.startswith("no_comm") else "tab:gray" for n in ok]
            bars = ax.bar(ok, vals, color=colors)
            ax.bar_label(bars, fmt="%.1f")
            ax.set_ylabel("fwd+bwd ms (median)")
            ax.set_title(f"MoE layer, {R}x {devices[0].device_kind}, T={T} H={H} E={E} "
                         f"K={K}", fontsize=9)
        if parts_ok:
            ax = axes[i]
            fb = [breakdown[n]["fwd_bwd_ms_median"] for n in parts_ok]
            fw = [breakdown[n]["fwd_ms_median"] for n in parts_ok]
            ys = np.arange(len(parts_ok))
            ax.barh(ys, fb, color="tab:orange", label="fwd+bwd")
            ax.barh(ys, fw, color="tab:olive", label="fwd", height=0.4)
            for y_, v in zip(ys, fb):
                ax.text(v, y_, f" {v:.2f}", va="center", fontsize=7)
            ax.set_yticks(ys, parts_ok, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("ms (median)")
            ax.legend(fontsize=7)
            ax.set_title("parts (per rank)", fontsize=9)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
        print(f"wrote {stem}.png")
    bad = [r for r in list(results.values()) + list(breakdown.values()) if "error" in r]
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
