"""Normal dispatch/combine on the reference backend against the NumPy oracle (CPU, 1-8 ranks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness, oracle

HANDLE_FIELDS = ("recv_src_rank", "recv_src_token", "recv_src_slot", "send_pos")


def _dispatch(layout, num_experts, capacity=None, alignment=1, backend="reference"):
    def fn(x, idx, w):
        return jax_ep.dispatch(x, idx, w, num_experts=num_experts, axis_name=harness.AXIS,
                               layout=layout, max_recv_tokens=capacity,
                               expert_alignment=alignment, backend=backend)
    return fn


def _assert_matches_oracle(got, want, layout):
    R = len(want)
    for r in range(R):
        w = want[r]
        np.testing.assert_array_equal(got.recv_x[r], w["recv_x"], err_msg=f"recv_x rank {r}")
        np.testing.assert_array_equal(got.recv_topk_idx[r], w["recv_topk_idx"])
        np.testing.assert_array_equal(got.recv_topk_weights[r], w["recv_topk_weights"])
        assert int(got.num_recv_tokens[r]) == w["num_recv_tokens"]
        assert int(got.num_overflow[r]) == w["num_overflow"]
        np.testing.assert_array_equal(got.num_recv_tokens_per_expert[r],
                                      w["num_recv_tokens_per_expert"])
        np.testing.assert_array_equal(got.group_sizes[r], w["group_sizes"])
        for field in HANDLE_FIELDS:
            np.testing.assert_array_equal(getattr(got.handle.arrays, field)[r], w[field],
                                          err_msg=f"{field} rank {r} ({layout})")


def _case(seed, R, T, K, E, H=32, dtype=np.float32, **routing):
    rng = np.random.default_rng(seed)
    xs = harness.random_tokens(rng, R, T, H, dtype)
    idxs = harness.random_routing(rng, R, T, K, E, **routing)
    ws = harness.random_weights(rng, R, T, K)
    return xs, idxs, ws


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("R", [1, 2, 4, 8])
def test_dispatch_matches_oracle(layout, R):
    E, T, K = 4 * R if R > 1 else 3, 9, 3
    xs, idxs, ws = _case(100 + R, R, T, K, E, skew=True)
    got = harness.run(_dispatch(layout, E), R, xs, idxs, ws)
    cap = jax_ep.default_capacity(T, R, K, E // R, layout)
    _assert_matches_oracle(got, oracle.dispatch(xs, idxs, ws, E, layout, cap), layout)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_dispatch_low_precision_bitwise(dtype):
    R, E, T, K = 4, 16, 12, 4
    xs, idxs, ws = _case(7, R, T, K, E, H=64, dtype=dtype)
    got = harness.run(_dispatch("rank", E), R, xs, idxs, ws)
    want = oracle.dispatch(xs, idxs, ws, E, "rank", R * T)
    for r in range(R):
        assert got.recv_x[r].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got.recv_x[r].view(np.uint16),
                                      want[r]["recv_x"].view(np.uint16))


def test_expert_layout_alignment():
    R, E, T, K, align = 4, 8, 10, 3, 8
    xs, idxs, ws = _case(3, R, T, K, E)
    cap = jax_ep.default_capacity(T, R, K, E // R, "expert", align)
    got = harness.run(_dispatch("expert", E, alignment=align), R, xs, idxs, ws)
    want = oracle.dispatch(xs, idxs, ws, E, "expert", cap, align)
    _assert_matches_oracle(got, want, "expert")
    for r in range(R):
        assert np.all(got.group_sizes[r] % align == 0)


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("T", [0, 1])
def test_zero_and_one_token(layout, T):
    R, E, K = 4, 8, 2
    xs, idxs, ws = _case(11, R, T, K, E, mask_prob=0.0)
    got = harness.run(_dispatch(layout, E), R, xs, idxs, ws)
    cap = jax_ep.default_capacity(T, R, K, E // R, layout)
    _assert_matches_oracle(got, oracle.dispatch(xs, idxs, ws, E, layout, cap), layout)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_all_tokens_to_one_expert(layout):
    R, E, T, K = 4, 8, 7, 1
    rng = np.random.default_rng(5)
    xs = harness.random_tokens(rng, R, T, 16)
    idxs = [np.full((T, K), 5, np.int32) for _ in range(R)]  # expert 5 lives on rank 2
    ws = harness.random_weights(rng, R, T, K)
    got = harness.run(_dispatch(layout, E), R, xs, idxs, ws)
    cap = jax_ep.default_capacity(T, R, K, E // R, layout)
    _assert_matches_oracle(got, oracle.dispatch(xs, idxs, ws, E, layout, cap), layout)
    assert [int(n) for n in got.num_recv_tokens] == [0, 0, R * T, 0]


def test_all_masked_tokens_send_nothing_and_combine_to_zero():
    R, E, T, K = 2, 4, 5, 3
    rng = np.random.default_rng(6)
    xs = harness.random_tokens(rng, R, T, 16)
    idxs = [np.full((T, K), -1, np.int32) for _ in range(R)]
    ws = harness.random_weights(rng, R, T, K)

    def fn(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="expert")
        return r.num_recv_tokens, jax_ep.combine(r.recv_x, r.handle, r.recv_topk_weights)

    n, out = harness.run(fn, R, xs, idxs, ws)
    assert all(int(v) == 0 for v in n)
    assert all(np.all(o == 0) for o in out)


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_capacity_overflow_is_reported(layout):
    R, E, T, K = 4, 8, 10, 2
    xs, idxs, ws = _case(8, R, T, K, E, mask_prob=0.0, skew=True)
    cap = 6
    got = harness.run(_dispatch(layout, E, capacity=cap), R, xs, idxs, ws)
    want = oracle.dispatch(xs, idxs, ws, E, layout, cap)
    _assert_matches_oracle(got, want, layout)
    assert max(int(o) for o in got.num_overflow) > 0
    needed = max(w["num_recv_tokens"] + w["num_overflow"] for w in want)
    with pytest.raises(jax_ep.CapacityError, match=f"max_recv_tokens >= {needed}"):
        jax_ep.check(got)
    full = harness.run(_dispatch(layout, E), R, xs, idxs, ws)
    jax_ep.check(full)  # default capacity never overflows


def test_check_inside_jit_with_checkify():
    from jax.experimental import checkify
    R, E, T, K = 2, 4, 6, 2
    xs, idxs, ws = _case(9, R, T, K, E, mask_prob=0.0)

    def fn(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, max_recv_tokens=2)
        jax_ep.check(r)
        return r.num_overflow

    m = harness.mesh(R)
    from jax.sharding import NamedSharding, PartitionSpec as P
    sh = NamedSharding(m, P(harness.AXIS))
    args = [jax.device_put(jnp.concatenate([jnp.asarray(a) for a in arrs]), sh)
            for arrs in (xs, idxs, ws)]
    f = jax.shard_map(lambda *a: fn(*a)[None], mesh=m, in_specs=P(harness.AXIS),
                      out_specs=P(harness.AXIS))
    err, _ = jax.jit(checkify.checkify(f))(*args)
    with pytest.raises(checkify.JaxRuntimeError, match="set max_recv_tokens >="):
        err.throw()


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_dispatch_combine_equals_moe_oracle(layout):
    R, E, T, K, H = 4, 16, 11, 4, 32
    xs, idxs, ws = _case(12, R, T, K, E, H=H)
    L = E // R
    scale = np.linspace(0.5, 2.0, E).astype(np.float32)

    def fn(x, idx, w):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout=layout)
        me = jax.lax.axis_index(harness.AXIS)
        if layout == "expert":
            e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * L, 0)
            y = jnp.tanh(r.recv_x * jnp.asarray(scale)[e][:, None])
            return jax_ep.combine(y, r.handle, r.recv_topk_weights)
        # rank layout: reduce over this rank's experts before combining
        e = jnp.where(r.recv_topk_idx >= 0, r.recv_topk_idx + me * L, 0)
        f = jnp.tanh(r.recv_x[:, None, :] * jnp.asarray(scale)[e][..., None])  # [cap, K, H]
        y = jnp.sum(f * r.recv_topk_weights[..., None], axis=1)
        return jax_ep.combine(y, r.handle)

    got = harness.run(fn, R, xs, idxs, ws)
    want = oracle.moe(xs, idxs, ws, E, lambda e, x: np.tanh(x * scale[e]))
    for r in range(R):
        np.testing.assert_allclose(got[r], want[r], rtol=1e-5, atol=1e-5)


def test_combine_matches_oracle_with_row_weights():
    R, E, T, K, H = 4, 8, 9, 3, 16
    xs, idxs, ws = _case(13, R, T, K, E, H=H)
    rng = np.random.default_rng(14)
    cap = jax_ep.default_capacity(T, R, K, E // R, "expert")
    ys = [rng.standard_normal((cap, H)).astype(np.float32) for _ in range(R)]
    row_w = [rng.random(cap).astype(np.float32) for _ in range(R)]

    def fn(x, idx, w, y, rw):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="expert")
        return jax_ep.combine(y, r.handle, rw), jax_ep.combine(y, r.handle)

    weighted, plain = harness.run(fn, R, xs, idxs, ws, ys, row_w)
    recvs = oracle.dispatch(xs, idxs, ws, E, "expert", cap)
    want_w = oracle.combine(ys, row_w, recvs, T)
    want_p = oracle.combine(ys, None, recvs, T)
    for r in range(R):
        np.testing.assert_allclose(weighted[r], want_w[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(plain[r], want_p[r], rtol=1e-6, atol=1e-6)


def test_fp8_dispatch_moves_values_and_scales_bitwise():
    R, E, T, K, H = 4, 8, 10, 2, 256
    xs, idxs, ws = _case(15, R, T, K, E, H=H)

    def fn(x, idx, w):
        q, s = jax_ep.fp8.per_token_cast(x)
        r = jax_ep.dispatch((q, s), idx, w, num_experts=E, axis_name=harness.AXIS)
        return r.recv_x, (q, s)

    (rq, rs), (q, s) = harness.run(fn, R, xs, idxs, ws)
    want_q = oracle.dispatch([a.view(np.uint8) for a in q], idxs, ws, E, "rank", R * T)
    want_s = oracle.dispatch(s, idxs, ws, E, "rank", R * T)
    for r in range(R):
        np.testing.assert_array_equal(rq[r].view(np.uint8), want_q[r]["recv_x"])
        np.testing.assert_array_equal(rs[r], want_s[r]["recv_x"])


@pytest.mark.parametrize("layout", ["rank", "expert"])
def test_cast_fp8_dispatch_equals_dispatching_the_cast_pair(layout):
    """dispatch(x, cast_fp8=True) moves per_token_cast(x) (values and scales, bitwise) and
    keeps the weights' gradient; x's gradient is zero, as for an FP8 pair."""
    R, E, T, K, H = 4, 8, 10, 2, 256
    xs, idxs, ws = _case(21, R, T, K, E, H=H)
    xs = [jnp.asarray(x, jnp.bfloat16) for x in xs]

    def fn(x, idx, w):
        kw = dict(num_experts=E, axis_name=harness.AXIS, layout=layout)
        cast = jax_ep.dispatch(x, idx, w, cast_fp8=True, **kw)
        pair = jax_ep.dispatch(jax_ep.fp8.per_token_cast(x), idx, w, **kw)

        def loss(x, w):
            r = jax_ep.dispatch(x, idx, w, cast_fp8=True, **kw)
            return jnp.sum(r.recv_topk_weights * 3.0)
        dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
        return cast.recv_x, pair.recv_x, cast.recv_topk_weights, pair.recv_topk_weights, dx, dw

    (cq, cs), (pq, ps), cw, pw, dx, dw = harness.run(fn, R, xs, idxs, ws)
    for r in range(R):
        assert cq[r].dtype == jnp.float8_e4m3fn and cs[r].dtype == np.float32
        np.testing.assert_array_equal(cq[r].view(np.uint8), pq[r].view(np.uint8))
        np.testing.assert_array_equal(cs[r], ps[r])
        np.testing.assert_array_equal(cw[r], pw[r])
        assert not np.any(np.asarray(dx[r], np.float32))
        # every valid slot's weight reaches some received row: its gradient is 3
        np.testing.assert_array_equal(dw[r], np.where(idxs[r] >= 0, 3.0, 0.0))


def test_cast_fp8_rejects_what_it_cannot_cast():
    R, E, T, K = 2, 4, 3, 2
    xs, idxs, ws = _case(22, R, T, K, E, H=96)

    def run(x):
        def fn(x, idx, w):
            return jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS,
                                   cast_fp8=True).recv_x
        return harness.run(fn, R, x, idxs, ws)
    with pytest.raises(TypeError, match="bfloat16"):
        run(xs)  # f32 x
    with pytest.raises(ValueError, match="hidden % 128"):
        run([jnp.asarray(x, jnp.bfloat16) for x in xs])  # H = 96


def test_deterministic():
    R, E, T, K = 4, 16, 20, 4
    xs, idxs, ws = _case(16, R, T, K, E)
    ys = [np.random.default_rng(17).standard_normal((R * T * K, 32)).astype(np.float32)] * R

    def fn(x, idx, w, y):
        r = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=harness.AXIS, layout="expert")
        return r.recv_x, jax_ep.combine(y, r.handle, r.recv_topk_weights)

    a = harness.run(fn, R, xs, idxs, ws, ys)
    b = harness.run(fn, R, xs, idxs, ws, ys)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_runs_in_lax_scan_with_changing_routing():
    R, E, T, K, H, steps = 4, 8, 6, 2, 16, 5
    rng = np.random.default_rng(18)
    xs = [rng.standard_normal((steps, T, H)).astype(np.float32) for _ in range(R)]
    idxs = [np.stack(harness.random_routing(rng, steps, T, K, E)) for _ in range(R)]
    ws = [rng.random((steps, T, K)).astype(np.float32) for _ in range(R)]

    def fn(x, idx, w):
        def step(carry, inp):
            xi, ii, wi = inp
            r = jax_ep.dispatch(xi, ii, wi, num_experts=E, axis_name=harness.AXIS, layout="expert")
            out = jax_ep.combine(r.recv_x * 2.0, r.handle, r.recv_topk_weights)
            return carry + jnp.sum(r.num_recv_tokens), out
        init = jnp.zeros_like(idx[0, 0, 0])  # varying over the axis, like the carry out
        return jax.lax.scan(step, init, (x, idx, w))

    total, outs = harness.run(fn, R, xs, idxs, ws)
    for r in range(R):
        for s in range(steps):
            want = oracle.moe([xs[r][s]], [idxs[r][s]], [ws[r][s]], E, lambda e, x: 2 * x)[0]
            np.testing.assert_allclose(outs[r][s], want, rtol=1e-6, atol=1e-6)


def test_get_dispatch_layout_matches_numpy():
    R, E, T, K = 4, 16, 13, 4
    _, idxs, _ = _case(19, R, T, K, E)

    def fn(idx):
        return jax_ep.get_dispatch_layout(idx, E, axis_name=harness.AXIS)

    got = harness.run(fn, R, idxs)
    for r in range(R):
        idx = idxs[r]
        per_expert = np.bincount(idx[idx >= 0], minlength=E)
        in_rank = np.array([[any(oracle.dest_rank(e, E, R) == d for e in row) for d in range(R)]
                            for row in idx])
        np.testing.assert_array_equal(got.num_tokens_per_expert[r], per_expert)
        np.testing.assert_array_equal(got.is_token_in_rank[r], in_rank)
        np.testing.assert_array_equal(got.num_tokens_per_rank[r], in_rank.sum(0))
