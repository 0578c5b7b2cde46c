"""Trains a tiny byte-level MoE language model with jax_ep's Flax layer.

Two transformer blocks (causal self-attention + :class:`jax_ep.flax.MoE` FFN) on the
built-in corpus ``examples/data/corpus.txt``, optimised with optax AdamW. The batch is
sharded over the expert-parallel axis ``"ep"`` (each rank holds ``batch / R``
sequences and ``E / R`` experts); the MoE layers move tokens with ``jax_ep.dispatch``
and ``jax_ep.combine``; the routing bias is balanced without an auxiliary loss.

Without a GPU it runs on ``--devices`` simulated CPU devices (default 8). On GPUs it
uses every visible GPU, creates ``jax_ep.Buffer(mesh, "ep")`` and the CUDA kernels
(``backend="auto"``).

Run::

    PYTHONPATH=. python3 examples/train_moe.py                  # 8 simulated CPU devices
    PYTHONPATH=. python3 examples/train_moe.py --steps 100 --devices 4
    PYTHONPATH=. python3 examples/train_moe.py --steps 3        # smoke run

Under ``jax.distributed`` (one process per device, the same command in every process;
CPU processes use gloo collectives)::

    python3 examples/train_moe.py --coordinator host0:12345 --num-processes 2 \
        --process-id 0            # and --process-id 1 in the second process

It prints the first and last loss and writes a PNG of the loss curve and of each
layer's expert load (``--plot``; needs matplotlib). Runs of at least 200 steps (the
default is 300) exit with status 1 if the loss did not fall by 20%; shorter runs only
report it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np  # before jax is fine: only jax reads the platform flags

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")
CHECK_STEPS = 200  # fewer steps are a smoke run: the loss need not have fallen yet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"Runs of --steps >= {CHECK_STEPS} fail (exit 1) if "
                                "the loss did not fall by 20%.")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (bytes)")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices when no GPU is present")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128, help="expert FFN width")
    p.add_argument("--shared-ffn", type=int, default=64, help="shared expert width (0: none)")
    p.add_argument("--score-func", choices=("softmax", "sigmoid"), default="sigmoid")
    p.add_argument("--moe-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the MoE experts and of the tokens jax_ep moves")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bias-rate", type=float, default=1e-2,
                   help="aux-loss-free balancing rate (0: off)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the load-balancing auxiliary loss (0: off)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="train_moe.png",
                   help="PNG of the loss curve and expert load ('' for none)")
    d = p.add_argument_group("jax.distributed (one process per device)")
    d.add_argument("--coordinator", help="host:port of process 0")
    d.add_argument("--num-processes", type=int, default=1)
    d.add_argument("--process-id", type=int, help="this process (0 .. num-processes-1)")
    d.add_argument("--local-device", type=int, help="GPU index of this process")
    args = p.parse_args(argv)
    if args.num_processes > 1 and (args.coordinator is None or args.process_id is None):
        p.error("--num-processes > 1 needs --coordinator and --process-id")
    return args


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def setup_platform(args) -> None:
    """Chooses CPU or GPU before jax is imported (simulated devices need XLA_FLAGS)."""
    use_cpu = args.platform == "cpu" or (args.platform == "auto" and not _has_gpu())
    if use_cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        per_process = 1 if getattr(args, "num_processes", 1) > 1 else args.devices
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={per_process}").strip()


def join_job(args) -> None:
    """Joins the jax.distributed job of ``--num-processes`` processes (if more than one)."""
    if getattr(args, "num_processes", 1) <= 1:
        return
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = None if args.local_device is None else [args.local_device]
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               local_device_ids=local)


# Model code below imports jax lazily (after setup_platform) through these globals.
jax = jnp = nnx = optax = jax_ep = MoE = place_on_mesh = None


def _imports():
    global jax, jnp, nnx, optax, jax_ep, MoE, place_on_mesh
    import jax as _jax
    import jax.numpy as _jnp
    import optax as _optax
    from flax import nnx as _nnx

    import jax_ep as _jax_ep
    from jax_ep.flax import MoE as _MoE, place_on_mesh as _place_on_mesh
    jax, jnp, nnx, optax, jax_ep, MoE = _jax, _jnp, _nnx, _optax, _jax_ep, _MoE
    place_on_mesh = _place_on_mesh


def build_model_classes():
    """Defines the model (needs the jax imports, hence a function)."""

    class CausalSelfAttention(nnx.Module):
        """Multi-head causal self-attention with an optional KV cache for decoding."""

        def __init__(self, dim, heads, rngs):
            if dim % heads:
                raise ValueError(f"dim={dim} must be divisible by heads={heads}")
            self.heads, self.head_dim = heads, dim // heads
            self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
            self.out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

        def _split(self, x):
            b, s, _ = x.shape
            q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
            shape = (b, s, self.heads, self.head_dim)
            return q.reshape(shape), k.reshape(shape), v.reshape(shape)

        def _attend(self, q, k, v, mask):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(float(self.head_dim))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits, axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
            return self.out(o.reshape(o.shape[:2] + (-1,)))

        def __call__(self, x):
            q, k, v = self._split(x)
            s = x.shape[1]
            mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
            return self._attend(q, k, v, mask)

        def decode(self, x, cache, pos):
            """One token per sequence: ``x [B, 1, D]``; ``cache = (k, v) [B, S, h, d]``."""
            q, k, v = self._split(x)
            ck = jax.lax.dynamic_update_slice_in_dim(cache[0], k, pos, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache[1], v, pos, axis=1)
            mask = (jnp.arange(ck.shape[1]) <= pos)[None, None, None, :]
            return self._attend(q, ck, cv, mask), (ck, cv)

    class Block(nnx.Module):
        def __init__(self, dim, heads, moe_kwargs, rngs):
            self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
            self.attn = CausalSelfAttention(dim, heads, rngs)
            self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
            self.moe = MoE(hidden=dim, rngs=rngs, **moe_kwargs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x))
            y, stats = self.moe(self.norm2(x))
            return x + y, stats

        def decode(self, x, cache, pos):
            a, cache = self.attn.decode(self.norm1(x), cache, pos)
            x = x + a
            y, stats = self.moe(self.norm2(x), low_latency=True)
            return x + y, cache, stats

    class TinyMoELM(nnx.Module):
        """Byte-level LM: embedding, ``layers`` blocks (attention + MoE), tied-free head."""

        def __init__(self, *, seq, dim, heads, layers=2, rngs, **moe_kwargs):
            self.seq = seq
            self.embed = nnx.Embed(256, dim, rngs=rngs)
            self.pos = nnx.Embed(seq, dim, rngs=rngs)
            self.blocks = nnx.List([Block(dim, heads, moe_kwargs, rngs) for _ in range(layers)])
            self.norm = nnx.RMSNorm(dim, rngs=rngs)
            self.head = nnx.Linear(dim, 256, use_bias=False, rngs=rngs)

        def __call__(self, tokens):
            """``tokens [B, S]`` → logits ``[B, S, 256]`` and each layer's MoE stats."""
            x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
            stats = []
            for block in self.blocks:
                x, s = block(x)
                stats.append(s)
            return self.head(self.norm(x)), stats

        def init_cache(self, batch):
            blk = self.blocks[0].attn
            shape = (batch, self.seq, blk.heads, blk.head_dim)
            return [(jnp.zeros(shape), jnp.zeros(shape)) for _ in self.blocks]

        def decode(self, token, caches, pos):
            """One step: ``token [B]`` at position ``pos`` → logits ``[B, 256]``."""
            x = self.embed(token[:, None]) + self.pos(pos[None])[None]
            new = []
            for block, cache in zip(self.blocks, caches):
                x, cache, _ = block.decode(x, cache, pos)
                new.append(cache)
            return self.head(self.norm(x))[:, 0], new

        def update_bias(self, stats, rate):
            for block, s in zip(self.blocks, stats):
                block.moe.update_bias(s.load, rate)

    return TinyMoELM


def expert_parallel_setup(args):
    """Devices, an "ep" mesh over them and (on GPUs) a jax_ep.Buffer; None (after saying
    why) when ``args.batch`` does not split over the devices."""
    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    if not on_gpu and jax.process_count() == 1:
        devices = devices[: args.devices]
    if args.batch % len(devices):
        print(f"--batch={args.batch} must be divisible by the {len(devices)} devices",
              file=sys.stderr)
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    return devices, mesh, (jax_ep.Buffer(mesh, "ep") if on_gpu else None)


def _host(a):
    """A replicated result as NumPy (process 0's copy: works under jax.distributed)."""
    return np.asarray(a.addressable_data(0))


def save_plot(path, losses, loads):
    """Loss per step and, per MoE layer, each expert's share of the routed slots.

    Returns why it wrote nothing, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install '.[flax]')"
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    loads = np.asarray(loads, np.float64)  # [steps, layers, experts]
    steps, layers, experts = loads.shape
    fig, axes = plt.subplots(1, 1 + layers, figsize=(5 * (1 + layers), 4))
    x = np.arange(1, steps + 1)
    axes[0].plot(x, losses, lw=0.8, label="loss")
    if steps >= 10:
        w = max(1, steps // 20)
        axes[0].plot(x[w - 1:], np.convolve(losses, np.ones(w) / w, "valid"),
                     label=f"mean of {w} steps")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="training loss")
    axes[0].legend()
    share = loads / np.maximum(loads.sum(-1, keepdims=True), 1)
    for layer in range(layers):
        ax = axes[1 + layer]
        ax.stackplot(x, share[:, layer].T, labels=[f"expert {e}" for e in range(experts)])
        for k in range(1, experts):  # the balanced split
            ax.axhline(k / experts, color="k", lw=0.3, ls=":")
        ax.set(xlabel="step", ylabel="share of routed (token, expert) slots",
               title=f"expert load, MoE layer {layer}", xlim=(1, max(steps, 2)), ylim=(0, 1))
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_platform(args)
    _imports()
    join_job(args)

    setup = expert_parallel_setup(args)
    if setup is None:
        return 2
    devices, mesh, buffer = setup
    num_ranks = len(devices)
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    say(f"devices: {num_ranks} x {devices[0].device_kind} ({devices[0].platform}"
        f"{f', {jax.process_count()} processes' if jax.process_count() > 1 else ''}); "
        f"jax_ep backend: {buffer.backend if buffer else 'reference'}")

    data = np.frombuffer(open(CORPUS, "rb").read(), dtype=np.uint8)
    rng = np.random.default_rng(args.seed)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))

    def get_batch():
        # every process draws the same global batch and places its own devices' rows
        starts = rng.integers(0, len(data) - args.seq - 1, size=args.batch)
        chunk = np.stack([data[s: s + args.seq + 1] for s in starts]).astype(np.int32)
        return tuple(jax.make_array_from_callback(a.shape, batch_sharding, lambda i, a=a: a[i])
                     for a in (chunk[:, :-1], chunk[:, 1:]))

    TinyMoELM = build_model_classes()
    model = TinyMoELM(seq=args.seq, dim=args.dim, heads=args.heads, ffn_hidden=args.ffn,
                      num_experts=args.experts, top_k=args.top_k, mesh=mesh,
                      shared_ffn_hidden=args.shared_ffn, score_func=args.score_func,
                      dtype=jnp.dtype(args.moe_dtype), buffer=buffer, backend="auto",
                      rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)
    # the MoE experts are on the mesh already; replicating the rest before the first step
    # gives it the shardings of later steps: one compilation instead of two
    place_on_mesh(mesh, model, optimizer)

    @nnx.jit
    def train_step(model, optimizer, inputs, targets):
        def loss_fn(model):
            logits, stats = model(inputs)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            if args.aux_weight:
                loss = loss + args.aux_weight * sum(s.aux_loss for s in stats)
            return loss, stats

        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if args.bias_rate:
            model.update_bias(stats, args.bias_rate)
        dropped = sum(s.dropped for s in stats)
        return loss, dropped, jnp.stack([s.load for s in stats])

    progress = None
    if main_process:
        try:
            from tqdm import tqdm
            progress = tqdm(total=args.steps, unit="step", disable=None)  # None: tty only
            if not progress.disable:
                say = progress.write
        except ImportError:
            pass

    tokens_per_step = args.batch * args.seq
    losses, loads = [], []
    t0 = time.perf_counter()
    t_log = t0
    for step in range(args.steps):
        loss, dropped, load = train_step(model, optimizer, *get_batch())
        losses.append(float(_host(loss)))  # blocks: keeps the timing honest
        loads.append(_host(load))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if step == 0:
            say(f"step {step:4d}  loss {losses[-1]:.4f}  (compiled in "
                f"{time.perf_counter() - t0:.1f}s)")
            t_log = time.perf_counter()
        elif (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.perf_counter()
            steps_done = args.log_every if (step + 1) % args.log_every == 0 else \
                (step + 1) % args.log_every
            if step + 1 == args.log_every:
                steps_done -= 1  # step 0 (compile) is not in this window
            tps = steps_done * tokens_per_step / max(now - t_log, 1e-9)
            say(f"step {step + 1:4d}  loss {np.mean(losses[-steps_done:]):.4f}  "
                f"tokens/s {tps:9.0f}  dropped {int(_host(dropped))}  "
                f"last-layer load {loads[-1][-1].tolist()}")
            t_log = now
    if progress is not None:
        progress.close()
    say = print if main_process else say

    elapsed = time.perf_counter() - t0
    first = losses[0]
    last = float(np.mean(losses[-min(10, len(losses)):]))
    drop = 100 * (1 - last / first)
    say(f"first loss {first:.4f}  last loss {last:.4f} (mean of last "
        f"{min(10, len(losses))} steps)  drop {drop:.1f}%  total {elapsed:.1f}s")
    if main_process and args.plot:
        why_not = save_plot(args.plot, losses, loads)
        say(f"plot: {os.path.abspath(args.plot)}" if why_not is None else
            f"no plot: {why_not}")
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    if args.steps < CHECK_STEPS:
        say(f"done: {args.steps} steps (a smoke run; the 20% loss-drop check needs "
            f"--steps >= {CHECK_STEPS})")
        return 0
    if not last <= 0.8 * first:
        print("FAIL: the loss did not fall by 20%", file=sys.stderr)
        return 1
    say(f"OK: the loss fell by {drop:.0f}% (>= 20%) in {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
