"""The internode path's row bookkeeping (CPU): where each received row sits among the node
hops' rows, against a NumPy oracle of the reference backend's order (the hops' rows
concatenated in source-node order; in the expert layout per expert, then padded)."""

import numpy as np
import pytest

from jax_ep.backends.cuda import internode


def _rank_oracle(need, cap):
    rows = [n * cap + q for n, c in enumerate(need) for q in range(c)][:cap]
    return np.array(rows + [-1] * (cap - len(rows)), np.int32)


def _expert_oracle(tot, cap, align):
    N, L = tot.shape
    rows = []
    for l in range(L):
        group = [n * cap + int(tot[n, :l].sum()) + j for n in range(N) for j in range(tot[n, l])]
        rows += group + [-1] * (-len(group) % align)
    rows = rows[:cap]
    return np.array(rows + [-1] * (cap - len(rows)), np.int32)


@pytest.mark.parametrize("seed", range(6))
def test_rank_layout_rows(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 5))
    need = rng.integers(0, 9, N)
    need[rng.random(N) < 0.3] = 0  # hops with no rows
    cap = int(rng.integers(1, max(2, need.sum() + 4)))
    num_recv = np.minimum(need, cap)
    rows, hop, total = internode._rank_layout_rows(num_recv.astype(np.int32),
                                                   (need - num_recv).astype(np.int32), cap)
    np.testing.assert_array_equal(rows, _rank_oracle(need, cap))
    assert int(total) == need.sum()
    live = np.asarray(rows) >= 0
    np.testing.assert_array_equal(np.asarray(hop)[live], np.asarray(rows)[live] // cap)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("align", [1, 4])
def test_expert_layout_rows(seed, align):
    rng = np.random.default_rng(seed)
    N, L = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    tot = rng.integers(0, 6, (N, L))
    tot[rng.random((N, L)) < 0.3] = 0
    padded = (tot.sum(0) + align - 1) // align * align
    cap = int(rng.integers(1, padded.sum() + 5))
    rows, hop, needed, start, end = internode._expert_layout_rows(tot.astype(np.int32), cap,
                                                                  align)
    np.testing.assert_array_equal(rows, _expert_oracle(tot, cap, align))
    assert int(needed) == padded.sum()
    np.testing.assert_array_equal(np.asarray(end) - np.asarray(start), padded)
    live = np.asarray(rows) >= 0
    np.testing.assert_array_equal(np.asarray(hop)[live], np.asarray(rows)[live] // cap)


def test_rdma_size_hint_covers_dispatch_and_combine():
    hint = internode.rdma_bytes_hint(4096, 7168, 2)
    dispatch = internode.rail_bytes(2, 4096, [7168 * 2, 32, 32], False)
    combine = internode.rail_bytes(2, 4096, [7168 * 4], True)
    assert hint == max(dispatch, combine) == combine
    # header, flags and rows of 2 sources, the send rows of 2 destinations, send flags
    assert combine >= 4096 + 2 * 4096 * 7168 * 4 * 2


def test_chunk_tokens_is_the_most_that_fits():
    rows = [2048, 32, 32]
    whole = internode.rail_bytes(2, 256, rows, False)
    assert internode.chunk_tokens(2, 256, rows, False, whole) == 256
    for region in (1 << 20, 300_000, 20_000):
        c = internode.chunk_tokens(2, 256, rows, False, region)
        assert internode.rail_bytes(2, c, rows, False) <= region
        assert internode.rail_bytes(2, c + 1, rows, False) > region
    assert internode.chunk_tokens(2, 256, rows, False, 4096) == 0  # the header alone


def test_row_maps_lower_without_while_loops():
    # searchsorted's default method is a while loop, whose predicate goes device -> host
    # on every step on GPUs: the row maps must be loop-free
    import jax
    import jax.numpy as jnp

    num_recv = jnp.asarray([3, 5], jnp.int32)
    rank = jax.jit(lambda n, o: internode._rank_layout_rows(n, o, 16)).lower(
        num_recv, jnp.zeros_like(num_recv)).as_text()
    expert = jax.jit(lambda t: internode._expert_layout_rows(t, 32, 4)).lower(
        jnp.ones((2, 3), jnp.int32)).as_text()
    assert "while" not in rank and "while" not in expert
