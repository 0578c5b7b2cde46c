"""The low-latency ops over several (logical) nodes == the reference backend.

Runs where the ranks are processes (``python -m tests.multiprocess``, one GPU each or
sharing the one there is): ``JAX_EP_NODE_SIZE`` cuts the EP axis into logical nodes (4
ranks as 2 nodes x 2 or 4 x 1, 2 ranks as 2 x 1); the Buffer's low-latency region is then
NVSHMEM symmetric memory, the ranks of a node store into each other's regions and reach
the other nodes' ranks by NVSHMEM puts (over P2P on one machine: the same kernels and
ordering as over RDMA, not its speed). The tests of tests/gpu/test_low_latency_gpu.py run
here against that Buffer: dispatch bitwise (BF16 and FP8, 1/8/128 tokens, -1 slots,
duplicate experts, every token to one remote expert), combine within the reduction
tolerance, split == fused, packed rows, 1,000 decode steps in one jit-ed lax.scan, and
gradients; plus the error for a Buffer over nodes made without a low-latency region.
Skipped without NVSHMEM and in a one-process run.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import nvshmem
from jax_ep.backends import cuda as cll
from tests import harness as h
from tests.gpu import test_low_latency_gpu as ll
from tests.gpu.test_internode_gpu import logical_nodes, over_nodes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvshmem.is_available(), reason=nvshmem.why_unavailable()),
]

_buffers = {}


@pytest.fixture
def ll_internode(R, node_size, monkeypatch):
    """Logical nodes of ``node_size`` ranks; the low-latency tests' Buffer is an internode
    one with a symmetric low-latency region. Yields the EP size R."""
    logical_nodes(R, node_size, monkeypatch)
    if (R, node_size) not in _buffers:  # every rank runs the same tests in the same order
        _buffers[R, node_size] = h.new_buffer(
            R, num_nvl_bytes=cll.ll_bytes_hint(ll.MAX_M, ll.MAX_H, ll.MAX_E, R, dtype_bytes=4),
            num_rdma_bytes=16 << 20)
    buf = _buffers[R, node_size]
    assert buf.node_size == node_size and buf.ll_symmetric_ptr is not None
    monkeypatch.setattr(ll, "_buffer", lambda num_ranks: buf)
    yield R


@pytest.mark.parametrize("zero_padding", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T", [1, 8, 128])
@over_nodes
def test_dispatch_matches_reference(ll_internode, T, fp8, zero_padding):
    ll.test_dispatch_matches_reference(ll_internode, T, fp8, zero_padding)


@pytest.mark.parametrize("case", ["one_expert", "last_expert", "all_masked", "out_of_range"])
@pytest.mark.parametrize("fp8", [False, True])
@over_nodes
def test_dispatch_edge_routing(ll_internode, case, fp8):
    """one_expert / last_expert: every token of every rank to one expert, remote for the
    ranks of every other node."""
    ll.test_dispatch_edge_routing(ll_internode, case, fp8)


@over_nodes
def test_dispatch_zero_padding_after_garbage(ll_internode):
    ll.test_dispatch_zero_padding_after_garbage(ll_internode)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@over_nodes
def test_dispatch_other_dtypes(ll_internode, dtype):
    ll.test_dispatch_other_dtypes(ll_internode, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T", [1, 8, 128])
@over_nodes
def test_combine_matches_reference(ll_internode, T, dtype):
    ll.test_combine_matches_reference(ll_internode, T, dtype)


@pytest.mark.parametrize("case", ["one_expert", "all_masked"])
@over_nodes
def test_combine_edge_routing(ll_internode, case):
    ll.test_combine_edge_routing(ll_internode, case)


@over_nodes
def test_fp8_dispatch_then_bf16_combine(ll_internode):
    ll.test_fp8_dispatch_then_bf16_combine(ll_internode)


@over_nodes
def test_combine_never_reads_padding_rows(ll_internode):
    ll.test_combine_never_reads_padding_rows(ll_internode)


@pytest.mark.parametrize("fp8", [False, True])
@over_nodes
def test_split_equals_fused(ll_internode, fp8):
    ll.test_split_equals_fused(ll_internode, fp8)


@pytest.mark.parametrize("zero_padding", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@over_nodes
def test_public_split_api_equals_fused(ll_internode, fp8, zero_padding):
    ll.test_public_split_api_equals_fused(ll_internode, fp8, zero_padding)


@over_nodes
def test_public_split_api_grads_equal_fused(ll_internode):
    ll.test_public_split_api_grads_equal_fused(ll_internode)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("T", [1, 8, 128])
@over_nodes
def test_packed_matches_reference(ll_internode, T, split):
    ll.test_packed_matches_reference(ll_internode, T, split)


@over_nodes
def test_decode_scan_1000_steps(ll_internode):
    ll.test_decode_scan_1000_steps(ll_internode)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@over_nodes
def test_grads_match_reference(ll_internode, dtype):
    ll.test_grads_match_reference(ll_internode, dtype)


@over_nodes
def test_a_buffer_without_a_low_latency_region_is_a_clear_error(R, node_size, monkeypatch):
    logical_nodes(R, node_size, monkeypatch)
    with h.new_buffer(R, num_nvl_bytes=32 << 20, num_rdma_bytes=16 << 20) as buf:
        assert buf.rdma_ptr is not None and buf.ll_symmetric_ptr is None
        x = np.zeros((R, 8, 256), np.float32).astype(jnp.bfloat16)
        idx = np.zeros((R, 8, 2), np.int32)
        with pytest.raises(ValueError, match="without a low-latency region"):
            h.run(lambda a, i: jax_ep.low_latency_dispatch(
                a, i, num_experts=4 * R, max_tokens_per_rank=8, axis_name=h.AXIS, buffer=buf,
                backend="cuda").recv_x, R, x, idx)


@over_nodes
def test_buffer_create_close_does_not_leak(R, node_size, monkeypatch):
    """Both symmetric regions (rail and low-latency) come and go with the Buffer."""
    logical_nodes(R, node_size, monkeypatch)
    live = nvshmem.info()["live_allocations"]
    for cycle in range(3):
        with h.new_buffer(R, num_nvl_bytes=cll.ll_bytes_hint(8, 256, 4 * R, R),
                          num_rdma_bytes=8 << 20) as b:
            assert b.ll_symmetric_ptr is not None
            assert nvshmem.info()["live_allocations"] == live + 2
        assert b.buffer_id is None and b.ll_symmetric_ptr is None
    assert nvshmem.info()["live_allocations"] == live
