"""The CUTLASS grouped matmul on one GPU against the NumPy oracle and jax.lax.ragged_dot
(values and gradients) on fresh random data: uneven and empty groups, one group holding
every row, expert_alignment padding, rows past the groups, row counts that are not a
multiple of the tile, and K, N of 2048/4096/7168; groups of ~128 rows (the layer at EP1)
to well over a thousand."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from tests import grouped_oracle as go
from tests import harness as h

pytestmark = pytest.mark.gpu

SEED = int(os.environ.get("JAX_EP_TEST_SEED", time.time_ns() % (1 << 31)))
print(f"tests/gpu/test_grouped_matmul_gpu.py seed: JAX_EP_TEST_SEED={SEED}")


def _rng(*salt):
    return h.rng(SEED, *salt)


def _operands(rng, G, M, K, N):
    x = jnp.asarray(rng.standard_normal((M, K)) * 0.5, jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    return x, w


def test_kernel_is_built_and_auto_uses_it():
    from jax_ep.backends.cuda import grouped_matmul as cuda_gm

    assert cuda_gm.available(), "the extension was built without the grouped matmul (CUTLASS)"
    x, w = jnp.zeros((16, 64), jnp.bfloat16), jnp.zeros((2, 64, 32), jnp.bfloat16)
    text = jax.jit(jax_ep.grouped_matmul).lower(x, w, jnp.array([8, 8])).as_text()
    assert "jax_ep_grouped_matmul" in text


# (G, M, K, N): a few rows per group to well over a thousand.
FORWARD_SHAPES = [(8, 1000, 256, 512), (4, 333, 2048, 4096), (16, 2051, 7168, 2048),
                  (3, 1, 128, 256), (64, 8192, 256, 512), (3, 1800, 256, 512),
                  (2, 1100, 7168, 2048), (2, 1024, 2048, 4096)]
GRADIENT_SHAPES = [(8, 777, 256, 512), (4, 1500, 2048, 1024), (2, 1300, 2048, 1024),
                   (2, 1100, 7168, 2048)]


@pytest.mark.parametrize("case", ["random", "one_group", "all_empty", "aligned"])
@pytest.mark.parametrize("G,M,K,N", FORWARD_SHAPES)
def test_forward_matches_oracle_and_ragged_dot(case, G, M, K, N):
    rng = _rng("fwd", case, G, M, K, N)
    sizes = go.sizes_for(rng, case, G, M)
    x, w = _operands(rng, G, M, K, N)
    got = jax.jit(lambda x, w, s: jax_ep.grouped_matmul(x, w, s, backend="cuda"))(
        x, w, jnp.asarray(sizes))
    want = go.grouped_matmul(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes)
    go.close(got, want, f"out ({case}, sizes {sizes.tolist()[:8]})")
    assert not np.asarray(got[int(sizes.sum()):]).any(), "rows past the groups must be zero"
    ragged = jax.jit(lambda x, w, s: jax_ep.grouped_matmul(x, w, s, backend="reference"))(
        x, w, jnp.asarray(sizes))
    go.close(got, np.asarray(ragged, np.float64), "out vs jax.lax.ragged_dot")


@pytest.mark.parametrize("case", ["random", "one_group", "all_empty"])
@pytest.mark.parametrize("G,M,K,N", GRADIENT_SHAPES)
def test_gradients_match_oracle(case, G, M, K, N):
    rng = _rng("grad", case, G, M, K, N)
    sizes = go.sizes_for(rng, case, G, M)
    x, w = _operands(rng, G, M, K, N)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)

    def loss(x, w):
        y = jax_ep.grouped_matmul(x, w, jnp.asarray(sizes), backend="cuda")
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    want_dx, want_dw = go.grads(np.asarray(x, np.float32), np.asarray(w, np.float32), sizes,
                                np.asarray(dy, np.float32))
    go.close(dx, want_dx, f"dx ({case})")
    go.close(dw, want_dw, f"dw ({case})")  # an empty group's is exactly zero, too
    for g in np.flatnonzero(sizes == 0):
        assert not np.asarray(dw[g]).any(), f"dw[{g}] of an empty group must be zero"


def test_in_scan_with_traced_sizes_and_oversized_groups_clamped():
    """Group sizes computed on the device every step (no host read), inside lax.scan; sizes
    summing past M are clamped to the rows left, in group order."""
    G, M, K, N = 6, 512, 256, 256
    rng = _rng("scan")
    x, w = _operands(rng, G, M, K, N)
    base = jnp.asarray(go.sizes_for(rng, "random", G, M))

    def step(carry, i):
        sizes = jnp.roll(base, i) + jnp.where(i == 3, M, 0)  # step 3: far too many rows
        return carry, (jax_ep.grouped_matmul(x, w, sizes, backend="cuda"), sizes)
    outs, sizes = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(5))[1])()
    for i in range(5):
        s = np.asarray(sizes[i]).astype(np.int64)
        clamped, left = [], M
        for m in s:
            clamped.append(min(m, left))
            left -= clamped[-1]
        want = go.grouped_matmul(np.asarray(x, np.float32), np.asarray(w, np.float32),
                                 np.array(clamped))
        go.close(outs[i], want, f"step {i}")


def test_after_dispatch_in_the_expert_layout():
    """The rows and group sizes jax_ep.dispatch's expert layout gives feed the kernel."""
    R, T, H, K, E, F = 1, 300, 256, 4, 8, 512
    rng = _rng("dispatch")
    idx, wts = h.routing(rng, R, T, K, E)
    x = rng.standard_normal((R, T, H)).astype(np.float32)
    w_up = jnp.asarray(rng.standard_normal((E, H, F)) / np.sqrt(H), jnp.bfloat16)

    def f(x, i, wt):
        r = jax_ep.dispatch(x.astype(jnp.bfloat16), i, wt, num_experts=E, axis_name=h.AXIS,
                            layout="expert", expert_alignment=128, buffer=h.buffer(R))
        return r.recv_x, r.group_sizes, jax_ep.grouped_matmul(r.recv_x, w_up, r.group_sizes)
    recv_x, sizes, got = h.run(f, R, x, idx, wts)
    want = go.grouped_matmul(np.asarray(recv_x[0], np.float32), np.asarray(w_up, np.float32),
                             sizes[0])
    go.close(got[0], want, "expert layout")


@pytest.mark.parametrize("G,S,K,N", [(32, 256, 7168, 2048), (256, 128, 512, 256),
                                     (5, 64, 256, 512)])
def test_masked_matches_oracle_past_counts_garbage(G, S, K, N):
    """jax_ep.masked_grouped_matmul on the CUDA kernel: uneven counts with empty and full
    groups, NaN rows past the counts (never read), values and gradients against the NumPy
    oracle on the live rows; dead output rows are exactly zero."""
    rng = _rng("masked", G, S, K, N)
    counts = np.minimum(rng.poisson(max(S // 8, 1), G), S).astype(np.int32)
    counts[0], counts[-1] = 0, S
    x = np.asarray(rng.standard_normal((G, S, K)) * 0.5, np.float32)
    w = jnp.asarray(rng.standard_normal((G, K, N)) / np.sqrt(K), jnp.bfloat16)
    live = np.arange(S)[None, :] < counts[:, None]
    xb = jnp.asarray(np.where(live[..., None], x, np.nan), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((G, S, N)), jnp.bfloat16)

    def f(x, w):
        return jax_ep.masked_grouped_matmul(x, w, jnp.asarray(counts), backend="cuda")

    out, vjp = jax.jit(lambda x, w: jax.vjp(f, x, w))(xb, w)
    dx, dw = jax.jit(vjp)(dy)
    xf, wf = np.asarray(xb, np.float64), np.asarray(w, np.float64)
    dyf = np.asarray(dy, np.float64)
    out_np, dx_np = np.asarray(out, np.float64), np.asarray(dx, np.float64)
    assert not np.isnan(out_np).any() and not np.isnan(np.asarray(dw, np.float64)).any()
    assert (out_np[~live] == 0).all() and (dx_np[~live] == 0).all()
    for g in range(G):
        n = counts[g]
        go.close(out_np[g, :n], xf[g, :n] @ wf[g], f"out group {g}")
        go.close(dx_np[g, :n], dyf[g, :n] @ wf[g].T, f"dx group {g}")
        go.close(np.asarray(dw[g], np.float64), xf[g, :n].T @ dyf[g, :n], f"dw group {g}")
