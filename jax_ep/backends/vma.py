"""Varying-manual-axes (vma) types of the ops' per-rank results under ``shard_map``."""

from __future__ import annotations

import jax


def vma_of(x):
    """The manual mesh axes ``x`` varies over, or None where this jax has no vma types."""
    try:
        aval = jax.typeof(x)
        vma = getattr(aval, "vma", None)
        if vma is None:  # jax 0.10 spells it aval.mat.varying
            vma = getattr(getattr(aval, "mat", None), "varying", None)
        return vma
    except Exception:
        return None


def varying(x: jax.Array, axis_name: str) -> jax.Array:
    """Marks a per-rank result as varying over the EP axis.

    ffi_call results carry no varying-manual-axes type, nor does an all_to_all of an empty
    array, while the other results of the ops vary over the axis; custom VJPs and scans
    under shard_map's check_vma compare the two, so every result must say so.
    """
    vma = vma_of(x)
    if vma is None or axis_name in vma:  # no vma types here, or already varying
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axis_name, to="varying")
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axis_name)
    return x
