"""Shared set-up of the tests that start Ray on this machine."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def loopback_only():
    """Ray's "no cluster" mode (servers on 127.0.0.1 only) and no usage reporting, for Rays started inside."""
    from ray._private import ray_constants

    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpus_free(ray, n: float, timeout: float = 10.0) -> bool:
    """True once Ray has all n CPUs free again (placement groups are removed asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU") != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
