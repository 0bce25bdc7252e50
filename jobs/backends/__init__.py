"""Where `lvd submit` sends a job: a Ray cluster (Jobs API), Slurm (sbatch) or Kubernetes (a KubeRay RayJob).

Every backend does the same four things for `lvd jobs`: submit, status, logs, cancel. They talk to their
cluster through its own client (JobSubmissionClient, sbatch/squeue/scancel, kubectl), always with argument
lists; whatever reaches a shell on the cluster is quoted with shlex.
"""

from __future__ import annotations

import abc
import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from jobs.records import JobRecord
    from jobs.submit import JobSpec


class JobError(RuntimeError):
    """The cluster could not be reached or refused the request; the message says what to check."""


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"     # cancelled
    UNKNOWN = "UNKNOWN"     # the backend no longer knows the job (e.g. Slurm without accounting, after MinJobAge)

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    detail: str = ""  # the backend's own words, e.g. "Slurm COMPLETED, exit 0:0"

    def line(self) -> str:
        return f"{self.state.value}" + (f" ({self.detail})" if self.detail else "")


class Backend(abc.ABC):
    """One kind of cluster. `render` and `submit` take a validated JobSpec; the rest work from a record."""

    name: str

    @abc.abstractmethod
    def render(self, spec: JobSpec) -> str:
        """What `--dry-run` prints: the exact script, manifest or request that `submit` would send."""

    @abc.abstractmethod
    def submit(self, spec: JobSpec) -> JobRecord:
        """Sends the job and returns its record (not yet saved)."""

    @abc.abstractmethod
    def status(self, record: JobRecord) -> JobStatus: ...

    @abc.abstractmethod
    def logs(self, record: JobRecord, out: TextIO, follow: bool = False) -> None:
        """Writes the job's output so far to `out`; with follow, keeps writing until the job ends."""

    @abc.abstractmethod
    def cancel(self, record: JobRecord) -> None: ...


BACKENDS = {
    "ray": "jobs.backends.ray_jobs.RayJobsBackend",
    "slurm": "jobs.backends.slurm.SlurmBackend",
    "kuberay": "jobs.backends.kuberay.KubeRayBackend",
}


def backend_class(name: str) -> type[Backend]:
    module, _, cls = BACKENDS[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)
