"""low_latency_dispatch(packed=True): each local expert's rows at [0, recv_count) in (source
rank, source token) order, zeros after; combine, the split forms and gradients take and give
the same values as the per-source layout (reference backend on CPU, NumPy oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness, oracle


def _inputs(seed, R, T, K, E, H=32):
    rng = np.random.default_rng(seed)
    return (harness.random_tokens(rng, R, T, H), harness.random_routing(rng, R, T, K, E, 0.2),
            harness.random_weights(rng, R, T, K))


def _packed_oracle(per_source, counts, M):
    """[L, R*M, ...] per-source rows -> packed rows (NumPy loops)."""
    out = np.zeros_like(per_source)
    for e in range(per_source.shape[0]):
        rows = [per_source[e, s * M + i] for s in range(counts.shape[1]) for i in range(counts[e, s])]
        if rows:
            out[e, :len(rows)] = np.stack(rows)
    return out


@pytest.mark.parametrize("R,T", [(1, 5), (2, 8), (4, 1), (4, 0), (8, 6)])
def test_packed_dispatch_matches_oracle(R, T):
    E, K, M = 2 * R if R > 1 else 4, 2, 8
    xs, idxs, _ = _inputs(R * 7 + T, R, T, K, E)

    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                           axis_name=harness.AXIS, packed=True)
    got = harness.run(fn, R, xs, idxs)
    want = oracle.low_latency_dispatch(xs, idxs, E, M)
    for r in range(R):
        counts = np.asarray(got.handle.arrays.recv_count_per_rank[r])
        np.testing.assert_array_equal(got.recv_x[r], _packed_oracle(want[r]["recv_x"], counts, M))
        np.testing.assert_array_equal(got.recv_count[r], want[r]["recv_count"])
        np.testing.assert_array_equal(counts.sum(axis=1), want[r]["recv_count"])


def _layer(E, M, packed, split=False, fp8=False):
    """Dispatch, an expert function that depends on the expert and the row, combine."""
    def fn(x, idx, w):
        kw = dict(num_experts=E, max_tokens_per_rank=M, axis_name=harness.AXIS, packed=packed,
                  use_fp8=fp8)
        if split:
            r = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(x, idx, **kw))
        else:
            r = jax_ep.low_latency_dispatch(x, idx, **kw)
        if fp8:
            q, scales = r.recv_x
            rx = jax_ep.fp8.per_token_cast_back(q.reshape(-1, q.shape[2]),
                                                scales.reshape(-1, scales.shape[2]),
                                                jnp.float32).reshape(q.shape)
        else:
            rx = r.recv_x
        L = rx.shape[0]
        y = jnp.tanh(rx) * (1.0 + jnp.arange(L, dtype=jnp.float32))[:, None, None]
        if split:
            return jax_ep.low_latency_combine_recv(
                jax_ep.low_latency_combine_send(y, idx, w, r.handle))
        return jax_ep.low_latency_combine(y, idx, w, r.handle)
    return fn


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_packed_combine_equals_per_source_combine(split, fp8):
    R, E, T, K, M, H = 4, 8, 7, 3, 8, 256
    xs, idxs, ws = _inputs(11, R, T, K, E, H)
    idxs[0][0] = [1, 1, -1]  # a duplicate expert: one row, weighted by both slots
    got = harness.run(_layer(E, M, True, split, fp8), R, xs, idxs, ws)
    want = harness.run(_layer(E, M, False, False, fp8), R, xs, idxs, ws)
    np.testing.assert_array_equal(got, want)


def test_packed_gradients_equal_per_source_gradients():
    R, E, T, K, M = 4, 8, 6, 2, 8
    xs, idxs, ws = _inputs(5, R, T, K, E)

    def grads(packed):
        def loss(x, idx, w):
            return jnp.sum(_layer(E, M, packed)(x, idx, w) ** 2)
        return lambda x, idx, w: jax.grad(loss, argnums=(0, 2))(x, idx, w)
    got = harness.run(grads(True), R, xs, idxs, ws)
    want = harness.run(grads(False), R, xs, idxs, ws)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_packed_must_be_a_bool():
    with pytest.raises(ValueError, match="packed must be True or False"):
        harness.run(lambda x, idx: jax_ep.low_latency_dispatch(
            x, idx, num_experts=4, max_tokens_per_rank=4, axis_name=harness.AXIS,
            packed="yes").recv_count, 1, [np.zeros((2, 8), np.float32)],
            [np.zeros((2, 1), np.int32)])
