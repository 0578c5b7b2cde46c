"""CUDA intranode kernels == reference backend (bitwise dispatch, <=1e-6 combine).

Every test runs at each EP size R of ``h.RANKS`` that the run has ranks for (tests/conftest.py):
R GPUs of one process, or R processes sharing the GPUs there are (tests/multiprocess.py).
The reference backend runs on this process's CPU devices. Fresh random routing every run
(the seed is printed so a failure can be replayed with JAX_EP_TEST_SEED).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness as h

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"tests/gpu seed: JAX_EP_TEST_SEED={SEED}")


def _rng(*salt):
    return h.rng(SEED, *salt)


def _dispatch_fn(backend, R, E, layout, cap, align, fp8, buf=None):
    """``x`` is the FP8 pair when ``fp8 is True``; ``fp8="cast"``: bf16 ``x``, cast in the
    CUDA kernel (cast_fp8=True)."""
    if backend == "cuda" and buf is None:
        buf = h.buffer(R)

    def f(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=h.AXIS, layout=layout,
                            max_recv_tokens=cap, expert_alignment=align, buffer=buf,
                            backend=backend, cast_fp8=fp8 == "cast")
        return r._replace(handle=r.handle.arrays)
    return f


def compare_dispatch(R, T, H, K, E, layout="rank", cap=None, align=1, fp8=False,
                     idx=None, w=None, dtype=jnp.bfloat16, tag="", buf=None):
    rng = _rng("dispatch", R, T, H, K, E, layout, cap, align, fp8, tag)
    if idx is None:
        idx, w = h.routing(rng, R, T, K, E)
    if w is None:
        w = rng.random(idx.shape).astype(np.float32)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    args = (x.astype(dtype), idx, w)
    # FP8: the reference moves the pair XLA casts on the GPU (the kernel's cast equals it)
    ref_args = (h.gpu_fp8_cast(args[0]),) + args[1:] if fp8 else args
    want = h.run_reference(_dispatch_fn("reference", R, E, layout, cap, align, bool(fp8)), R,
                           *ref_args)
    got = h.run(_dispatch_fn("cuda", R, E, layout, cap, align, fp8, buf), R,
                *(ref_args if fp8 is True else args))
    got_fields, want_fields = _result_fields(got), _result_fields(want)
    # Every result, and the handle fields both backends have (the internode handle keeps
    # the node hops' routing instead of send_pos).
    names = [n for n in want_fields if n in got_fields]
    assert [n for n in want_fields if not n.startswith("handle.")] == \
        [n for n in names if not n.startswith("handle.")]
    assert {"handle.recv_src_rank", "handle.recv_src_token", "handle.recv_src_slot"} <= set(names)
    for name in names:
        a, b = got_fields[name], want_fields[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if not np.array_equal(h.bits(a), h.bits(b)):
            bad = np.argwhere(h.bits(a) != h.bits(b))
            raise AssertionError(f"{name} differs at {len(bad)} places, first {bad[:5].tolist()}"
                                 f" (seed {SEED})")
    return got, args, (x, idx, w)


def _result_fields(r) -> dict:
    """A DispatchResult (handle as its arrays) as name -> host array."""
    xs = r.recv_x if isinstance(r.recv_x, tuple) else (r.recv_x,)
    out = {f"recv_x[{i}]": a for i, a in enumerate(xs)}
    out.update((name, getattr(r, name)) for name in r._fields[1:7])
    out.update((f"handle.{name}", getattr(r.handle, name)) for name in r.handle._fields
               if not isinstance(getattr(r.handle, name), tuple))
    return out


# ----------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("fp8", [False, True, "cast"])
def test_dispatch_matches_reference(R, layout, fp8):
    compare_dispatch(R, T=512, H=2048, K=8, E=64, layout=layout, fp8=fp8,
                     align=8 if layout == "expert" else 1)


def _routing_case(case, rng, R, T, K, E):
    """(T, idx, w) of the routing cases shared by the edge-case tests (None: random)."""
    idx = w = None
    if case == "T1":
        T = 1
    elif case == "T0":
        T = 0
        idx = np.zeros((R, 0, K), np.int32)
        w = np.zeros((R, 0, K), np.float32)
    elif case == "one_rank":  # every token of every rank goes to rank R-1 only
        L = E // R
        idx = np.stack([np.stack([rng.permutation(L)[:K] + (R - 1) * L for _ in range(T)])
                        for _ in range(R)]).astype(np.int32)
    elif case == "masked":  # many -1 slots and whole tokens with no expert
        idx, w = h.routing(rng, R, T, K, E, mask_prob=0.5)
        idx[:, ::7] = -1
    return T, idx, w


EDGE_CASES = [(layout, case) for layout in ("rank", "expert")
              for case in ("T1", "one_expert", "one_rank", "masked", "K1", "K9", "H7168",
                           "overflow", "f32", "T0")] + [("expert", "align128")]


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout,case", EDGE_CASES)
def test_dispatch_edge_cases(R, layout, case):
    T, H, K, E = 128, 512, 4, 32
    kw = dict(layout=layout)
    rng = _rng("edge", layout, case)
    T, idx, w = _routing_case(case, rng, R, T, K, E)
    if case == "one_expert":
        K = 1
        idx = np.full((R, T, 1), 5, np.int32)
    elif case == "K1":
        K = 1
    elif case == "K9":
        K = 9
    elif case == "H7168":
        H, T = 7168, 64
    elif case == "overflow":
        kw["max_recv_tokens"] = T // 2  # below what one rank receives, also at R=1
    elif case == "align128":  # an expert-layout option
        kw["align"] = 128
    elif case == "f32":
        kw["dtype"] = jnp.float32
    cap = kw.pop("max_recv_tokens", None)
    got, _, _ = compare_dispatch(R, T, H, K, E, cap=cap, idx=idx, w=w, tag=case, **kw)
    if case == "overflow":
        assert np.asarray(got.num_overflow).max() > 0


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("case", ["T1", "T0", "masked", "one_rank", "H7168", "H640",
                                  "overflow"])
def test_dispatch_cast_fp8_edge_cases(R, layout, case):
    """cast_fp8=True: values and scales cast in the kernel == the reference's XLA cast,
    bitwise, with uneven routing, masked slots, 1 and 0 tokens and overflow. H=640 takes
    the lanes' direct stores (its scale row is not a multiple of 16 bytes), the others the
    staged bulk stores."""
    T, H, K, E = 96, 1024, 4, 32
    rng = _rng("cast_edge", layout, case)
    T, idx, w = _routing_case(case, rng, R, T, K, E)
    cap = None
    if case == "H7168":
        H, T = 7168, 48
    elif case == "H640":
        H = 640
    elif case == "overflow":
        cap = T // 2
    got, _, _ = compare_dispatch(R, T, H, K, E, layout=layout, cap=cap, idx=idx, w=w,
                                 fp8="cast", tag="cast_" + case)
    if case == "overflow":
        assert np.asarray(got.num_overflow).max() > 0
    if T:  # the cast happened: e4m3 values and scales, not zeros
        q, s = got.recv_x
        assert q.dtype == jnp.float8_e4m3fn and np.asarray(s).max() > 0


@pytest.mark.parametrize("R", h.RANKS)
def test_dispatch_layout_matches_reference(R):
    T, K, E = 300, 8, 64
    idx, _ = h.routing(_rng("layout"), R, T, K, E)
    from jax_ep.backends import cuda, reference

    def fn(mod):
        return lambda i: mod.get_dispatch_layout(i, num_experts=E, num_ranks=R)
    got = h.run(fn(cuda), R, idx)
    want = h.run_reference(fn(reference), R, idx)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- combine

def _combine_fn(backend, R, E, layout, cap, align, weighted):
    buf = h.buffer(R) if backend == "cuda" else None

    def f(x, idx, w, y, row_w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=h.AXIS, layout=layout,
                            max_recv_tokens=cap, expert_alignment=align, buffer=buf,
                            backend=backend)
        return jax_ep.combine(y, r.handle, row_w if weighted else None)
    return f


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_combine_matches_reference(R, layout, weighted, dtype):
    rng = _rng("combine", R, layout, weighted, str(dtype))
    align = 4 if layout == "expert" else 1
    got, want = _combine_both(rng, R, 256, 1024, 8, 64, layout, None, align, weighted, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape == (R, 256, 1024)
    h.assert_reduction_close("combine out", got, want, f"(seed {SEED})")


def _combine_both(rng, R, T, H, K, E, layout, cap, align, weighted, dtype):
    """CUDA and reference combine of the same random rows (``cap=None``: the default
    capacity); returns (got, want) as host ``[R, T, H]``."""
    idx, w = h.routing(rng, R, T, K, E)
    rows = cap if cap is not None else jax_ep.default_capacity(T, R, K, E // R, layout, align)
    x = rng.standard_normal((R, T, H)).astype(dtype)
    y = rng.standard_normal((R, rows, H)).astype(dtype)
    row_w = rng.random((R, rows)).astype(np.float32)
    args = (x, idx, w, y, row_w)
    got = h.run(_combine_fn("cuda", R, E, layout, cap, align, weighted), R, *args)
    want = h.run_reference(_combine_fn("reference", R, E, layout, cap, align, weighted), R,
                           *args)
    return got, want


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_combine_after_overflow(R, layout):
    T = 128
    rng = _rng("combine_overflow", layout)
    got, want = _combine_both(rng, R, T, 512, 4, 32, layout, T // 2, 1, True, jnp.bfloat16)
    h.assert_reduction_close("combine out", got, want, f"(seed {SEED})")


# ----------------------------------------------------------------------------- gradients

def _loss_grad_fn(backend, R, E, layout):
    buf = h.buffer(R) if backend == "cuda" else None

    def loss(x, w, idx, g):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=h.AXIS, layout=layout,
                            buffer=buf, backend=backend)
        if layout == "expert":
            y = jnp.tanh(r.recv_x) * 1.5
            out = jax_ep.combine(y, r.handle, r.recv_topk_weights)
        else:
            scale = 1.0 + jnp.sum(r.recv_topk_weights, axis=1, keepdims=True)
            out = jax_ep.combine(jnp.tanh(r.recv_x) * scale, r.handle)
        return jnp.sum(out * g)

    def f(x, w, idx, g):
        return jax.grad(loss, argnums=(0, 1))(x, w, idx, g)
    return f


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_grads_match_reference(R, layout):
    T, H, K, E = 128, 256, 4, 32
    rng = _rng("grad", layout)
    idx, w = h.routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    g = rng.standard_normal((R, T, H)).astype(np.float32)
    args = (x, w, idx, g)
    got = h.run(_loss_grad_fn("cuda", R, E, layout), R, *args)
    want = h.run_reference(_loss_grad_fn("reference", R, E, layout), R, *args)
    for name, a, b in zip(("dx", "dw"), got, want):
        err = h.rel_err(a, b)
        assert err <= 1e-6, f"{name}: relative error {err} (seed {SEED})"


# ----------------------------------------------------------------------------- stress

@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_back_to_back_calls_no_corruption(R, layout):
    """1,000 dispatch+combine pairs in one jit (lax.scan), new routing every step."""
    T, H, K, E, N = 128, 256, 4, 32, 1000
    buf = h.buffer(R)

    def f(x, key):
        me = jax.lax.axis_index(h.AXIS)

        def step(worst, k):
            k = jax.random.fold_in(k, me)
            scores = jnp.abs(jax.random.normal(k, (T, E))) + 1
            idx = jax.lax.top_k(scores, K)[1].astype(jnp.int32)
            idx = jnp.where(jax.random.uniform(jax.random.fold_in(k, 1), idx.shape) < 0.1,
                            -1, idx)
            w = jax.random.uniform(jax.random.fold_in(k, 2), idx.shape)
            r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=h.AXIS, layout=layout,
                                buffer=buf, backend="cuda")
            if layout == "expert":
                out = jax_ep.combine(r.recv_x, r.handle, r.recv_topk_weights)
                coef = jnp.sum(jnp.where(idx >= 0, w, 0.0), axis=1)
            else:
                out = jax_ep.combine(r.recv_x, r.handle)
                dest = jnp.where(idx >= 0, idx // (E // R), -1)
                coef = jnp.sum(jnp.any(dest[:, :, None] == jnp.arange(R), axis=1), axis=1)
            want = x * coef[:, None].astype(jnp.float32)
            err = jnp.max(jnp.abs(out - want)) / (jnp.max(jnp.abs(want)) + 1e-30)
            return jnp.maximum(worst, err), None

        keys = jax.random.split(key, N)
        worst0 = 0.0 * x[0, 0]  # varies over the axis like the body result (scan vma rule)
        worst, _ = jax.lax.scan(step, worst0, keys)
        return worst

    rng = _rng("stress", layout)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    key = np.stack([np.asarray(jax.random.key_data(jax.random.key(SEED % 1000)))] * R)
    worst = h.run(lambda xx, kk: f(xx, jax.random.wrap_key_data(kk)), R, x, key)
    assert float(np.max(worst)) < 1e-5, f"max relative error {np.max(worst)} (seed {SEED})"


# ----------------------------------------------------------------------------- buffer

@pytest.mark.parametrize("R", h.RANKS)
def test_buffer_too_small_is_a_clear_error(R):
    small = h.new_buffer(R, num_nvl_bytes=300 << 10)
    try:
        x = np.zeros((R, 64, 128), np.float32)
        idx = np.zeros((R, 64, 8), np.int32)
        with pytest.raises(ValueError, match="needs a communication buffer of"):
            h.run(lambda a, i: jax_ep.dispatch(
                a, i, None, num_experts=8 * R, axis_name=h.AXIS, layout="expert",
                buffer=small, backend="cuda", max_recv_tokens=200_000).recv_x, R, x, idx)
    finally:
        small.close()
        small.close()  # idempotent


@pytest.mark.parametrize("R", h.RANKS)
def test_buffer_alloc_free_cycles(R):
    for cycle in range(3):
        with h.new_buffer(R) as b:
            assert b.buffer_id is not None
            compare_dispatch(R, T=64, H=256, K=2, E=8, tag=f"cycle{cycle}", buf=b)
        assert b.buffer_id is None


@pytest.mark.parametrize("R", h.RANKS)
def test_auto_backend_picks_cuda_with_a_buffer(R):
    idx, w = h.routing(_rng("auto"), R, 32, 2, 8)
    x = np.ones((R, 32, 128), np.float32)
    buf = h.buffer(R)
    seen = []

    def f(a, i, ww):
        r = jax_ep.dispatch(a, i, ww, num_experts=8, axis_name=h.AXIS, buffer=buf)
        seen.append(r.handle.config.backend)
        return r.num_recv_tokens
    h.run(f, R, x, idx, w)
    assert seen == ["cuda"]
