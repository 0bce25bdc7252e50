"""Running a function over many small inputs: as Ray tasks when Ray is initialised (a curate run, or a
command given --address), else in this process (tests, small runs). Results must be small (counts, paths):
the rows stay where the tasks wrote them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable


def map_tasks(fn: Callable, calls: list[tuple]) -> list[Any]:
    """[fn(*args) for args in calls], in Ray tasks (one CPU, retried) when Ray is up."""
    import ray

    if ray.is_initialized() and calls:
        remote = ray.remote(num_cpus=1, max_retries=3)(fn)
        return ray.get([remote.remote(*args) for args in calls])
    return [fn(*args) for args in calls]


def call_task(fn: Callable, *args: Any) -> Any:
    """fn(*args) in one task (or here, without Ray)."""
    return map_tasks(fn, [args])[0]


def imap_tasks(fn: Callable, calls: list[tuple], **options: Any) -> Iterator[Any]:
    """fn(*args) for args in calls, yielded as they finish (in Ray tasks when Ray is up), so that the
    caller can count progress and fold small results without waiting for the slowest task. `options` go to
    ray.remote (e.g. num_gpus)."""
    import ray

    if not (ray.is_initialized() and calls):
        yield from (fn(*args) for args in calls)
        return
    remote = ray.remote(**{"num_cpus": 1, "max_retries": 3, **options})(fn)
    pending = [remote.remote(*args) for args in calls]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
