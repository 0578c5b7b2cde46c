"""NVLink-domain grouping and its override (single process)."""

import types

import pytest

from jax_ep import distributed


def _devices(processes):
    return [types.SimpleNamespace(process_index=p) for p in processes]


def test_domains_follow_hosts_of_processes():
    devs = _devices([0, 1, 2, 3])  # one GPU per process, processes 0-1 and 2-3 on two hosts
    assert distributed.nvlink_domains(devs, hosts=["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert distributed.nvlink_domains(devs, hosts=["a"] * 4) == [[0, 1, 2, 3]]


def test_node_size_override(monkeypatch):
    devs = _devices([0, 0, 0, 0])
    assert distributed.nvlink_domains(devs, node_size=2) == [[0, 1], [2, 3]]
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "1")
    assert distributed.nvlink_domains(devs, hosts=["a"]) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="node size 3 must divide the 4 ranks"):
        distributed.nvlink_domains(devs, node_size=3)


def test_single_process_needs_no_store():
    import jax
    assert distributed.process_hosts() and len(distributed.process_hosts()) == 1
    assert distributed.nvlink_domains(jax.devices()[:2]) == [[0, 1]]


def test_buffer_refuses_an_ep_axis_over_several_nodes(monkeypatch):
    """Two logical nodes of 2 GPUs: the intranode kernels cannot serve that EP axis."""
    import numpy as np

    from jax_ep.backends import cuda

    groups = np.array([_devices([0, 0, 0, 0])], dtype=object)
    cuda._check_one_nvlink_domain(groups, buffer_id=0)  # one host, one domain: fine
    monkeypatch.setenv(distributed.NODE_SIZE_ENV, "2")
    with pytest.raises(NotImplementedError, match=r"spans 2 NVLink domains .*\[\[0, 1\], \[2, 3\]\]"):
        cuda._check_one_nvlink_domain(groups, buffer_id=0)
