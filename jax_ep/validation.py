"""Argument checks shared by the public ops: each error names the argument and the fix."""

from __future__ import annotations

import operator
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
VECTOR_BYTES = 16  # kernels move rows in 16-byte vectors


def axis_size(axis_name: str, op: str) -> int:
    """Size of the expert-parallel axis; a clear error outside ``shard_map``."""
    if not isinstance(axis_name, str):
        raise TypeError(f"{op}: axis_name must be the name (str) of a mesh axis, got {axis_name!r}")
    try:
        return int(jax.lax.axis_size(axis_name))
    except (NameError, KeyError, ValueError) as err:
        raise ValueError(
            f"{op} must be called inside jax.shard_map over a mesh with axis {axis_name!r} "
            f"(e.g. jax.shard_map(f, mesh=mesh, in_specs=P({axis_name!r}), "
            f"out_specs=P({axis_name!r}))); the axis is not bound here") from err


def check_array(op: str, name: str, x, ndim: int, dtypes=None) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and not any(x.dtype == jnp.dtype(d) for d in dtypes):
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {x.dtype}")


def check_hidden(op: str, name: str, x) -> None:
    row_bytes = x.shape[-1] * jnp.dtype(x.dtype).itemsize
    if row_bytes % VECTOR_BYTES:
        step = VECTOR_BYTES // jnp.dtype(x.dtype).itemsize
        raise ValueError(
            f"{op}: {name}.shape[-1] (hidden={x.shape[-1]}) must be a multiple of {step} for "
            f"dtype {x.dtype} ({VECTOR_BYTES}-byte rows); pad the hidden dimension")


def as_int(value):
    """``value`` as a Python int when it is integer-like (int, np.int64, a 0-d integer
    NumPy array), else None. Bools and traced values are not integer-like here."""
    if isinstance(value, (bool, jax.core.Tracer)) or (
            hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.integer)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_num_experts(op: str, num_experts, num_ranks: int) -> int:
    """Returns ``num_experts`` as an int (np.int64 etc. are accepted)."""
    n = as_int(num_experts)
    if n is None or n <= 0:
        raise ValueError(f"{op}: num_experts must be a positive int (a static Python or "
                         f"NumPy integer, not a traced value), got {num_experts!r}")
    if n % num_ranks:
        raise ValueError(
            f"{op}: num_experts={n} is not divisible by the {num_ranks} ranks of the "
            "expert-parallel axis; choose a multiple of the axis size")
    return n


def check_topk(op: str, topk_idx, topk_weights, num_tokens: int) -> None:
    check_array(op, "topk_idx", topk_idx, 2, (jnp.int32,))
    if topk_idx.shape[0] != num_tokens:
        raise ValueError(f"{op}: topk_idx has {topk_idx.shape[0]} rows but x has {num_tokens} "
                         "tokens; they must match")
    if topk_idx.shape[1] < 1:
        raise ValueError(f"{op}: topk_idx must have at least one column (top-k >= 1)")
    if topk_weights is not None:  # bf16/f16 are cast to f32 by the ops
        check_array(op, "topk_weights", topk_weights, 2, FLOAT_DTYPES)
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(f"{op}: topk_weights shape {tuple(topk_weights.shape)} must equal "
                             f"topk_idx shape {tuple(topk_idx.shape)}")


def check_positive_int(op: str, name: str, value, minimum: int = 1) -> int:
    """Returns ``value`` as an int (NumPy integers are accepted)."""
    n = as_int(value)
    if n is None or n < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return n


def check_bool(op: str, name: str, value) -> bool:
    """Returns ``value`` when it is True or False (NumPy bools too); a clear error otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{op}: {name} must be True or False, got {value!r}")


def weights_f32(weights):
    """Routing weights in f32: bf16/f16 weights are cast (the ops accumulate in f32)."""
    return None if weights is None else weights.astype(jnp.float32)


def num_invalid_ids(topk_idx, num_experts: int):
    """Traced ``[]`` int32: slots holding an id outside ``[-1, E)`` (treated as -1)."""
    return jnp.sum((topk_idx < -1) | (topk_idx >= num_experts), dtype=jnp.int32)


def node_size(op: str, buffer, num_ranks: int) -> Optional[int]:
    """Ranks per node of the EP axis (the Buffer's topology; without a Buffer the
    ``JAX_EP_NODE_SIZE`` override), None when all ranks share one node."""
    from jax_ep import distributed

    size = getattr(buffer, "node_size", None) if buffer is not None else \
        distributed.env_node_size()
    if size is None or size == num_ranks:
        return None
    if size < 1 or num_ranks % size:
        raise ValueError(f"{op}: a node size of {size} ranks ({distributed.NODE_SIZE_ENV} or "
                         f"the Buffer's topology) does not divide the {num_ranks} ranks of the "
                         "EP axis")
    return int(size)


def check_buffer(op: str, buffer, axis_name: str, num_ranks: int) -> None:
    """A Buffer made for another axis or mesh is refused, naming both."""
    if buffer is None:
        return
    got_axis = getattr(buffer, "axis_name", None)
    if got_axis is None:  # not a jax_ep.Buffer (a test's stand-in): nothing to compare
        return
    if got_axis != axis_name or getattr(buffer, "num_ranks", num_ranks) != num_ranks:
        raise ValueError(
            f"{op}: buffer was made for axis {got_axis!r} of size {buffer.num_ranks} but this "
            f"call runs over axis {axis_name!r} of size {num_ranks}; create the Buffer with "
            f"jax_ep.Buffer(mesh, {axis_name!r}) for the shard_map's mesh")
    mesh = getattr(buffer, "mesh", None)
    try:  # the shard_map's mesh (names and sizes): absent on older JAX
        here = dict(jax.sharding.get_abstract_mesh().shape)
    except Exception:
        here = {}
    if here and mesh is not None and dict(mesh.shape) != here:
        raise ValueError(
            f"{op}: buffer was made for the mesh {dict(mesh.shape)} but this call runs in a "
            f"shard_map over the mesh {here}; create the Buffer for the mesh you shard_map over")


def expert_ids_in_range(topk_idx, num_experts: int):
    """Traced bool: every id is -1 or a valid expert. Used by ``check_inputs=True``."""
    return jnp.all((topk_idx >= -1) & (topk_idx < num_experts))
