"""Communication buffer: the memory the CUDA kernels move tokens through.

It lives outside XLA's allocator and is created eagerly, outside ``jit``, for one
mesh axis. On the reference backend it only carries configuration.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Optional

from jax_ep import _native, distributed
from jax_ep.types import DEFAULT_NUM_SMS


_hosts_keys = itertools.count()  # one host exchange per Buffer, in creation order


def _cuda_buffer():
    """The CUDA backend's buffer module (imported lazily: it needs nothing at import)."""
    return importlib.import_module("jax_ep.backends.cuda.buffer")


class Buffer:
    """Communication buffer for expert parallelism over ``mesh.shape[axis_name]`` ranks.

    Args:
      mesh: the ``jax.sharding.Mesh`` the ops run under.
      axis_name: its expert-parallel axis.
      num_nvl_bytes: NVLink buffer bytes per GPU (default:
        :meth:`get_dispatch_size_hint` for 4096 tokens of hidden 7168). The low-latency ops
        need :meth:`get_low_latency_size_hint`; where the EP axis spans several nodes, the
        low-latency part of that request is allocated from NVSHMEM's symmetric heap, with
        a staging block of the same halves' size for the rows put to other nodes.
      num_sms: default SM count of the CUDA kernels (a per-call ``num_sms`` overrides it).
      num_staging_bytes: one process per GPU only: the staging area per GPU that rows
        travel through (default: :meth:`get_staging_size_hint` for 4096 tokens of hidden
        7168 at the rank layout's default capacity).
      num_rdma_bytes: EP axis over several nodes only: the NVSHMEM symmetric region per
        GPU that the RDMA hop moves rows through (default: :meth:`get_rdma_size_hint` for
        4096 tokens of hidden 7168). A smaller region than a call needs is used in chunks
        of tokens (at most 64; fewer bytes, more exchanges).
      backend: ``"auto"`` (CUDA when built and the mesh is on GPUs), ``"cuda"`` or
        ``"reference"``.
      side_stream: CUDA backend: run each normal op through this buffer (dispatch,
        combine, and combine's backward) on the library's own GPU stream, launched and
        then joined back to XLA's stream by two custom calls, so that compute placed
        between them with :func:`jax_ep.beside` runs at the same time (README
        "Overlapping exchanges with compute"). Results are the same. Default False: the
        exchanges run on XLA's compute stream. The low-latency ops always do (their
        overlap is the split form); the reference backend ignores it (its all_to_all is
        XLA's own collective).

    ``buffer.node_size`` is the number of EP ranks per NVLink domain (a host, or a logical
    node of ``JAX_EP_NODE_SIZE`` ranks): the axis size when the axis stays in one node.
    Where it spans several, the CUDA backend runs the internode path (an NVSHMEM hop
    between the ranks of equal local index, then NVLink inside the node; one process per
    GPU, README "Several nodes"), and combine sums each node's rows before adding the
    nodes, on both backends.

    One process per GPU (``jax.distributed.initialize``) works the same way: create the
    Buffer for the global mesh on every process, in the same order (creation and
    :meth:`close` are collective there; README "Multi-process and multi-host").

    Example::

        mesh = jax.make_mesh((4,), ("ep",))
        buf = jax_ep.Buffer(mesh, "ep")
        r = jax_ep.dispatch(x, idx, w, num_experts=64, axis_name="ep", buffer=buf)
        ...
        buf.close()   # or use `with jax_ep.Buffer(...) as buf:`
    """

    def __init__(self, mesh, axis_name: str, *, num_nvl_bytes: Optional[int] = None,
                 num_sms: int = DEFAULT_NUM_SMS, backend: str = "auto",
                 num_staging_bytes: Optional[int] = None, side_stream: bool = False,
                 num_rdma_bytes: Optional[int] = None):
        if axis_name not in mesh.shape:
            raise ValueError(f"Buffer: axis_name {axis_name!r} is not an axis of the mesh "
                             f"(axes: {tuple(mesh.shape)})")
        if not isinstance(num_sms, int) or num_sms < 1:
            raise ValueError(f"Buffer: num_sms must be a positive int, got {num_sms!r}")
        if backend not in ("auto", "cuda", "reference"):
            raise ValueError(f"Buffer: backend must be 'auto', 'cuda' or 'reference', got "
                             f"{backend!r}")
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(mesh.shape[axis_name])
        if not isinstance(side_stream, bool):
            raise ValueError(f"Buffer: side_stream must be True or False, got {side_stream!r}")
        # ranks per NVLink domain (node) of the EP axis; the normal combine sums node by node
        self.node_size = distributed.node_size_of(
            mesh, axis_name, hosts=distributed.process_hosts(f"buffer_hosts/{next(_hosts_keys)}"))
        self.num_sms = num_sms
        self.side_stream = side_stream
        self.buffer_id: Optional[int] = None
        self.multi_process = False  # the EP axis spans several processes (set on allocation)
        on_gpu = all(d.platform == "gpu" for d in mesh.devices.flat)
        if backend == "cuda" and not (_native.cuda_available() and on_gpu):
            why = (_native.cuda_status() if not _native.cuda_available() else
                   "the mesh is not made of GPUs")
            raise RuntimeError(f"Buffer(backend='cuda') needs the jax_ep CUDA kernels and a "
                               f"mesh of Hopper GPUs: {why}; use backend='reference' or 'auto'")
        use_cuda = backend == "cuda" or (backend == "auto" and on_gpu and
                                         _native.cuda_available())
        self.backend = "cuda" if use_cuda else "reference"
        self.num_nvl_bytes = num_nvl_bytes
        self.num_staging_bytes = num_staging_bytes
        if num_rdma_bytes is not None and (not isinstance(num_rdma_bytes, int) or
                                           num_rdma_bytes <= 0):
            raise ValueError(f"Buffer: num_rdma_bytes must be a positive int, got "
                             f"{num_rdma_bytes!r}")
        self.num_rdma_bytes = num_rdma_bytes
        self.rdma_ptr: Optional[int] = None  # the NVSHMEM region (EP axis over several nodes)
        if use_cuda:
            if num_nvl_bytes is None:
                self.num_nvl_bytes = self.get_dispatch_size_hint(4096, 7168, self.num_ranks)
            _cuda_buffer().allocate_buffer(self)  # sets buffer_id

    @staticmethod
    def get_dispatch_size_hint(num_tokens: int, hidden: int, num_ranks: int,
                               dtype_bytes: int = 2) -> int:
        """NVLink bytes per GPU that a normal dispatch/combine of this size needs."""
        return int(_cuda_buffer().nvl_bytes_hint(num_tokens, hidden, num_ranks, dtype_bytes))

    @staticmethod
    def get_staging_size_hint(num_tokens: int, hidden: int, num_ranks: int,
                              dtype_bytes: int = 2, num_topk: int = 8) -> int:
        """Staging bytes per GPU (one process per GPU only) for rank-layout dispatch and
        combine of ``num_tokens`` per rank at the default capacity; an expert-layout call
        needs about ``max_recv_tokens / (R*T)`` times that."""
        return int(_cuda_buffer().staging_bytes_hint(num_tokens, hidden, num_ranks,
                                                     dtype_bytes, num_topk))

    @staticmethod
    def get_rdma_size_hint(num_tokens: int, hidden: int, num_nodes: int,
                           dtype_bytes: int = 2, num_topk: int = 8) -> int:
        """RDMA (NVSHMEM) bytes per GPU that normal dispatch and combine of ``num_tokens``
        per rank need when the EP axis spans ``num_nodes`` nodes (combine's partials
        travel in fp32)."""
        from jax_ep.backends.cuda import internode
        return int(internode.rdma_bytes_hint(num_tokens, hidden, num_nodes, dtype_bytes,
                                             num_topk))

    @staticmethod
    def get_low_latency_size_hint(max_tokens_per_rank: int, hidden: int, num_experts: int,
                                  num_ranks: int, dtype_bytes: int = 2) -> int:
        """NVLink bytes per GPU for low-latency ops of this size (normal ops still fit)."""
        return int(_cuda_buffer().ll_bytes_hint(max_tokens_per_rank, hidden, num_experts,
                                                num_ranks, dtype_bytes))

    def check_fits_low_latency(self, cfg, dtype) -> None:
        """Raises a clear error at trace time when a low-latency call needs a larger buffer."""
        if self.buffer_id is not None:
            _cuda_buffer().check_fits_low_latency(self, cfg, dtype)

    def check_fits(self, cfg, payload) -> None:
        """Raises a clear error at trace time when a call needs more than this buffer."""
        if self.buffer_id is not None:
            _cuda_buffer().check_fits(self, cfg, payload)

    def close(self) -> None:
        """Frees the GPU memory (safe to call twice; collective across processes)."""
        if self.buffer_id is not None:
            _cuda_buffer().free_buffer(self)
            self.buffer_id = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Buffer(axis_name={self.axis_name!r}, num_ranks={self.num_ranks}, "
                f"backend={self.backend!r}, num_sms={self.num_sms}"
                + (", side_stream=True)" if self.side_stream else ")"))
