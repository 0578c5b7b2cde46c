"""The internode path (RDMA hop over NVSHMEM, then the NVLink hop) == the reference backend.

Runs where the ranks are processes (``python -m tests.multiprocess``, one GPU each or
sharing the one there is): ``JAX_EP_NODE_SIZE`` cuts the EP axis into logical nodes, e.g. 4
ranks into 2 nodes x 2 or 4 x 1, whose "RDMA" hop NVSHMEM carries over P2P, and the
reference backend then sums combine node by node. The tests of tests/gpu/test_intranode.py
run here against an internode Buffer (bitwise dispatch, fresh random routing, uneven
routing, -1 slots, 1 and 0 tokens, overflow, FP8, gradients, a 1,000-step soak), plus the
cases of a node that receives nothing, buffer create/close, and a rank that dies.
Skipped without NVSHMEM, and in a one-process run (except the dying-rank test, which
launches its own processes).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import jax_ep
from jax_ep import distributed, nvshmem
from jax_ep.backends.cuda import internode as cuda_internode
from tests import harness as h
from tests.gpu import test_intranode as intranode
from tests.multiprocess import RankFailure, launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvshmem.is_available(), reason=nvshmem.why_unavailable()),
]

NODE_SIZES = (1, 2, 4)  # ranks per logical node; the run's rank count decides which apply
_buffers = {}


def over_nodes(test):
    """Runs ``test`` at every EP size R of a job and node size that makes several nodes
    (tests/conftest.py keeps the R of this job)."""
    test = pytest.mark.parametrize("node_size", NODE_SIZES, ids=lambda g: f"node{g}")(test)
    return pytest.mark.parametrize("R", h.MULTI_RANKS)(test)


def logical_nodes(R, node_size, monkeypatch):
    """Skips unless the run's R ranks are processes that make several nodes of
    ``node_size``; else cuts the EP axis into such logical nodes for the next Buffers."""
    if not h.distributed():
        pytest.skip("the internode path needs one process per GPU (tests.multiprocess)")
    if R % node_size or node_size == R:
        pytest.skip(f"{R} ranks do not make several nodes of {node_size}")
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, str(node_size))


@pytest.fixture
def internode(R, node_size, monkeypatch):
    """Logical nodes of ``node_size`` ranks; ``h.buffer`` returns an internode Buffer.
    Yields the EP size R (all the run's ranks)."""
    G = node_size
    logical_nodes(R, G, monkeypatch)
    if (R, G) not in _buffers:  # every rank runs the same tests in the same order
        _buffers[R, G] = h.new_buffer(R, num_nvl_bytes=64 << 20, num_rdma_bytes=192 << 20)
    buf = _buffers[R, G]
    assert buf.node_size == G and buf.rdma_ptr is not None
    monkeypatch.setattr(h, "buffer", lambda num_ranks: buf)
    yield R


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("fp8", [False, True, "cast"])
@over_nodes
def test_dispatch_matches_reference(internode, layout, fp8):
    intranode.test_dispatch_matches_reference(internode, layout, fp8)


@pytest.mark.parametrize("layout,case", intranode.EDGE_CASES)
@over_nodes
def test_dispatch_edge_cases(internode, layout, case):
    intranode.test_dispatch_edge_cases(internode, layout, case)


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("case", ["T1", "T0", "masked", "overflow"])
@over_nodes
def test_dispatch_cast_fp8_edge_cases(internode, layout, case):
    intranode.test_dispatch_cast_fp8_edge_cases(internode, layout, case)


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("target", ["node0_only", "last_expert_only"])
@over_nodes
def test_a_node_receives_nothing(internode, layout, target):
    """Every token goes to node 0's experts (the other nodes get nothing), or every slot to
    the last expert (one remote expert for all but the last node)."""
    R = internode
    T, H, K, E = 96, 256, 4, 8 * R
    rng = h.rng(intranode.SEED, "idle", layout, target)
    node_experts = E // (R // h.buffer(R).node_size)
    if target == "node0_only":
        idx = np.stack([np.stack([rng.permutation(node_experts)[:K] for _ in range(T)])
                        for _ in range(R)]).astype(np.int32)
    else:
        idx = np.full((R, T, K), E - 1, np.int32)
    got, _, _ = intranode.compare_dispatch(R, T, H, K, E, layout=layout, idx=idx,
                                           tag=f"idle_{target}")
    counts = np.asarray(got.num_recv_tokens)
    if target == "node0_only":
        assert counts[node_experts // (E // R):].sum() == 0 and counts.sum() > 0
    else:
        assert counts[:-1].sum() == 0 and counts[-1] > 0


@pytest.mark.parametrize("layout", ["rank", "expert"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@over_nodes
def test_combine_matches_reference(internode, layout, weighted, dtype):
    import jax.numpy as jnp

    intranode.test_combine_matches_reference(internode, layout, weighted, getattr(jnp, dtype))


@pytest.mark.parametrize("layout", ["rank", "expert"])
@over_nodes
def test_combine_after_overflow(internode, layout):
    intranode.test_combine_after_overflow(internode, layout)


@pytest.mark.parametrize("layout", ["rank", "expert"])
@over_nodes
def test_grads_match_reference(internode, layout):
    intranode.test_grads_match_reference(internode, layout)


@pytest.mark.parametrize("layout", ["rank", "expert"])
@over_nodes
def test_back_to_back_calls_no_corruption(internode, layout):
    intranode.test_back_to_back_calls_no_corruption(internode, layout)


@over_nodes
def test_a_small_rdma_buffer_runs_in_chunks(internode, monkeypatch):
    """A region smaller than the batch needs: the exchanges run chunk after chunk through
    it (results unchanged); one too small for 64 chunks is refused at trace time."""
    R = internode
    N = R // h.buffer(R).node_size
    with h.new_buffer(R, num_nvl_bytes=32 << 20, num_rdma_bytes=1 << 20) as small:
        chunk = cuda_internode.chunk_tokens(N, 256, [2048, 32, 32], False, small.num_rdma_bytes)
        assert 0 < chunk < 256
        intranode.compare_dispatch(R, 256, 1024, 8, 64, layout="expert", tag="chunked",
                                   buf=small)
        monkeypatch.setattr(h, "buffer", lambda num_ranks: small)
        intranode.test_combine_matches_reference(R, "rank", True, np.float32)
    with h.new_buffer(R, num_nvl_bytes=32 << 20, num_rdma_bytes=16 << 10) as tiny:
        x = np.zeros((R, 4096, 1024), np.float32)
        idx = np.zeros((R, 4096, 2), np.int32)
        with pytest.raises(ValueError, match="need an RDMA buffer of at least .* "
                                             "num_rdma_bytes>="):
            h.run(lambda a, i: jax_ep.dispatch(
                a, i, None, num_experts=2 * R, axis_name=h.AXIS, buffer=tiny,
                backend="cuda").recv_x, R, x, idx)


@over_nodes
def test_buffer_create_close_does_not_leak(internode):
    R = internode
    live = nvshmem.info()["live_allocations"]
    for cycle in range(5):
        with h.new_buffer(R, num_nvl_bytes=32 << 20, num_rdma_bytes=16 << 20) as b:
            assert b.rdma_ptr is not None and nvshmem.info()["live_allocations"] == live + 1
            intranode.compare_dispatch(R, T=64, H=256, K=2, E=8, tag=f"cycle{cycle}", buf=b)
        assert b.buffer_id is None and b.rdma_ptr is None
    assert nvshmem.info()["live_allocations"] == live


def test_a_dying_rank_makes_the_others_time_out_with_a_message():
    """4 processes as 2 nodes x 2; rank 1 exits before the second dispatch: the others'
    waits trap after the timeout with the op, the PE, the peer and the signal values."""
    if h.distributed():
        pytest.skip("launches its own processes (from the one-process run)")
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        launch("tests.gpu.nvshmem_bodies:internode_rank_dies", 4, platform="gpu", timeout=240,
               env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "NVSHMEM_DISABLE_NVLS": "1",
                    distributed.NODE_SIZE_ENV: "2"})
    text = str(info.value)
    assert "internode dispatch timed out on PE" in text, text[-3000:]
    assert "signal" in text and "want >=" in text
    assert time.monotonic() - t0 < 200


def test_the_python_rail_layout_matches_the_extension():
    """internode.rail_bytes mirrors cuda/internode/rail.h; its constants come from there."""
    ext = nvshmem._require()
    assert ext.rail_data_offset == cuda_internode.RAIL_HEADER_BYTES
    assert ext.max_nodes >= 2
