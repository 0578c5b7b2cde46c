"""Multi-process plumbing: exchanging bytes between processes and finding NVLink domains.

With one process per GPU (``jax.distributed.initialize``), the communication buffers
of a node's GPUs are mapped into each other through IPC handles, and NVSHMEM needs one
unique id shared by every process. Both travel through ``jax.distributed``'s
key-value store, the one channel every JAX multi-process job already has.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

_TIMEOUT_MS = 120_000
NODE_SIZE_ENV = "JAX_EP_NODE_SIZE"  # override: consecutive EP ranks per NVLink domain


def _client():
    from jax._src import distributed  # the KV store has no public accessor yet
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax_ep: this needs jax.distributed.initialize() (one process per "
                           "GPU or per host) before the first jax_ep.Buffer is created")
    return client


def all_gather_bytes(key: str, payload: bytes, *, timeout_ms: int = _TIMEOUT_MS) -> List[bytes]:
    """Every process publishes ``payload`` under ``key``; returns all of them, by process.

    ``key`` must be unique per exchange (e.g. include a buffer id): the store keeps values.
    A process that never publishes makes the others fail after ``timeout_ms`` with an error
    naming the key and the missing process, instead of hanging.
    """
    client = _client()
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set_bytes(f"jax_ep/{key}/{me}", payload)
    out = []
    for p in range(n):
        try:
            out.append(client.blocking_key_value_get_bytes(f"jax_ep/{key}/{p}", timeout_ms))
        except Exception as err:  # the runtime raises its own type; name what was missing
            raise TimeoutError(f"jax_ep: process {me} waited {timeout_ms} ms for process {p} "
                               f"to publish {key!r}; did it fail or skip the same call?") from err
    return out


def process_hosts(key: str = "hostnames") -> List[str]:
    """Host name of every process (one exchange through the key-value store)."""
    if jax.process_count() == 1:
        return [socket.gethostname()]
    return [h.decode() for h in all_gather_bytes(key, socket.gethostname().encode())]


def nvlink_domains(devices: Sequence, node_size: Optional[int] = None,
                   hosts: Optional[Sequence[str]] = None) -> List[List[int]]:
    """Groups EP ranks (positions in ``devices``) into NVLink domains.

    By default the GPUs of one host share a domain (``hosts[p]`` is the host of process
    ``p``, from :func:`process_hosts` when not given). ``node_size`` (or the
    ``JAX_EP_NODE_SIZE`` environment variable) overrides it with consecutive groups of
    that many ranks: one host with 4 GPUs can then run as 2 "nodes" of 2, which is how
    the internode path is tested on one machine.
    """
    if node_size is None:
        node_size = env_node_size()
    if node_size is not None:
        if node_size < 1 or len(devices) % node_size:
            raise ValueError(f"jax_ep: node size {node_size} must divide the {len(devices)} "
                             f"ranks of the EP axis ({NODE_SIZE_ENV} or node_size=)")
        return [list(range(i, i + node_size)) for i in range(0, len(devices), node_size)]
    if hosts is None:
        hosts = process_hosts()
    groups: Dict[str, List[int]] = {}
    for rank, d in enumerate(devices):
        groups.setdefault(hosts[d.process_index], []).append(rank)
    return list(groups.values())


def env_node_size() -> Optional[int]:
    """The ``JAX_EP_NODE_SIZE`` override (ranks per logical node), or None when unset."""
    value = os.environ.get(NODE_SIZE_ENV)
    return int(value) if value else None


def ep_groups(mesh, axis_name: str):
    """Device groups along ``axis_name`` (one per coordinate of the other axes), in rank
    order: ``[groups, ranks]``."""
    devices = np.asarray(mesh.devices)
    axis = list(mesh.axis_names).index(axis_name)
    moved = np.moveaxis(devices, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def node_size_of(mesh, axis_name: str, hosts: Optional[Sequence[str]] = None) -> int:
    """Ranks per NVLink domain (node) of the EP axis: the axis size when it stays in one.

    The hierarchical (internode) order numbers ranks node-major, ``rank = node * G +
    local``, so every EP group must split into equal domains of consecutive ranks."""
    groups = ep_groups(mesh, axis_name)
    size = None
    for group in groups:
        domains = nvlink_domains(list(group), hosts=hosts)
        G = len(domains[0])
        if any(d != list(range(i * G, (i + 1) * G)) for i, d in enumerate(domains)):
            raise ValueError(
                f"jax_ep: the EP axis {axis_name!r} spans NVLink domains (nodes) {domains}; "
                "they must hold equal numbers of consecutive ranks (rank = node * "
                "ranks_per_node + local index): order the mesh's devices by host")
        if size is not None and G != size:
            raise ValueError(f"jax_ep: EP groups of axis {axis_name!r} have nodes of {size} "
                             f"and {G} ranks; every group needs the same node size")
        size = G
    return size
