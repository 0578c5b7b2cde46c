"""CPU tests run on 8 simulated devices; GPU tests (marker ``gpu``) skip without GPUs."""

import os

if "JAX_EP_REAL_DEVICES" not in os.environ:  # GPU runs keep the real devices
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_ENABLE_X64", "0")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs and the jax_ep CUDA extension")
    config.addinivalue_line("markers", "slow: longer CPU test")
