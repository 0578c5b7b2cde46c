"""jax_ep.masked_grouped_matmul (the masked layout of packed low-latency rows) on the
reference path: against a NumPy oracle, its gradients against the dense einsum on the live
rows, and end to end after low_latency_dispatch(packed=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import harness


def _oracle(x, w, counts):
    out = np.zeros(x.shape[:2] + (w.shape[2],), np.float32)
    for g, n in enumerate(counts):
        out[g, :n] = x[g, :n].astype(np.float32) @ w[g].astype(np.float32)
    return out


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [8, 8, 8, 8], [0, 8, 0, 2]])
def test_matches_the_oracle_and_never_reads_past_the_counts(counts):
    rng = np.random.default_rng(sum(counts))
    G, S, K, N = 4, 8, 16, 24
    x = rng.standard_normal((G, S, K)).astype(np.float32)
    w = rng.standard_normal((G, K, N)).astype(np.float32)
    dirty = x.copy()
    for g, n in enumerate(counts):
        dirty[g, n:] = np.nan  # rows past the counts may hold anything
    got = jax_ep.masked_grouped_matmul(jnp.asarray(dirty), jnp.asarray(w),
                                       jnp.asarray(counts, jnp.int32), backend="reference")
    np.testing.assert_allclose(np.asarray(got), _oracle(x, w, counts), rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_dense_einsum_on_live_rows():
    rng = np.random.default_rng(1)
    G, S, K, N = 3, 6, 8, 8
    counts = jnp.asarray([2, 6, 0], jnp.int32)
    x = jnp.asarray(rng.standard_normal((G, S, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((G, K, N)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((G, S, N)), jnp.float32)
    live = (jnp.arange(S)[None, :] < counts[:, None])[..., None]

    def masked(x, w):
        return jnp.sum(jax_ep.masked_grouped_matmul(x, w, counts, backend="reference") * g)

    def dense(x, w):
        return jnp.sum(jnp.where(live, jnp.einsum("gsk,gkn->gsn", x, w), 0.0) * g)

    for a, b in zip(jax.grad(masked, (0, 1))(x, w), jax.grad(dense, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_after_a_packed_low_latency_dispatch():
    R, E, T, K, M, H, F = 4, 8, 6, 2, 8, 16, 8
    rng = np.random.default_rng(2)
    xs = harness.random_tokens(rng, R, T, H)
    idxs = harness.random_routing(rng, R, T, K, E)
    w = rng.standard_normal((E // R, H, F)).astype(np.float32)

    def fn(x, idx):
        r = jax_ep.low_latency_dispatch(x, idx, num_experts=E, max_tokens_per_rank=M,
                                        axis_name=harness.AXIS, packed=True)
        got = jax_ep.masked_grouped_matmul(r.recv_x, jnp.asarray(w), r.recv_count,
                                           backend="reference")
        live = (jnp.arange(R * M)[None, :] < r.recv_count[:, None])[..., None]
        want = jnp.where(live, jnp.einsum("lmh,lhf->lmf", r.recv_x, jnp.asarray(w)), 0.0)
        return got, want
    got, want = harness.run(fn, R, xs, idxs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got)).sum() > 0


def test_bad_arguments_name_the_fix():
    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match="counts must lie in"):
        jax_ep.masked_grouped_matmul(x, jnp.zeros((2, 8, 8)), jnp.asarray([5, 0]))
    with pytest.raises(ValueError, match="x holds 2 groups"):
        jax_ep.masked_grouped_matmul(x, jnp.zeros((3, 8, 8)), jnp.asarray([1, 0, 0]))
    with pytest.raises(ValueError, match="w.shape\\[1\\]"):
        jax_ep.masked_grouped_matmul(x, jnp.zeros((2, 4, 8)), jnp.asarray([1, 0]))


def test_lowers_without_while_loops():
    # a while loop's predicate goes device -> host on every step on GPUs (searchsorted's
    # default method is one): the row arithmetic must be loop-free, gradients included
    G, S, K, N = 4, 8, 16, 24
    x = jnp.zeros((G, S, K), jnp.float32)
    w = jnp.zeros((G, K, N), jnp.float32)
    counts = jnp.asarray([3, 0, 8, 1], jnp.int32)

    def loss(x, w, c):
        return jnp.sum(jax_ep.masked_grouped_matmul(x, w, c, backend="reference"))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w, counts).as_text()
    assert "while" not in hlo
