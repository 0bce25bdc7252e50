"""The Ray a command starts inside itself when it is given no --address: one machine, every server on loopback.

On Linux Ray takes the machine's network address as the node's IP, and its servers (GCS, raylet and object
manager, the workers' gRPC servers, dashboard and runtime-env agents, metrics) then listen on every interface:
anything that can reach the machine can talk to them, and Ray's protocol runs code. Ray's single-machine mode
(its default on macOS and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) makes the node's IP loopback, and
every server binds that. Ray reads the switch when it is imported: from the environment in the processes it
starts, and from `ray._private.ray_constants` in this one, which has imported Ray already; both are set for as
long as the local Ray runs and restored after, so a later connection to a real cluster from the same process
sees its usual node IP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def local_ray(**init_kwargs: Any) -> Iterator[None]:
    """`ray.init(address="local", **init_kwargs)` on loopback only; `ray.shutdown()` at the end."""
    import ray
    from ray._private import ray_constants

    env_before = os.environ.get(SINGLE_MACHINE_ENV)
    cluster_before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **init_kwargs)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_before
        if env_before is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = env_before


@contextmanager
def ray_connected(address: str | None, **local_kwargs: Any) -> Iterator[None]:
    """For the duration: the Ray cluster at `address`, or (None) a local Ray on loopback started with
    `local_kwargs`; the caller's own Ray when one is initialised already. A Ray started here is shut down."""
    import ray

    from common.verbosity import ray_logging_level

    if ray.is_initialized():
        yield
        return
    if not address:
        with local_ray(include_dashboard=False, logging_level=ray_logging_level(), **local_kwargs):
            yield
        return
    ray.init(address=address, logging_level=ray_logging_level())
    try:
        yield
    finally:
        ray.shutdown()
