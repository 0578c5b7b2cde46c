"""Low-latency ops on the reference backend against the NumPy oracle, and how the CUDA
custom calls lower (split form = two calls tied by a ticket; zero padding only where
promised), checked on CPU through the lowered StableHLO text."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep.types import LowLatencyConfig, LowLatencyHandleArrays
from tests import harness, oracle


def _case(seed, R, T, K, E, H=32, mask_prob=0.15):
    rng = np.random.default_rng(seed)
    return (harness.random_tokens(rng, R, T, H), harness.random_routing(rng, R, T, K, E, mask_prob),
            harness.random_weights(rng, R, T, K))


def _ll_dispatch(E, M, use_fp8=False):
    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                           axis_name=harness.AXIS, use_fp8=use_fp8)
    return fn


@pytest.mark.parametrize("R,T", [(1, 5), (2, 8), (4, 1), (4, 0), (8, 6)])
def test_low_latency_dispatch_matches_oracle(R, T):
    E, K, M = 2 * R if R > 1 else 4, 2, 8
    xs, idxs, _ = _case(R * 10 + T, R, T, K, E)
    got = harness.run(_ll_dispatch(E, M), R, xs, idxs)
    want = oracle.low_latency_dispatch(xs, idxs, E, M)
    for r in range(R):
        np.testing.assert_array_equal(got.recv_x[r], want[r]["recv_x"])
        np.testing.assert_array_equal(got.recv_count[r], want[r]["recv_count"])
        np.testing.assert_array_equal(got.handle.arrays.recv_src_token[r],
                                      want[r]["recv_src_token"])


def test_low_latency_fp8_dispatch_equals_cast_of_bf16_rows():
    R, E, T, K, M, H = 4, 8, 6, 3, 8, 256
    xs, idxs, _ = _case(3, R, T, K, E, H=H)
    xs = [x.astype(jnp.bfloat16) for x in xs]
    (rq, rs), count, _ = harness.run(_ll_dispatch(E, M, use_fp8=True), R, xs, idxs)
    want = oracle.low_latency_dispatch(xs, idxs, E, M)
    for r in range(R):
        w = want[r]["recv_x"].reshape(-1, H)
        q, s = jax_ep.fp8.per_token_cast(jnp.asarray(w))
        np.testing.assert_array_equal(rq[r].reshape(-1, H).view(np.uint8),
                                      np.asarray(q).view(np.uint8))
        live = want[r]["recv_src_token"].reshape(-1) >= 0  # empty rows: zero scales
        np.testing.assert_array_equal(rs[r].reshape(-1, H // 128)[live], np.asarray(s)[live])
        np.testing.assert_array_equal(count[r], want[r]["recv_count"])


def test_low_latency_combine_matches_oracle_and_duplicates():
    R, E, T, K, M, H = 4, 8, 7, 3, 8, 32
    xs, idxs, ws = _case(4, R, T, K, E, H=H)
    idxs[1][0] = [2, 2, -1]  # same expert twice: one row, weighted by both slots
    scale = np.linspace(0.5, 2.0, E).astype(np.float32)

    def fn(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS)
        me = jax.lax.axis_index(harness.AXIS)
        local_scale = jax.lax.dynamic_slice(jnp.asarray(scale), (me * (E // R),), (E // R,))
        y = jnp.tanh(r.recv_x * local_scale[:, None, None])
        return jax_ep.low_latency_combine(y, idx, w, r.handle)

    got = harness.run(fn, R, xs, idxs, ws)
    want = oracle.moe(xs, idxs, ws, E, lambda e, x: np.tanh(x * scale[e]))
    for r in range(R):
        np.testing.assert_allclose(got[r], want[r], rtol=1e-5, atol=1e-5)


def test_split_form_equals_fused():
    R, E, T, K, M, H = 4, 8, 6, 2, 8, 32
    xs, idxs, ws = _case(5, R, T, K, E, H=H)

    def fused(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS)
        return r.recv_x, jax_ep.low_latency_combine(r.recv_x * 3.0, idx, w, r.handle)

    def split(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, max_tokens_per_rank=M,
                                                   axis_name=harness.AXIS)
        other = jnp.sin(x)  # independent work between send and receive
        r = jax_ep.low_latency_dispatch_recv(pending)
        cp = jax_ep.low_latency_combine_send(r.recv_x * 3.0, idx, w, r.handle)
        return r.recv_x, jax_ep.low_latency_combine_recv(cp) + 0.0 * other

    a = harness.run(fused, R, xs, idxs, ws)
    b = harness.run(split, R, xs, idxs, ws)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_decode_loop_in_scan():
    R, E, T, K, M, H, steps = 4, 8, 4, 2, 4, 16, 20
    rng = np.random.default_rng(6)
    idxs = [np.stack(harness.random_routing(rng, steps, T, K, E)) for _ in range(R)]
    ws = [rng.random((steps, T, K)).astype(np.float32) for _ in range(R)]
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]

    def fn(x0, idx, w):
        def step(x, inp):
            i, wi = inp
            r = jax_ep.low_latency_dispatch(x, i, num_experts=E, max_tokens_per_rank=M,
                                            axis_name=harness.AXIS)
            out = jax_ep.low_latency_combine(jnp.tanh(r.recv_x), i, wi, r.handle)
            return out, out
        return jax.lax.scan(step, x0, (idx, w))[1]

    got = harness.run(fn, R, xs, idxs, ws)
    cur = [x.astype(np.float64) for x in xs]
    for s in range(steps):
        cur = oracle.moe(cur, [i[s] for i in idxs], [w[s] for w in ws], E,
                         lambda e, x: np.tanh(x))
        for r in range(R):
            np.testing.assert_allclose(got[r][s], cur[r], rtol=1e-4, atol=1e-5)


def test_low_latency_grads_equal_dense():
    R, E, T, K, M, H = 4, 8, 5, 3, 8, 16
    rng = np.random.default_rng(7)
    x = np.concatenate(harness.random_tokens(rng, R, T, H))
    idx = np.concatenate(harness.random_routing(rng, R, T, K, E, 0.2))
    idx[0] = [1, 1, 5]  # duplicate expert in one token
    w = np.concatenate(harness.random_weights(rng, R, T, K))
    scale = jnp.linspace(0.5, 1.5, E, dtype=jnp.float32)
    cot = rng.standard_normal((R * T, H)).astype(np.float32)
    m = harness.mesh(R)
    sh = NamedSharding(m, P(harness.AXIS))

    def body(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS)
        me = jax.lax.axis_index(harness.AXIS)
        local = jax.lax.dynamic_slice(scale, (me * (E // R),), (E // R,))
        return jax_ep.low_latency_combine(jnp.sin(r.recv_x * local[:, None, None]), idx, w,
                                          r.handle)

    f = jax.jit(jax.shard_map(body, mesh=m, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS)))
    xs, idxs, ws = [jax.device_put(jnp.asarray(a), sh) for a in (x, idx, w)]
    gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, idxs, w) * cot), argnums=(0, 1))(xs, ws)

    def dense(x, w):
        e = jnp.where(idx >= 0, idx, 0)
        fx = jnp.sin(x[:, None, :] * scale[e][..., None])
        return jnp.sum(jnp.sum(fx * jnp.where(idx >= 0, w, 0.0)[..., None], 1) * cot)

    rx, rw = jax.grad(dense, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_fp8_low_latency_dispatch_is_not_differentiable():
    R, E, T, K, M, H = 2, 4, 3, 2, 4, 128
    xs, idxs, _ = _case(8, R, T, K, E, H=H)

    def loss(x, idx):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS, use_fp8=True)
        return jnp.sum(r.recv_x[1])[None]

    with pytest.raises(TypeError, match="use_fp8=True is not differentiable"):
        harness.run(lambda x, idx: jax.grad(lambda x: loss(x, idx)[0])(x), R, xs, idxs)


def test_zero_padding_option_on_the_reference_backend():
    """zero_padding=True is accepted everywhere; the reference writes zeros either way."""
    R, E, T, K, M, H = 4, 8, 5, 2, 8, 32
    xs, idxs, _ = _case(9, R, T, K, E, H=H)

    def fn(x, idx):
        a = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS)
        b = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS, zero_padding=True)
        p = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, max_tokens_per_rank=M,
                                             axis_name=harness.AXIS, zero_padding=True)
        c = jax_ep.low_latency_dispatch_recv(p)
        return a.recv_x, b.recv_x, c.recv_x, a.handle.arrays.recv_count_per_rank
    a, b, c, counts = harness.run(fn, R, xs, idxs)
    for r in range(R):
        np.testing.assert_array_equal(a[r], b[r])
        np.testing.assert_array_equal(a[r], c[r])
        rows = np.arange(R * M) % M  # row within its (expert, source rank) block
        pad = rows[None, :] >= np.repeat(counts[r], M, axis=1)
        assert not np.any(a[r][pad])


def test_split_form_grads_equal_fused():
    R, E, T, K, M, H = 4, 8, 5, 3, 8, 16
    rng = np.random.default_rng(10)
    x = np.concatenate(harness.random_tokens(rng, R, T, H))
    idx = np.concatenate(harness.random_routing(rng, R, T, K, E, 0.2))
    idx[0] = [1, 1, 5]
    w = np.concatenate(harness.random_weights(rng, R, T, K))
    m = harness.mesh(R)
    sh = NamedSharding(m, P(harness.AXIS))
    xs, idxs, ws = [jax.device_put(jnp.asarray(a), sh) for a in (x, idx, w)]

    def fused(x, idx, w):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS)
        return jax_ep.low_latency_combine(jnp.sin(r.recv_x), idx, w, r.handle)

    def split(x, idx, w):
        p = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, max_tokens_per_rank=M,
                                             axis_name=harness.AXIS)
        r = jax_ep.low_latency_dispatch_recv(p)
        c = jax_ep.low_latency_combine_send(jnp.sin(r.recv_x), idx, w, r.handle)
        return jax_ep.low_latency_combine_recv(c)

    def grads(body):
        f = jax.shard_map(body, mesh=m, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS))
        return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, idxs, w) ** 2), argnums=(0, 1)))(
            xs, ws)

    for a, b in zip(grads(fused), grads(split)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ CUDA lowering (no GPU needed)

class _FakeCudaBuffer:
    """Stands in for a CUDA jax_ep.Buffer so the CUDA custom calls can be lowered on CPU."""
    buffer_id = 7
    num_nvl_bytes = 1 << 40

    def check_fits_low_latency(self, cfg, dtype):
        pass


@pytest.fixture
def cuda_lowering(monkeypatch):
    from jax_ep import backends
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: "cuda")
    return _FakeCudaBuffer()


def _lowered(fn, R, T, H, K, grad=False):
    m = harness.mesh(R)
    f = jax.shard_map(fn, mesh=m, in_specs=P(harness.AXIS), out_specs=P(harness.AXIS))
    x = jnp.zeros((R * T, H), jnp.float32)
    idx = jnp.zeros((R * T, K), jnp.int32)
    w = jnp.ones((R * T, K), jnp.float32)
    if grad:
        g = jax.grad(lambda x, w: jnp.sum(f(x, idx, w)), argnums=(0, 1))
        return jax.jit(g).lower(x, w).as_text()
    return jax.jit(f).lower(x, idx, w).as_text()


def _custom_calls(text):
    """[(result name, target, operands, zero_padding attribute or None)] in program order."""
    calls = []
    for line in text.splitlines():
        m = re.search(r"(%[\w#:]+) = stablehlo\.custom_call @(jax_ep_\w+)\(([^)]*)\)", line)
        if m:
            zp = re.search(r"zero_padding = (true|false)", line)
            calls.append((m.group(1).split(":")[0], m.group(2),
                          [o.strip() for o in m.group(3).split(",")],
                          None if zp is None else zp.group(1) == "true"))
    return calls


def test_cuda_split_form_lowers_to_separate_send_and_recv_calls(cuda_lowering):
    R, E, T, K, M, H = 4, 8, 4, 2, 8, 128
    buf = cuda_lowering

    def split(x, idx, w):
        p = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, max_tokens_per_rank=M,
                                             axis_name=harness.AXIS, buffer=buf, backend="cuda")
        h = jnp.tanh(x)  # independent work XLA may place between the halves
        r = jax_ep.low_latency_dispatch_recv(p)
        c = jax_ep.low_latency_combine_send(r.recv_x * 2.0, idx, w, r.handle)
        return jax_ep.low_latency_combine_recv(c) + h

    calls = _custom_calls(_lowered(split, R, T, H, K))
    names = [c[1] for c in calls]
    assert names == ["jax_ep_ll_dispatch_send", "jax_ep_ll_dispatch_recv",
                     "jax_ep_ll_combine_send", "jax_ep_ll_combine_recv"], names
    (d_send, _, _, _), (_, _, d_recv_ops, zp), (c_send, _, c_send_ops, _), \
        (_, _, c_recv_ops, _) = calls
    # The dispatch recv consumes the send's ticket and the receive buffers the send wrote
    # this rank's own rows into (recv_src_token, recv_count_per_rank, recv_x), aliased to
    # its results.
    assert d_recv_ops == [d_send + f"#{i}" for i in range(1, 5)], d_recv_ops
    recv_line = next(line for line in _lowered(split, R, T, H, K).splitlines()
                     if "@jax_ep_ll_dispatch_recv(" in line)
    assert recv_line.count("output_operand_aliases") == 1 and \
        recv_line.count("operand_index = ") == 3, recv_line
    assert c_recv_ops[0] == c_send        # likewise for combine: the ticket ...
    assert c_recv_ops[1] == c_send_ops[0]  # ... and y, where it reads its own rows
    assert zp is False                    # inference: padding rows left undefined

    # Differentiated: the recv zero-pads (its custom VJP's forward rule).
    calls = _custom_calls(_lowered(split, R, T, H, K, grad=True))
    recvs = [c for c in calls if c[1] == "jax_ep_ll_dispatch_recv"]
    assert len(recvs) == 1 and recvs[0][3] is True


def test_cuda_zero_padding_only_where_promised(cuda_lowering):
    R, E, T, K, M, H = 4, 8, 4, 2, 8, 128
    buf = cuda_lowering

    def fused(zero_padding):
        def f(x, idx, w):
            r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                            axis_name=harness.AXIS, buffer=buf, backend="cuda",
                                            zero_padding=zero_padding)
            return jax_ep.low_latency_combine(jnp.sin(r.recv_x), idx, w, r.handle)
        return f

    calls = _custom_calls(_lowered(fused(False), R, T, H, K))
    assert [(c[1], c[3]) for c in calls] == [("jax_ep_ll_dispatch", False),
                                            ("jax_ep_ll_combine", None)]
    calls = _custom_calls(_lowered(fused(True), R, T, H, K))
    assert calls[0][3] is True
    # Under jax.grad: the forward dispatch zero-pads; of the combine's VJP dispatches, the
    # one that becomes dy (weighted: has_slot_scale) zero-pads, the one only dotted with y
    # and read back at the counted rows does not.
    text = _lowered(fused(False), R, T, H, K, grad=True)
    dispatches = [line for line in text.splitlines()
                  if "stablehlo.custom_call @jax_ep_ll_dispatch(" in line]
    assert len(dispatches) == 3
    flags = [(("has_slot_scale = true" in d), ("zero_padding = true" in d)) for d in dispatches]
    assert sorted(flags) == [(False, False), (False, True), (True, True)], flags


def test_cuda_num_sms_reaches_every_call_of_the_op(cuda_lowering):
    """A dispatch's num_sms sizes its kernels and its combine's (default 128), fused and split."""
    R, E, T, K, M, H = 4, 8, 4, 2, 8, 128
    buf = cuda_lowering

    def ops(num_sms, split):
        kw = dict(num_experts=E, max_tokens_per_rank=M, axis_name=harness.AXIS, buffer=buf,
                  backend="cuda", num_sms=num_sms)

        def f(x, idx, w):
            if split:
                r = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(x, idx, **kw))
                c = jax_ep.low_latency_combine_send(r.recv_x * 2.0, idx, w, r.handle)
                return jax_ep.low_latency_combine_recv(c)
            r = jax_ep.low_latency_dispatch(x, idx, **kw)
            return jax_ep.low_latency_combine(r.recv_x * 2.0, idx, w, r.handle)
        return f

    for num_sms, want in [(None, 128), (33, 33)]:
        for split in (False, True):
            lines = [line for line in _lowered(ops(num_sms, split), R, T, H, K).splitlines()
                     if "stablehlo.custom_call @jax_ep_ll_" in line]
            assert len(lines) == (4 if split else 2)
            got = [int(re.search(r"num_sms = (\d+)", line).group(1)) for line in lines]
            assert got == [want] * len(lines), (num_sms, split, got)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_num_sms_must_be_a_positive_int(bad):
    x, idx, _ = _case(0, 2, 4, 2, 8)

    def f(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=8, max_tokens_per_rank=4,
                                           axis_name=harness.AXIS, num_sms=bad)
    with pytest.raises((ValueError, TypeError), match="num_sms"):
        harness.run(f, 2, x, idx)


def test_the_symmetric_region_holds_the_same_halves_plus_staging():
    """Over several nodes the low-latency region is the one-node request's halves plus a
    staging block of their size (cuda/low_latency/low_latency.h ll_symmetric_region_bytes)."""
    from jax_ep.backends.cuda import buffer as cbuf
    from jax_ep.backends.cuda._ffi import limits

    hint = cbuf.ll_bytes_hint(128, 7168, 256, 16)
    half = cbuf._half_available(hint)
    assert half > 0 and half % 4096 == 0
    assert cbuf._ll_symmetric_bytes(hint) == limits()["ll_halves_offset"] + 3 * half
    assert limits()["ll_data_offset"] == limits()["ll_offset"] + limits()["ll_halves_offset"]
    assert cbuf._ll_symmetric_bytes(64 << 20) == 0  # no low-latency region asked for


def test_cuda_combine_recv_checks_the_sent_y_against_the_output():
    """combine_recv reads this rank's own rows from the y its send carried: an output
    asked in another dtype or width is refused with both named."""
    from jax_ep.backends.cuda import low_latency as cll

    cfg = LowLatencyConfig(num_experts=8, num_ranks=1, axis_name=harness.AXIS,
                           max_tokens_per_rank=4, num_tokens=4, num_topk=2, hidden=128,
                           use_fp8=False, backend="cuda", buffer_id=1)
    y = jnp.zeros((8, 4, 128), jnp.bfloat16)
    sent = cll.CombineSent(jnp.zeros((1,), jnp.int32), y)
    idx, w = jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2), jnp.float32)
    handle = LowLatencyHandleArrays(jnp.zeros((8, 4), jnp.int32), jnp.zeros((8, 1), jnp.int32),
                                    jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"y is bfloat16 \(8, 4, 128\).*float32 of width 128"):
        cll.ll_combine_recv(sent, idx, w, handle, cfg, jnp.float32, 128)
    with pytest.raises(ValueError, match=r"bfloat16 of width 64"):
        cll.ll_combine_recv(sent, idx, w, handle, cfg, jnp.bfloat16, 64)
