"""One test harness for every mesh: simulated CPU devices, the GPUs of one process, and
ranks spread over processes (one pytest per rank, possibly sharing GPUs; tests/multiprocess.py).

A test builds the same host inputs from the same seed on every rank, runs a per-rank function
under ``shard_map`` with :func:`run` (the devices under test) and :func:`run_reference` (the
reference backend on this process's own simulated CPU devices: it needs no collective between
processes, which NCCL refuses for ranks sharing a GPU), and compares the two. Both return host
arrays ``[R, ...]`` holding every rank's result on every process, so every rank makes the same
assertions and the ranks stay in step.

Between processes, results travel as files in a directory all ranks see (the system temporary
directory when they share a host; ``JAX_EP_TEST_SHARED_DIR`` otherwise), synchronised
through ``jax.distributed``'s key-value store.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import pickle
import shutil
import tempfile
import zlib
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "ep"
# EP sizes every multi-rank test runs at; which of them a pytest process runs is decided in
# tests/conftest.py from how the ranks are placed.
RANKS = (1, 2, 4, 8)
MULTI_RANKS = (2, 4, 8)
SHARED_DIR_ENV = "JAX_EP_TEST_SHARED_DIR"
RANKS_PER_GPU_ENV = "JAX_EP_TEST_RANKS_PER_GPU"  # set by tests/multiprocess.py


# ----------------------------------------------------------------------------- placement

def distributed() -> bool:
    """The ranks of this run are separate processes (one pytest per rank)."""
    return jax.process_count() > 1


def devices_under_test() -> List[Any]:
    """The devices EP ranks run on: the default backend's devices of every process, in
    process order. On CPU, where each process's extra simulated devices are there for the
    reference backend, a distributed run takes the first device of each process."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if not distributed() or devices[0].platform != "cpu":
        return devices
    first = {}
    for d in devices:
        first.setdefault(d.process_index, d)
    return [first[p] for p in sorted(first)]


def mesh(num_ranks: int) -> Mesh:
    devices = devices_under_test()
    if len(devices) < num_ranks:
        raise AssertionError(f"the test needs {num_ranks} ranks, this run has {len(devices)} "
                             "(tests/conftest.py should have deselected it)")
    return Mesh(np.array(devices[:num_ranks]), (AXIS,))


def reference_mesh(num_ranks: int) -> Mesh:
    """This process's simulated CPU devices (tests/conftest.py makes 8 of them)."""
    cpus = jax.local_devices(backend="cpu")
    assert len(cpus) >= num_ranks, f"need {num_ranks} CPU devices, have {len(cpus)}"
    return Mesh(np.array(cpus[:num_ranks]), (AXIS,))


def ranks_share_a_gpu() -> bool:
    """Ranks of this job share GPUs (tests/multiprocess.py placed them so)."""
    return distributed() and int(os.environ.get(RANKS_PER_GPU_ENV, "1")) > 1


def needs_xla_collectives() -> None:
    """Skips a test whose computation holds XLA collectives between the ranks (psum, a
    sum over a sharded axis) where they cannot run: NCCL refuses two ranks on one GPU
    ("Duplicate GPU detected"). jax_ep's own exchanges need no NCCL."""
    if ranks_share_a_gpu():
        import pytest

        pytest.skip("XLA collectives between ranks sharing a GPU: NCCL refuses them")


def num_sms() -> int:
    """SMs per kernel: ranks that share a GPU split its SMs, so that their co-resident
    spin-waits cannot starve each other."""
    from jax_ep.types import DEFAULT_NUM_SMS

    share = int(os.environ.get(RANKS_PER_GPU_ENV, "1"))
    return max(1, min(DEFAULT_NUM_SMS, _gpu_sms() // share))


def _gpu_sms() -> int:
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    return getattr(gpus[0], "core_count", 132) if gpus else 132


def ll_num_sms():
    """SMs per low-latency kernel: their default (None, nearly every SM) on a GPU of one's
    own; ranks sharing a GPU split it, or one rank's spinning blocks could hold the SMs a
    peer's blocks need to send (under MPS the ranks' kernels run at once)."""
    if not ranks_share_a_gpu():
        return None
    return max(1, _gpu_sms() // int(os.environ.get(RANKS_PER_GPU_ENV, "1")))


_buffers: Dict[int, Any] = {}


def new_buffer(num_ranks: int, **kwargs):
    """A CUDA Buffer over :func:`mesh` with this run's SM share (see :func:`num_sms`)."""
    import jax_ep

    kwargs.setdefault("num_sms", num_sms())
    return jax_ep.Buffer(mesh(num_ranks), AXIS, backend="cuda", **kwargs)


def buffer(num_ranks: int):
    """One CUDA Buffer per EP size, shared by the tests (as a training job would)."""
    if num_ranks not in _buffers:
        _buffers[num_ranks] = new_buffer(num_ranks, num_nvl_bytes=64 << 20)
    return _buffers[num_ranks]


# ----------------------------------------------------------------------------- running

def _stacked(a) -> np.ndarray:
    """A per-rank list of arrays or an ``[R, ...]`` array, as one host array."""
    if isinstance(a, (list, tuple)):
        return np.stack([np.asarray(x) for x in a])
    return np.asarray(a)


def put(m: Mesh, per_rank):
    """Host ``[R, ...]`` arrays (or per-rank lists; any pytree of them) -> global arrays
    sharded over the EP axis of ``m``, each process filling the blocks it owns."""
    sharding = NamedSharding(m, P(AXIS))

    def one(a):
        if isinstance(a, jax.Array):
            return a
        host = _stacked(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
    return jax.tree.map(one, per_rank, is_leaf=lambda a: isinstance(a, list))


def _padded(shape) -> tuple:
    """``shape`` with its first zero-length axis after the rank axis made 1."""
    shape = list(shape)
    for i in range(1, len(shape)):
        if shape[i] == 0:
            shape[i] = 1
            break
    return tuple(shape)


def _cut(a, shape):
    return a[tuple(slice(0, n) for n in shape)]


def _run_on(m: Mesh, fn, args, jit: bool):
    """XLA cannot partition a shard_map whose operands or results have zero elements over
    several processes' GPUs ("GlobalToLocalShape", jax 0.11.2), so such arrays cross the
    shard_map boundary padded by one row and are cut back on either side: ``fn`` (the
    kernels under test) sees the zero-size arrays themselves."""
    num_ranks = m.devices.size
    host_args = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else _stacked(a), args,
                             is_leaf=lambda a: isinstance(a, list))
    in_shapes = jax.tree.map(lambda a: a.shape[1:], host_args)

    def padded_host(a):
        if isinstance(a, jax.Array) or a.size:
            return a
        return np.zeros(_padded(a.shape), a.dtype)

    out_shapes = []  # each result's shape, recorded when the body is traced (once)

    def body(*xs):
        xs = jax.tree.map(lambda a, s: _cut(a[0], s), xs, in_shapes)
        outs = jax.tree.map(lambda a: jnp.asarray(a)[None], fn(*xs))
        out_shapes[:] = [(num_ranks,) + a.shape[1:] for a in jax.tree.leaves(outs)]
        return jax.tree.map(lambda a: a if a.size else jnp.zeros(_padded(a.shape), a.dtype),
                            outs)

    f = jax.shard_map(body, mesh=m, in_specs=P(AXIS), out_specs=P(AXIS))
    f = jax.jit(f) if jit else f
    out = fetch(f(*[put(m, jax.tree.map(padded_host, a)) for a in host_args]))
    leaves, tree = jax.tree.flatten(out)
    out = jax.tree.unflatten(tree, [_cut(a, s) for a, s in zip(leaves, out_shapes)])
    for leaf in jax.tree.leaves(out):
        assert leaf.shape[0] == num_ranks
    return out


def run(fn, num_ranks: int, *args, jit: bool = True):
    """``fn(*one rank's args) -> pytree`` on the devices under test; ``args`` are host
    ``[R, ...]`` arrays, per-rank lists or pytrees of them (or global arrays). Returns host
    ``[R, ...]`` arrays with every rank's result, on every process."""
    return _run_on(mesh(num_ranks), fn, args, jit)


def run_reference(fn, num_ranks: int, *args, jit: bool = True):
    """:func:`run` on simulated CPU devices (for the reference backend). When distributed,
    process 0 computes it and the others read its result (every process has the same
    inputs, so they would compute the same thing)."""
    if not distributed():
        return _run_on(reference_mesh(num_ranks), fn, args, jit)
    n = next(_gather_ids)
    path = shared_dir() / f"reference-{n}.pickle"
    if jax.process_index() == 0:
        try:
            outcome = ("result", _run_on(reference_mesh(num_ranks), fn, args, jit))
        except Exception as err:  # the others raise it too, so every rank stays in step
            outcome = ("error", err)
        try:
            data = pickle.dumps(outcome)
        except Exception:  # an unpicklable error: its text is enough
            data = pickle.dumps(("error", RuntimeError(f"reference on process 0: "
                                                       f"{outcome[1]!r}")))
        path.write_bytes(data)
    _barrier(f"tests/harness/reference/{n}")
    with open(path, "rb") as f:
        kind, value = pickle.load(f)
    if kind == "error":
        raise value
    return value


# ----------------------------------------------------------------------------- gathering

_gather_ids = itertools.count()
_my_files: List[pathlib.Path] = []
_shared_dir: List[pathlib.Path] = []


def shared_dir() -> pathlib.Path:
    """A directory every process of the run sees (made by process 0, named to the others)."""
    if _shared_dir:
        return _shared_dir[0]
    from jax_ep import distributed as dist

    hosts = dist.process_hosts("tests/harness/hosts")
    base = os.environ.get(SHARED_DIR_ENV)
    if base is None and len(set(hosts)) > 1:
        raise RuntimeError(f"tests spread over {len(set(hosts))} hosts exchange results as "
                           f"files: set {SHARED_DIR_ENV} to a directory every host sees")
    path = ""
    if jax.process_index() == 0:
        path = tempfile.mkdtemp(prefix="jax_ep_ranks_", dir=base)
    path = dist.all_gather_bytes("tests/harness/shared_dir", path.encode())[0].decode()
    _shared_dir.append(pathlib.Path(path))
    return _shared_dir[0]


def remove_shared_dir() -> None:
    """At the end of the run (tests/conftest.py), once every process has read its last
    results, process 0 removes the directory."""
    if not _shared_dir:
        return
    _barrier("tests/harness/end")
    if jax.process_index() == 0:
        shutil.rmtree(_shared_dir[0], ignore_errors=True)


def _barrier(key: str) -> None:
    from jax_ep import distributed as dist

    dist.all_gather_bytes(key, b"")


def fetch(tree):
    """Global (or local) arrays -> full host arrays on every process."""
    leaves, treedef = jax.tree.flatten(tree)
    local = [not isinstance(a, jax.Array) or a.is_fully_addressable for a in leaves]
    if all(local):
        return jax.tree.unflatten(treedef, [np.asarray(a) for a in leaves])
    n = next(_gather_ids)
    me = jax.process_index()
    folder = shared_dir() / str(n)
    folder.mkdir(exist_ok=True)
    pieces = {}
    for i, a in enumerate(leaves):
        if not local[i]:
            for s in a.addressable_shards:
                if s.replica_id == 0:
                    where = ";".join(f"{x.start}-{x.stop}" for x in _slices(s.index, a.shape))
                    data = np.ascontiguousarray(np.asarray(s.data)).reshape(-1)
                    pieces[f"{i}:{where}"] = data.view(np.uint8)
    mine = folder / f"{me}.npz"
    np.savez(mine, **pieces)
    _barrier(f"tests/harness/gather/{n}")
    for old in _my_files:  # every process read those before it reached this barrier
        old.unlink(missing_ok=True)
    _my_files[:] = [mine]
    full = [np.asarray(a) if local[i] else np.zeros(a.shape, a.dtype)
            for i, a in enumerate(leaves)]
    filled = [np.zeros(a.shape, bool) if not local[i] else None for i, a in enumerate(leaves)]
    for p in range(jax.process_count()):
        with np.load(folder / f"{p}.npz") as data:
            for key in data.files:
                i, where = key.split(":")
                i = int(i)
                idx = tuple(slice(*map(int, r.split("-"))) for r in where.split(";") if r)
                target = full[i] if full[i].ndim else full[i].reshape(1)  # views, so that
                seen = filled[i] if filled[i].ndim else filled[i].reshape(1)  # 0-d works too
                idx = idx or (slice(0, 1),)
                target[idx] = data[key].view(target.dtype).reshape(target[idx].shape)
                seen[idx] = True
    for i, f in enumerate(filled):
        if f is not None and not f.all():
            raise AssertionError(f"result {i}: {int((~f).sum())} elements came from no process")
    return jax.tree.unflatten(treedef, full)


def _slices(index, shape):
    return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def all_ranks(value) -> list:
    """Every process's ``value`` (small, JSON-able), in process order."""
    import json

    from jax_ep import distributed as dist

    if not distributed():
        return [value]
    n = next(_gather_ids)
    got = dist.all_gather_bytes(f"tests/harness/values/{n}", json.dumps(value).encode())
    return [json.loads(g) for g in got]


# ----------------------------------------------------------------------------- data

def rng(seed: int, *salt) -> np.random.Generator:
    """A generator from ``seed`` and any values, the same in every process (``hash()`` of a
    string is not: Python salts it per process)."""
    return np.random.default_rng([seed, *[zlib.crc32(repr(s).encode()) for s in salt]])


def routing(rng, num_ranks, num_tokens, num_topk, num_experts, mask_prob=0.1):
    """DeepEP-style random top-k (|randn|+1 scores), distinct experts, some -1 slots.
    Returns ``[R, T, K]`` ids and weights."""
    scores = np.abs(rng.standard_normal((num_ranks, num_tokens, num_experts))) + 1
    idx = np.argsort(-scores, axis=-1)[..., :num_topk].astype(np.int32)
    if mask_prob:
        idx[rng.random(idx.shape) < mask_prob] = -1
    weights = rng.random((num_ranks, num_tokens, num_topk)).astype(np.float32)
    return idx, weights


def random_routing(rng, num_ranks, num_tokens, num_topk, num_experts, mask_prob=0.15,
                   skew=False):
    """Per-rank list of top-k ids (distinct per token) with some -1 slots; ``skew`` favours
    rank 0's experts."""
    idxs = []
    for _ in range(num_ranks):
        scores = np.abs(rng.standard_normal((num_tokens, num_experts))) + 1
        if skew:
            scores[:, : max(1, num_experts // num_ranks)] *= 4
        idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int32)
        idx[rng.random(idx.shape) < mask_prob] = -1
        idxs.append(idx)
    return idxs


def random_tokens(rng, num_ranks, num_tokens, hidden, dtype=np.float32):
    return [rng.standard_normal((num_tokens, hidden)).astype(dtype) for _ in range(num_ranks)]


def random_weights(rng, num_ranks, num_tokens, num_topk):
    return [rng.random((num_tokens, num_topk)).astype(np.float32) for _ in range(num_ranks)]


def gpu_fp8_cast(x):
    """``jax_ep.fp8.per_token_cast`` of host rows ``[..., H]`` by XLA on this process's GPU,
    as host arrays: what the kernels' FP8 cast must equal bitwise (XLA's CPU cast rounds a
    few scales differently, so the reference on CPU devices cannot provide it)."""
    from jax_ep import fp8

    x = np.asarray(x)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return (np.zeros(x.shape, jnp.float8_e4m3fn),
                np.zeros(x.shape[:-1] + (x.shape[-1] // 128,), np.float32))
    q, s = jax.jit(fp8.per_token_cast)(jax.device_put(flat, jax.local_devices()[0]))
    return np.asarray(q).reshape(x.shape), np.asarray(s).reshape(x.shape[:-1] + (-1,))


def assert_reduction_close(name, got, want, note=""):
    """Sums computed on two platforms (the kernels on GPUs, the reference's XLA on CPU):
    fp32 within 1e-6 of each element (plus 1e-6 of the largest, where terms cancel); 16-bit
    floats within one ulp (an fp32 sum a hair from a rounding boundary may round either way),
    on fewer than 1 in 1,000 elements."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    g, w = got.astype(np.float64), want.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{name}: NaN in different places {note}"
    g, w = np.nan_to_num(g), np.nan_to_num(w)
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    if got.dtype == np.float32:
        tol = np.abs(w) * 1e-6 + 1e-6 * scale
    else:
        tol = np.abs(w) * 2.0 ** -7 + 1e-5 * scale
    diff = np.abs(g - w)
    bad = diff > tol
    if bad.any():
        where = np.argwhere(bad)[:4].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.size} elements differ by more "
                             f"than the tolerance, first {where}: got "
                             f"{g[bad][:4].tolist()} want {w[bad][:4].tolist()} {note}")
    if got.dtype != np.float32 and got.size:
        frac = float(np.mean(diff > 0))
        assert frac < 1e-3, f"{name}: {frac:.2e} of the elements differ {note}"


def bits(a):
    """Floats (bf16/f8 included) as unsigned ints of the same width: bitwise comparisons."""
    a = np.asarray(a)
    if a.dtype.kind == "f" or a.dtype.name.startswith(("float8", "bfloat16")):
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom else float(np.linalg.norm(a - b))
