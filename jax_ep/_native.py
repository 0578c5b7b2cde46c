"""Loads the compiled extension (placeholder until the build lands)."""


def cuda_available() -> bool:
    return False


def why_unavailable() -> str:
    return "the jax_ep extension is not built"
