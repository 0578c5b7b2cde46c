"""Test session set-up: devices, the multi-process mode, and which EP sizes this process runs.

- CPU runs (the default) get 8 simulated CPU devices. GPU runs (``JAX_EP_REAL_DEVICES=1``)
  keep the real GPUs and get the 8 CPU devices beside them: the reference backend runs
  there (tests/harness.py).
- ``--distributed``: this pytest is one rank of a job of several processes (one pytest per
  rank or per host), started by ``python -m tests.multiprocess`` or by a cluster launcher
  such as ``srun``. It joins the job with ``jax.distributed.initialize()``, which takes the
  coordinator from ``JAX_COORDINATOR_ADDRESS`` (or the cluster environment) and the process
  count and index from ``JAX_EP_TEST_NUM_PROCESSES`` / ``JAX_EP_TEST_PROCESS_ID`` and its
  GPUs from ``JAX_LOCAL_DEVICE_IDS`` when set.
- A test parametrised over ``R`` (EP size) runs where the run has that many ranks: in one
  process when it drives at least R devices, across processes when the job has exactly R.
  Other sizes are deselected here: they belong to another launch of the same suite.
"""

import os

os.environ.setdefault("JAX_ENABLE_X64", "0")
if "JAX_EP_REAL_DEVICES" not in os.environ:  # GPU runs keep the real devices
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


def pytest_addoption(parser):
    parser.addoption("--distributed", action="store_true",
                     help="join a jax.distributed job: this pytest is one of its processes")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs and the jax_ep CUDA extension")
    config.addinivalue_line("markers", "slow: longer CPU test")
    if config.getoption("--distributed"):
        import jax

        num = os.environ.get("JAX_EP_TEST_NUM_PROCESSES")
        pid = os.environ.get("JAX_EP_TEST_PROCESS_ID")
        ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(num_processes=int(num) if num else None,
                                   process_id=int(pid) if pid else None,
                                   local_device_ids=[int(i) for i in ids.split(",")]
                                   if ids else None,
                                   initialization_timeout=120)
        if "JAX_EP_TEST_SEED" not in os.environ:  # the same random inputs on every rank
            import time

            from jax_ep import distributed

            mine = str(time.time_ns() % (1 << 31)).encode()
            os.environ["JAX_EP_TEST_SEED"] = distributed.all_gather_bytes(
                "tests/seed", mine)[0].decode()


def _ranks_of_this_run():
    """(EP ranks of the job when distributed else None, devices this process drives)."""
    import jax

    from tests import harness

    if harness.distributed():
        return len(harness.devices_under_test()), len(jax.local_devices())
    return None, len(jax.devices())


def pytest_collection_modifyitems(config, items):
    job, local = _ranks_of_this_run()
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        R = params.params.get("R") if params is not None else None
        if job is not None:  # one rank of a job: only the tests of its size
            ok = R == job
        else:
            ok = R is None or R <= local
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    import sys

    harness = sys.modules.get("tests.harness")
    if harness is not None and session.config.getoption("--distributed"):
        harness.remove_shared_dir()


def pytest_runtest_logreport(report):
    """One rank of a job: print a failure as it happens (the other ranks' output goes to
    files, and a job stopped at its time limit never prints its summary)."""
    if report.failed and getattr(report, "longreprtext", ""):
        import sys

        jax = sys.modules.get("jax")
        if jax is not None and jax.process_count() > 1:
            lines = report.longreprtext.splitlines()
            print(f"\n[rank {jax.process_index()}] FAILED {report.nodeid} ({report.when}):\n"
                  + "\n".join(lines[-40:]), flush=True)
