"""Decode step of the MoE layer: what runs between the low-latency dispatch's send and receive.

``MoE(..., shared_ffn_hidden=Fs)(x, low_latency=True)`` issues
``jax_ep.low_latency_dispatch_send``, runs the shared expert, then
``low_latency_dispatch_recv`` (jax_ep/moe/layer.py): the shared expert's matmuls compute
while the tokens travel. This profiles one decode step and lists, per GPU, the kernels
that ran between the send kernel and the receive kernel; it times the step beside its
baseline, the same step without the shared expert plus the shared expert alone (overlap
saves at most the smaller of the two, and only when the transfer takes time: with one
rank every row is local, so the timings are fixed costs, not NVLink figures).

Run::

    PYTHONPATH=. python3 bench/decode_overlap.py                 # GPUs
    PYTHONPATH=. python3 bench/decode_overlap.py --small         # CPU, reference backend
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402

SEND_RECV_KERNEL = "ll_dispatch_kernel"  # one kernel, launched for the send, then the receive


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shape (8 CPU devices)")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--shared-ffn", type=int, default=2048)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.small:
        args.tokens, args.hidden, args.experts, args.ffn, args.shared_ffn = 8, 64, 16, 64, 64
        args.top_k = 4
    return args


def between_send_and_recv(kernels):
    """Kernels (name, start, duration) that started after the first send kernel ended and
    before the receive kernel (the next launch of the same kernel) started."""
    launches = [i for i, k in enumerate(kernels) if SEND_RECV_KERNEL in k[0]]
    if len(launches) < 2:
        return None
    send, recv = kernels[launches[0]], kernels[launches[1]]
    return [k for k in kernels[launches[0] + 1: launches[1]]
            if k[1] >= send[1] + send[2] and k[1] + k[2] <= recv[1]]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_ep
    from jax_ep.flax import MoE
    from jax_ep.moe import swiglu

    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    R = len(devices)
    T, H, E, K, F, Fs = (args.tokens, args.hidden, args.experts, args.top_k, args.ffn,
                         args.shared_ffn)
    mesh = jax.make_mesh((R,), ("ep",), devices=devices)
    buffer = (jax_ep.Buffer(mesh, "ep", num_nvl_bytes=jax_ep.Buffer.get_low_latency_size_hint(
        T, H, E, R)) if on_gpu else None)
    backend = "cuda" if on_gpu else "reference"

    def layer(shared):
        return MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
                   shared_ffn_hidden=shared, score_func="sigmoid", buffer=buffer,
                   backend=backend, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                   rngs=nnx.Rngs(0))

    with_shared, without_shared = layer(Fs), layer(0)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (R * T, H), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep")))
    step = nnx.jit(lambda m, x: m(x, low_latency=True, max_tokens_per_rank=T)[0])
    shared_w = tuple(getattr(with_shared, n)[...] for n in ("shared_gate", "shared_up",
                                                            "shared_down"))
    shared_only = jax.jit(lambda x, w: swiglu(x, *w))

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(1e6 * (time.perf_counter() - t0))
        return statistics.median(times)

    us = {"step_with_shared_expert": timed(step, with_shared, x),
          "step_without_shared_expert": timed(step, without_shared, x),
          "shared_expert_alone": timed(shared_only, x, shared_w)}
    serial = us["step_without_shared_expert"] + us["shared_expert_alone"]
    us["serial_sum"] = serial
    ratio = serial / us["step_with_shared_expert"]
    print(f"{R} x {devices[0].device_kind}: decode step {us['step_with_shared_expert']:.1f} us "
          f"with the shared expert between send and receive; without it "
          f"{us['step_without_shared_expert']:.1f} us + shared expert alone "
          f"{us['shared_expert_alone']:.1f} us = {serial:.1f} us ({ratio:.3f}x)")
    summary = trace_summary.profile(lambda m, x: step(m, x), (with_shared, x), args.out,
                                    f"decode_overlap_{R}x", all_kernels=True)
    between = {}
    for gpu, g in summary.get("gpus", {}).items():
        found = between_send_and_recv(g.get("kernels_in_order", []))
        between[gpu] = found
        names = [(k[0][:60], trace_summary.category(k[0])) for k in found or []]
        print(f"  {gpu}: between send and receive: {names if found is not None else 'n/a'}")
    matmuls = [k for ks in between.values() for k in ks or []
               if trace_summary.category(k[0]) == "matmul"]
    if on_gpu:
        print(f"  matmul kernels between send and receive: {len(matmuls)} "
              f"({'overlap shown' if matmuls else 'NOT shown'})")
    record = dict(
        command="python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=f"{R}x {devices[0].device_kind}", jax=jax.__version__,
        shape=dict(T=T, H=H, E=E, K=K, F=F, shared_ffn=Fs, dtype="bfloat16"),
        median_us=us, serial_over_overlapped=ratio,
        fixed_cost=("one rank: every row is local, nothing travels; timings are fixed "
                    "costs" if R == 1 else None),
        kernels_between_send_and_recv=between,
        matmuls_between_send_and_recv=len(matmuls))
    name = f"decode_overlap-{R}x{devices[0].device_kind.replace(' ', '-')}.json"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, name)}")
    if buffer is not None:
        buffer.close()
    return 0 if (matmuls or not on_gpu) else 1


if __name__ == "__main__":
    sys.exit(main())
