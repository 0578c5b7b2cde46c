"""The custom-call helper of the CUDA backend and the limits its kernels are built for.

Every op is one ``jax.ffi.ffi_call`` (``has_side_effect=True``: the ops communicate, so
XLA must neither drop nor merge them) whose results are marked varying over the EP axis.
Limits come from the extension (``_jax_ep_ffi.limits``, i.e. cuda/common/buffer_layout.h
and cuda/low_latency/low_latency.h) where it is built with CUDA; :data:`FALLBACK_LIMITS`
serves size hints and checks without it.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _native
from jax_ep.backends.vma import varying

I32 = jnp.int32
F32 = jnp.float32

# The extension's table (xla_ffi/buffer_bindings.cc), for installs without the CUDA build.
FALLBACK_LIMITS = {
    "max_ranks": 8,                    # kMaxRanks: one NVLink domain
    "max_experts": 1024,               # kMaxExperts
    "max_topk": 16,                    # kMaxTopk
    "ll_max_tokens_per_rank": 1024,    # kLLMaxTokensPerRank
    "ll_offset": 64 << 20,             # kLowLatencyOffset: start of the low-latency region
    "ll_data_offset": (64 << 20) + 24576,  # kLLDataOffset: past the low-latency header
    "ll_halves_offset": 24576,         # kLLHalvesOffset: the halves inside a region
    "ll_max_ranks": 64,                # kLLMaxRanks: one EP group of the low-latency ops
    "dup_src_offset": 61440,           # kDupSrcOffset: start of the expert layout's row table
}


@functools.lru_cache(maxsize=None)
def limits() -> dict:
    """What the kernels are compiled for: the extension's table, else the fallback."""
    ext = _native.load()
    table = getattr(ext, "limits", None) if ext is not None else None
    return dict(table) if table is not None else dict(FALLBACK_LIMITS)


def extension():
    return _native.extension()


def i64(v) -> np.int64:
    return np.int64(v)


def call(name: str, results, *args, axis_name: Optional[str] = None,
         input_output_aliases: Optional[dict] = None, has_side_effect: bool = True, **attrs):
    """``jax.ffi.ffi_call(name)`` on ``args`` with attributes ``attrs``; with ``axis_name``
    every operand and result is marked varying over that axis; ``input_output_aliases``
    ({operand index: result index}) as ``jax.ffi.ffi_call``'s. ``has_side_effect`` (the
    default, for ops that communicate: XLA must neither drop nor merge them) may be
    turned off only for a call whose results another side-effecting call always consumes
    and whose attributes make it unique (side_stream.py's launches)."""
    _native.load()
    if axis_name is not None:  # ffi_call wants every operand of the same vma type
        args = tuple(varying(a, axis_name) for a in args)
    out = jax.ffi.ffi_call(name, results, has_side_effect=has_side_effect,
                           input_output_aliases=input_output_aliases)(*args, **attrs)
    if axis_name is None:
        return out
    return jax.tree.map(lambda a: varying(a, axis_name), out)
