"""Running a function over many small inputs: as Ray tasks when Ray is initialised (a curate run, or a
command given --address), else in this process (tests, small runs). Results must be small (counts, paths):
the rows stay where the tasks wrote them."""

from __future__ import annotations

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
