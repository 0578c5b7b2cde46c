"""jax_ep.flax.MoE on the GPUs: the CUDA kernels agree with the reference backend, for
both exchanges (rank: one row per (token, rank); expert: one row per (token, expert)),
forward and gradients, bf16, with uneven routing from an untrained router. The layer's
statistics and the gradients of its replicated parameters are XLA psums over the EP axis:
they need NCCL between the ranks, so ranks sharing a GPU skip this test."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ep.flax import MoE
from tests import harness as h

pytestmark = pytest.mark.gpu

H, F, K = 256, 128, 4


def _layer(R, backend, exchange, expert_capacity):
    E = 8 * R
    mesh = h.mesh(R) if backend == "cuda" else h.reference_mesh(R)
    return MoE(hidden=H, ffn_hidden=F, num_experts=E, top_k=K, mesh=mesh,
               score_func="sigmoid", expert_capacity=expert_capacity, exchange=exchange,
               buffer=h.buffer(R) if backend == "cuda" else None, backend=backend,
               dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh


@pytest.mark.parametrize("R", h.RANKS)
@pytest.mark.parametrize("exchange", ["rank", "expert"])
@pytest.mark.parametrize("T", [1, 96])
def test_layer_cuda_matches_reference_forward_and_grads(R, exchange, T):
    h.needs_xla_collectives()  # the layer's statistics and replicated gradients are psums
    cap = R * T * K  # every row fits: nothing dropped, so both backends compute the same
    rng = np.random.default_rng(T)  # the same tokens on every process
    x = rng.standard_normal((R * T, H)).astype(jnp.bfloat16)
    target = rng.standard_normal((R * T, H)).astype(np.float32)

    def loss(m, x):
        out, stats = m(x)
        return jnp.mean((out.astype(jnp.float32) - target) ** 2), (out, stats)

    results = {}
    for backend in ("cuda", "reference"):
        layer, mesh = _layer(R, backend, exchange, cap)
        grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (val, (out, stats)), (gm, gx) = grad(layer, h.put(mesh, x))
        out, dropped, gx, gm = h.fetch((out, stats.dropped, gx,
                                        {k: v[...] for k, v in gm.items()}))
        results[backend] = (np.asarray(out, np.float32), int(dropped),
                            np.asarray(gx, np.float32),
                            {k: np.asarray(v, np.float32) for k, v in gm.items()})
    (out_c, drop_c, gx_c, gm_c), (out_r, drop_r, gx_r, gm_r) = results["cuda"], \
        results["reference"]
    assert drop_c == drop_r == 0
    # reductions in a different order (kernel vs XLA): bf16-level tolerance
    assert h.rel_err(out_c, out_r) < 1e-2, h.rel_err(out_c, out_r)
    assert h.rel_err(gx_c, gx_r) < 2e-2, h.rel_err(gx_c, gx_r)
    for name, g in gm_r.items():
        assert np.any(g != 0), name
        assert h.rel_err(gm_c[name], g) < 2e-2, (name, h.rel_err(gm_c[name], g))
