"""CUDA low-latency kernels == reference backend.

Dispatch outputs (recv_x, FP8 values and scales included, counts, handle arrays) must
match bitwise: recv_x on the rows each (local expert, source rank) count covers (the rows
past it are undefined on CUDA by default), and on every row (zeros) with
``zero_padding=True`` or under differentiation; FP8 rows against XLA's cast on the GPU.
Combine outputs and gradients are sums: within ``h.assert_reduction_close`` of the
reference, which runs on this process's CPU devices. Split forms equal the fused ones
bitwise. Every test runs at each EP size R of ``h.RANKS`` the run has ranks for
(tests/conftest.py). Fresh random routing every run (seed printed; replay with
JAX_EP_TEST_SEED).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep.backends import cuda as cll
from jax_ep.backends import reference as ref
from jax_ep.types import LowLatencyConfig
from tests import harness as h

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"tests/gpu low-latency seed: JAX_EP_TEST_SEED={SEED}")

# Every test fits these bounds, so one Buffer per EP size serves them all.
MAX_M, MAX_H, MAX_E = 128, 1024, 64
_buffers = {}


def _rng(*salt):
    return h.rng(SEED, *salt)


def _buffer(R):
    if R not in _buffers:
        _buffers[R] = h.new_buffer(R, num_nvl_bytes=cll.ll_bytes_hint(MAX_M, MAX_H, MAX_E, R,
                                                                      dtype_bytes=4))
    return _buffers[R]


def _cfg(R, T, H, K, E, M, fp8, backend, zero_padding=False):
    buf_id = _buffer(R).buffer_id if backend == "cuda" else None
    return LowLatencyConfig(num_experts=E, num_ranks=R, axis_name=h.AXIS, max_tokens_per_rank=M,
                            num_tokens=T, num_topk=K, hidden=H, use_fp8=fp8, backend=backend,
                            buffer_id=buf_id, zero_padding=zero_padding,
                            num_sms=h.ll_num_sms())


def _backend(name):
    return cll if name == "cuda" else ref



def _assert_bitwise(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    if not np.array_equal(h.bits(got), h.bits(want)):
        bad = np.argwhere(h.bits(got) != h.bits(want))
        detail = ""
        if got.dtype.kind == "f" or "float" in got.dtype.name:
            g = got.astype(np.float32)[tuple(bad.T)]
            w = want.astype(np.float32)[tuple(bad.T)]
            detail = f"; got {g[:4].tolist()} want {w[:4].tolist()}"
        raise AssertionError(f"{name} differs at {len(bad)} of {got.size} places, first "
                             f"{bad[:4].tolist()}{detail} (seed {SEED})")


def _routing(rng, R, T, K, E, case="random"):
    idx, w = h.routing(rng, R, T, K, E, mask_prob=0.15)
    if case == "random":
        if T > 1 and K > 1:  # some tokens name one expert twice (one row, two weights)
            dup = rng.random((R, T)) < 0.2
            idx[..., 1] = np.where(dup, idx[..., 0], idx[..., 1])
        if T > 2:
            idx[:, 0, :] = -1  # a token with no expert at all
    elif case == "one_expert":  # every slot of every token of every rank names expert 5
        idx[:] = 5
    elif case == "last_expert":  # ... names the last rank's last expert
        idx[:] = E - 1
    elif case == "all_masked":
        idx[:] = -1
    elif case == "out_of_range":  # ids >= E count as -1
        idx[..., -1] = E + 3
    return idx, w


def _dispatch_both(R, T, H, K, E, M, fp8, idx, x, zero_padding=False):
    cfg = _cfg(R, T, H, K, E, M, fp8, "cuda", zero_padding)
    got = h.run(lambda x, i: cll.ll_dispatch(x, i, None, cfg), R, x, idx)
    return got, _reference_dispatch(R, T, H, K, E, M, fp8, idx, x, zero_padding)


def _reference_dispatch(R, T, H, K, E, M, fp8, idx, x, zero_padding=False):
    """The reference's rows; FP8: its bf16 rows cast by XLA on the GPU afterwards (a row's
    cast does not depend on where it travels), zeros past the counts as the reference has."""
    cfg = _cfg(R, T, H, K, E, M, False, "reference", zero_padding)
    recv_x, count, handle = h.run_reference(lambda x, i: ref.ll_dispatch(x, i, None, cfg), R,
                                            x, idx)
    if not fp8:
        return recv_x, count, handle
    q, s = h.gpu_fp8_cast(recv_x)
    valid = np.asarray(handle.recv_src_token) >= 0  # [R, L, R*M]
    q = np.where(valid[..., None], q, np.zeros_like(q))
    s = np.where(valid[..., None], s, np.zeros_like(s))
    return (q, s), count, handle


def _valid_rows(count_per_rank, M):
    """[..., L, R*M] bool: the rows each (local expert, source rank) count covers."""
    count_per_rank = np.asarray(count_per_rank)
    row = np.arange(count_per_rank.shape[-1] * M) % M
    return row < np.repeat(count_per_rank, M, axis=-1)


def _compare_rows(name, got, want, valid):
    """Bitwise on the valid rows (valid=None: on every row)."""
    got, want = np.asarray(got), np.asarray(want)
    if valid is None:
        _assert_bitwise(name, got, want)
    else:
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        _assert_bitwise(name + " (counted rows)", got[valid], want[valid])


def _compare_dispatch(got, want, fp8, zero_padding=False):
    """recv_x bitwise on the counted rows, and on every row (zeros) when zero_padding."""
    (gx, gcount, gh), (wx, wcount, wh) = got, want
    M = np.asarray(wx[0] if fp8 else wx).shape[-2] // np.asarray(wh.recv_count_per_rank).shape[-1]
    valid = None if zero_padding else _valid_rows(wh.recv_count_per_rank, M)
    if fp8:
        _compare_rows("recv_x values (e4m3)", gx[0], wx[0], valid)
        _compare_rows("recv_x scales", gx[1], wx[1], valid)
    else:
        _compare_rows("recv_x", gx, wx, valid)
    _assert_bitwise("recv_count", gcount, wcount)
    for name in gh._fields:
        _assert_bitwise(f"handle.{name}", getattr(gh, name), getattr(wh, name))


# ----------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("zero_padding", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T", [0, 1, 8, 128])
def test_dispatch_matches_reference(R, T, fp8, zero_padding):
    H, K, E, M = 512, 8, 64, 128
    rng = _rng("dispatch", T, fp8, zero_padding)
    idx, _ = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    got, want = _dispatch_both(R, T, H, K, E, M, fp8, idx, x, zero_padding)
    _compare_dispatch(got, want, fp8, zero_padding)


@pytest.mark.parametrize("R", h.RANKS)
def test_dispatch_zero_padding_after_garbage(R):
    """The staging halves and XLA's memory hold earlier ops' rows: zero_padding=True must
    still give exact zeros past the counts, and the default must still match on the rows
    that count."""
    T, H, K, E, M = 64, 512, 8, 64, 128
    rng = _rng("garbage")
    for step in range(3):
        idx, _ = _routing(rng, R, T, K, E)
        x = (rng.standard_normal((R, T, H)) * (step + 1)).astype(jnp.bfloat16)
        for fp8 in (False, True):
            for zp in (False, True):
                got, want = _dispatch_both(R, T, H, K, E, M, fp8, idx, x, zp)
                _compare_dispatch(got, want, fp8, zp)


@pytest.mark.parametrize("case", ["one_expert", "all_masked", "out_of_range"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("R", h.RANKS)
def test_dispatch_edge_routing(R, case, fp8):
    T, H, K, E, M = 32, 256, 4, 32, 64
    rng = _rng("edge", case, fp8)
    idx, _ = _routing(rng, R, T, K, E, case)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    for zp in (False, True):
        got, want = _dispatch_both(R, T, H, K, E, M, fp8, idx, x, zp)
        _compare_dispatch(got, want, fp8, zp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("R", h.RANKS)
def test_dispatch_other_dtypes(R, dtype):
    T, H, K, E, M = 16, 384, 4, 32, 16
    rng = _rng("dtype", str(dtype))
    idx, _ = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(dtype)
    for fp8 in (False, True):
        got, want = _dispatch_both(R, T, H, K, E, M, fp8, idx, x)
        _compare_dispatch(got, want, fp8)


@pytest.mark.parametrize("R", h.RANKS)
def test_fp8_extreme_values(R):
    """Blocks of zeros (amax floor), tiny and large magnitudes, exact powers of two."""
    T, H, K, E, M = 8, 512, 2, 16, 8
    rng = _rng("fp8-extreme")
    idx, _ = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    x[:, 0, :128] = 0.0
    x[:, 1, :128] *= 1e-6
    x[:, 2, 128:256] *= 3e4
    x[:, 3, :] = np.ldexp(1.0, rng.integers(-8, 8, size=(R, H)))
    got, want = _dispatch_both(R, T, H, K, E, M, True, idx, x.astype(jnp.bfloat16))
    _compare_dispatch(got, want, True)


# ----------------------------------------------------------------------------- combine

def _combine_fn(backend, R, T, H, K, E, M, fp8=False):
    cfg = _cfg(R, T, H, K, E, M, fp8, backend)
    be = _backend(backend)

    def f(x, idx, w):
        recv_x, _, handle = be.ll_dispatch(x, idx, None, cfg)
        if fp8:
            recv_x = recv_x[0].astype(jnp.float32)  # the expert reads e4m3 values
        l = jnp.arange(cfg.num_local_experts, dtype=jnp.float32)[:, None, None]
        y = (recv_x.astype(jnp.float32) * (l + 1.5) + 0.25).astype(x.dtype)  # nonzero rows too
        return be.ll_combine(y, idx, w, handle, cfg)
    return f


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T", [1, 8, 128])
@pytest.mark.parametrize("R", h.RANKS)
def test_combine_matches_reference(R, T, dtype):
    H, K, E, M = 512, 8, 64, 128
    rng = _rng("combine", T, str(dtype))
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(dtype)
    args = (x, idx, w)
    want = h.run_reference(_combine_fn("reference", R, T, H, K, E, M), R, *args)
    got = h.run(_combine_fn("cuda", R, T, H, K, E, M), R, *args)
    h.assert_reduction_close("combine out", got, want, f"(seed {SEED})")


@pytest.mark.parametrize("case", ["one_expert", "all_masked"])
@pytest.mark.parametrize("R", h.RANKS)
def test_combine_edge_routing(R, case):
    T, H, K, E, M = 32, 256, 4, 32, 32
    rng = _rng("combine-edge", case)
    idx, w = _routing(rng, R, T, K, E, case)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    args = (x, idx, w)
    want = h.run_reference(_combine_fn("reference", R, T, H, K, E, M), R, *args)
    got = h.run(_combine_fn("cuda", R, T, H, K, E, M), R, *args)
    h.assert_reduction_close("combine out", got, want, f"(seed {SEED})")


@pytest.mark.parametrize("R", h.RANKS)
def test_fp8_dispatch_then_bf16_combine(R):
    T, H, K, E, M = 64, 1024, 8, 64, 64
    rng = _rng("fp8-combine")
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    cfg = _cfg(R, T, H, K, E, M, True, "cuda")
    cfg_ref = _cfg(R, T, H, K, E, M, False, "reference")

    def expert(values):  # the expert reads e4m3 values
        l = jnp.arange(cfg.num_local_experts, dtype=jnp.float32)[:, None, None]
        return (values.astype(jnp.float32) * (l + 1.5) + 0.25).astype(jnp.bfloat16)

    def cuda(x, idx, w):
        recv_x, _, handle = cll.ll_dispatch(x, idx, None, cfg)
        y = expert(recv_x[0])
        return y, cll.ll_combine(y, idx, w, handle, cfg)

    def reference(x, idx, w, y):  # the same expert outputs, combined by the reference
        _, _, handle = ref.ll_dispatch(x, idx, None, cfg_ref)
        return ref.ll_combine(y, idx, w, handle, cfg_ref)

    y, got = h.run(cuda, R, x, idx, w)
    want = h.run_reference(reference, R, x, idx, w, y)
    h.assert_reduction_close("combine out", got, want, f"(seed {SEED})")


@pytest.mark.parametrize("R", h.RANKS)
def test_combine_never_reads_padding_rows(R):
    """Rows of y past the counts may hold anything (NaN here): the output must not change."""
    T, H, K, E, M = 32, 512, 8, 64, 64
    rng = _rng("combine-nan")
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)

    def fn(backend, poison):
        cfg = _cfg(R, T, H, K, E, M, False, backend)
        be = _backend(backend)

        def f(x, idx, w):
            recv_x, _, handle = be.ll_dispatch(x, idx, None, cfg)
            y = (recv_x.astype(jnp.float32) * 1.5 + 0.25).astype(x.dtype)
            if poison:
                row = jnp.arange(R * M) % M
                valid = row[None, :] < jnp.repeat(handle.recv_count_per_rank, M, axis=1)
                y = jnp.where(valid[..., None], y, jnp.asarray(jnp.nan, y.dtype))
            return be.ll_combine(y, idx, w, handle, cfg)
        return f

    args = (x, idx, w)
    want = h.run_reference(fn("reference", False), R, *args)
    got = h.run(fn("cuda", True), R, *args)
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    h.assert_reduction_close("combine out (NaN padding in y)", got, want, f"(seed {SEED})")


@pytest.mark.parametrize("R", h.RANKS)
def test_dispatch_under_vjp_zero_pads(R):
    """The public op's custom-VJP forward rule zero-pads recv_x (the expert weights'
    gradients read every row); its combine's VJP output dy is zero-padded too."""
    T, H, K, E, M = 16, 256, 4, 32, 32
    rng = _rng("vjp-zero")
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    buf = _buffer(R)

    def f(x, idx, w):
        def disp(x):
            return jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                               axis_name=h.AXIS, buffer=buf, backend="cuda",
                                               num_sms=h.ll_num_sms())
        r, _ = jax.vjp(disp, x)  # primal outputs of the custom VJP's forward rule
        y = jnp.tanh(r.recv_x.astype(jnp.float32)).astype(x.dtype)
        out, comb_vjp = jax.vjp(lambda y: jax_ep.low_latency_combine(y, idx, w, r.handle), y)
        (dy,) = comb_vjp(out * 0 + 1)  # varying over the EP axis, like out
        return r.recv_x, r.handle.arrays.recv_count_per_rank, dy

    recv_x, counts, dy = h.run(f, R, x, idx, w)
    pad = ~_valid_rows(counts, M)
    assert pad.any()
    _assert_bitwise("recv_x padding under vjp", np.asarray(recv_x)[pad],
                    np.zeros_like(np.asarray(recv_x)[pad]))
    _assert_bitwise("combine vjp dy padding", np.asarray(dy)[pad],
                    np.zeros_like(np.asarray(dy)[pad]))


# ----------------------------------------------------------------------------- split form

@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("R", h.RANKS)
def test_split_equals_fused(R, fp8):
    T, H, K, E, M = 24, 512, 6, 32, 32
    rng = _rng("split", fp8)
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    cfg = _cfg(R, T, H, K, E, M, fp8, "cuda")

    # Low-latency ops on one Buffer must run one after the other; XLA only orders custom
    # calls along data dependencies, so each op below takes an (always true) dependency on
    # the previous one's output.
    def f(x, idx, w):
        fused = cll.ll_dispatch(x, idx, None, cfg)
        idx2 = jnp.where(fused[1][0] >= 0, idx, -1)
        sent = cll.ll_dispatch_send(x, idx2, cfg)
        h_ = jnp.tanh(x.astype(jnp.float32))  # independent work between the halves
        split = cll.ll_dispatch_recv(sent, cfg, x.dtype)
        vals = split[0][0] if fp8 else split[0]
        y = (vals.astype(jnp.float32) * 3.0).astype(jnp.bfloat16)
        out_fused = cll.ll_combine(y, idx, w, split[2], cfg)
        y2 = jnp.where(jnp.isfinite(out_fused[0, 0]), y, jnp.zeros_like(y))
        sent_y = cll.ll_combine_send(y2, split[2], cfg)
        out_split = cll.ll_combine_recv(sent_y, idx, w, split[2], cfg, y.dtype, H)
        return fused, split, out_fused, out_split, h_[:1]

    fused, split, out_fused, out_split, _ = h.run(f, R, x, idx, w)
    _compare_dispatch(split, fused, fp8)
    _assert_bitwise("combine split vs fused", out_split, out_fused)


@pytest.mark.parametrize("zero_padding", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("R", h.RANKS)
def test_public_split_api_equals_fused(R, fp8, zero_padding):
    """jax_ep.low_latency_*_send/_recv (two custom calls each) == the fused public ops."""
    T, H, K, E, M = 24, 512, 6, 32, 32
    rng = _rng("public-split", fp8, zero_padding)
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)
    buf = _buffer(R)
    kw = dict(num_experts=E, max_tokens_per_rank=M, axis_name=h.AXIS, use_fp8=fp8,
              zero_padding=zero_padding, buffer=buf, backend="cuda", num_sms=h.ll_num_sms())

    def expert(recv_x):
        vals = recv_x[0] if fp8 else recv_x
        return (vals.astype(jnp.float32) * 3.0).astype(jnp.bfloat16)

    def fused(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, **kw)
        return r, jax_ep.low_latency_combine(expert(r.recv_x), idx, w, r.handle)

    def split(x, idx, w):
        p = jax_ep.low_latency_dispatch_send(x, idx, **kw)
        other = jnp.tanh(x.astype(jnp.float32))  # independent work between the halves
        r = jax_ep.low_latency_dispatch_recv(p)
        c = jax_ep.low_latency_combine_send(expert(r.recv_x), idx, w, r.handle)
        return r, jax_ep.low_latency_combine_recv(c), other[:1]

    args = (x, idx, w)
    rf, of = h.run(fused, R, *args)
    rs, os_, _ = h.run(split, R, *args)
    _compare_dispatch((rs.recv_x, rs.recv_count, rs.handle.arrays),
                      (rf.recv_x, rf.recv_count, rf.handle.arrays), fp8, zero_padding)
    _assert_bitwise("combine split vs fused", os_, of)


@pytest.mark.parametrize("R", h.RANKS)
def test_public_split_api_grads_equal_fused(R):
    T, H, K, E, M = 16, 256, 4, 32, 16
    rng = _rng("split-grads")
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.float32)
    buf = _buffer(R)
    kw = dict(num_experts=E, max_tokens_per_rank=M, axis_name=h.AXIS, buffer=buf,
              backend="cuda", num_sms=h.ll_num_sms())

    def fused(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, **kw)
        return jax_ep.low_latency_combine(jnp.tanh(r.recv_x), idx, w, r.handle)

    def split(x, idx, w):
        r = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(x, idx, **kw))
        return jax_ep.low_latency_combine_recv(
            jax_ep.low_latency_combine_send(jnp.tanh(r.recv_x), idx, w, r.handle))

    def grads(body):  # each rank's loss: the exchanges' VJPs carry every rank's cotangents
        loss = lambda x, w, idx: jnp.sum(body(x, idx, w) ** 2)
        return h.run(jax.grad(loss, argnums=(0, 1)), R, x, w, idx)

    want, got = grads(fused), grads(split)
    _assert_bitwise("d/dx split vs fused", got[0], want[0])
    _assert_bitwise("d/dw split vs fused", got[1], want[1])


# ----------------------------------------------------------------------------- decode loop

@pytest.mark.parametrize("R", h.RANKS)
def test_decode_scan_1000_steps(R):
    """1,000 dispatch+combine pairs back to back in one jit-ed lax.scan (both halves of the
    buffer reused ~500 times each); a few steps are recomputed with the reference."""
    T, H, K, E, M, steps = 8, 256, 4, 32, 8, 1000
    rng = _rng("scan")
    idx0, w = _routing(rng, R, T, K, E)
    x0 = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)

    def inputs(x, idx, i):  # step i's tokens and routing, a pure function of i
        xi = (x.astype(jnp.float32) * (1.0 + (i % 5).astype(jnp.float32))).astype(x.dtype)
        valid = (idx >= 0) & (idx < E)
        idx_i = jnp.where(valid, (idx + i * 3) % E, idx)
        return xi, idx_i

    def step_fn(backend):
        cfg = _cfg(R, T, H, K, E, M, False, backend)
        be = _backend(backend)

        def one(x, idx, w, i):
            xi, idx_i = inputs(x, idx, i)
            recv_x, _, handle = be.ll_dispatch(xi, idx_i, None, cfg)
            y = (recv_x.astype(jnp.float32) * 2.0 - 1.0).astype(recv_x.dtype)
            return be.ll_combine(y, idx_i, w, handle, cfg)
        return one

    cuda_step = step_fn("cuda")

    def scanned(x, idx, w):
        def body(carry, i):
            out = cuda_step(x, idx, w, i)
            return carry + jnp.sum(out.astype(jnp.float32)), out
        init = x[0, 0].astype(jnp.float32) * 0  # varying over the EP axis, like the outputs
        total, outs = jax.lax.scan(body, init, jnp.arange(steps, dtype=jnp.int32))
        return outs, total

    args = (x0, idx0, w)
    outs, _ = h.run(scanned, R, *args)  # [R, steps, T, H]
    ref_step = step_fn("reference")
    for i in (0, 1, 2, 499, 998, 999):
        want = h.run_reference(lambda x, idx, w, i=i: ref_step(x, idx, w, jnp.int32(i)), R,
                               *args)
        h.assert_reduction_close(f"decode step {i}", outs[:, i], want, f"(seed {SEED})")


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("R", h.RANKS)
def test_grads_match_reference(R, dtype):
    T, H, K, E, M = 16, 256, 4, 32, 16
    rng = _rng("grads", str(dtype))
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(dtype)

    def grads(backend):
        buf = _buffer(R) if backend == "cuda" else None

        def loss(x, w, idx):  # each rank's loss; the VJPs carry every rank's cotangents
            r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                            axis_name=h.AXIS, buffer=buf, backend=backend,
                                            num_sms=h.ll_num_sms())
            l = jnp.arange(E // R, dtype=jnp.float32)[:, None, None]
            y = (jnp.tanh(r.recv_x.astype(jnp.float32)) * (l + 1.0)).astype(x.dtype)
            out = jax_ep.low_latency_combine(y, idx, w, r.handle)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        run = h.run if backend == "cuda" else h.run_reference
        return run(jax.grad(loss, argnums=(0, 1)), R, x, w, idx)

    want = grads("reference")
    got = grads("cuda")
    # sums of sums on two platforms; bf16 rounding of the outputs makes ulp flips count
    tol = 1e-5 if dtype == jnp.float32 else 1e-3
    for name, g, r in (("d loss / d x", got[0], want[0]), ("d loss / d topk_weights", got[1],
                                                           want[1])):
        err = h.rel_err(g, r)
        assert err <= tol, f"{name}: relative error {err} (seed {SEED})"


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("R", h.RANKS)
def test_buffer_too_small_is_a_clear_error(R):
    T, H, K, E, M = 8, 1024, 4, 64, 128
    small = h.new_buffer(R, num_nvl_bytes=70 << 20)
    try:
        cfg = dataclasses.replace(_cfg(R, T, H, K, E, M, False, "cuda"), buffer_id=small.buffer_id)
        with pytest.raises(ValueError, match="get_low_latency_size_hint"):
            cll.check_fits_low_latency(small, cfg)
        rng = _rng("small")
        idx, w = _routing(rng, R, T, K, E)
        x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)

        def f(x, i, w):  # the dispatch's slots fit (one row per token and rank); the
            recv_x, _, handle = cll.ll_dispatch(x, i, None, cfg)  # combine's [E, M] do not
            return cll.ll_combine(recv_x, i, w, handle, cfg)
        with pytest.raises(Exception, match="get_low_latency_size_hint"):
            h.run(f, R, x, idx, w)
    finally:
        small.close()


@pytest.mark.parametrize("R", h.RANKS)
def test_python_validation(R):
    cfg = _cfg(R, 8, 256, 4, 32, 2048, False, "cuda")
    x = jnp.zeros((8, 256), jnp.bfloat16)
    idx = jnp.zeros((8, 4), jnp.int32)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        cll.ll_dispatch(x, idx, None, cfg)
    cfg = _cfg(R, 8, 200, 4, 32, 8, True, "cuda")
    with pytest.raises(ValueError, match="hidden % 128"):
        cll.ll_dispatch(jnp.zeros((8, 200), jnp.bfloat16), idx, None, cfg)
    with pytest.raises(TypeError, match="bfloat16"):
        cll.ll_dispatch(jnp.zeros((8, 256), jnp.int32), idx, None,
                        _cfg(R, 8, 256, 4, 32, 8, False, "cuda"))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("T", [1, 8, 128])
def test_packed_matches_reference(R, T, split):
    """packed=True on CUDA: every row bitwise the reference's packed rows (zeros after the
    counts, duplicates and masked slots included), split == fused, and the combine of the
    packed rows == the combine of the per-source rows (same kernels, same order)."""
    H, K, E, M = 512, 8, 64, 128
    rng = _rng("packed", T, split)
    idx, w = _routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(jnp.bfloat16)

    def layer(backend, packed):
        kw = dict(num_experts=E, max_tokens_per_rank=M, axis_name=h.AXIS, packed=packed,
                  backend=backend)
        if backend == "cuda":
            kw.update(buffer=_buffer(R), num_sms=h.ll_num_sms())

        def fn(x, idx, w):
            if split:
                r = jax_ep.low_latency_dispatch_recv(
                    jax_ep.low_latency_dispatch_send(x, idx, **kw))
            else:
                r = jax_ep.low_latency_dispatch(x, idx, **kw)
            y = (r.recv_x.astype(jnp.float32) * 3.0).astype(jnp.bfloat16)
            return r.recv_x, r.recv_count, jax_ep.low_latency_combine(y, idx, w, r.handle)
        return fn

    gx, gcount, gout = h.run(layer("cuda", True), R, x, idx, w)
    wx, wcount, wout = h.run_reference(layer("reference", True), R, x, idx, w)
    _assert_bitwise("packed recv_x", gx, wx)
    _assert_bitwise("recv_count", gcount, wcount)
    h.assert_reduction_close("packed combine", gout, wout, f"(seed {SEED})")
    _, _, per_source = h.run(layer("cuda", False), R, x, idx, w)
    _assert_bitwise("combine packed vs per-source", gout, per_source)
