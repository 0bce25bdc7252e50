"""Local records of submitted jobs, so that `lvd jobs` finds past runs on every backend.

One JSON file per job under $LVD_HOME/jobs/ (default ~/.lvd/jobs/), written whole and renamed into place,
so two lvd processes never interleave half-written records.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Literal

import pydantic

BackendName = Literal["ray", "slurm", "kuberay"]


def lvd_home() -> Path:
    """$LVD_HOME, else ~/.lvd: where lvd keeps job records, generated scripts and Slurm logs."""
    return Path(os.environ.get("LVD_HOME") or Path.home() / ".lvd").expanduser()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class JobRecord(pydantic.BaseModel):
    """What lvd remembers about one submitted job."""

    model_config = pydantic.ConfigDict(extra="ignore")  # records written by a newer lvd still load

    name: str                       # lvd's name for the job (also the Ray submission id / RayJob name)
    backend: BackendName
    job_id: str                     # the backend's id: Ray submission id, Slurm job id, RayJob name
    command: list[str]              # the lvd command line, after `lvd`
    recipe: str | None = None       # absolute path of the recipe at submission time
    output: str | None = None       # where the command writes its results
    cwd: str                        # where the command's relative paths were resolved at submission
    submitted_at: str
    info: dict[str, str] = {}       # backend specifics: address, script, log file, namespace, ...
    last_state: str | None = None   # the last state `lvd jobs` saw, for `lvd jobs list` without a query
    cancelled_at: str | None = None

    def command_line(self) -> str:
        import shlex

        return shlex.join(["lvd", *self.command])


class JobNotFound(LookupError):
    """No record matches, or several do; the message lists what exists."""


class JobStore:
    """The folder of job records."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else lvd_home() / "jobs"

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def save(self, record: JobRecord) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(record.name)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(record.model_dump_json(indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def all(self) -> list[JobRecord]:
        """Every readable record, newest first; an unreadable file is reported and skipped."""
        records = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            try:
                records.append(JobRecord.model_validate_json(path.read_text()))
            except (OSError, pydantic.ValidationError) as e:
                print(f"lvd jobs: skipping unreadable record {path}: {e.__class__.__name__}", file=sys.stderr)
        return sorted(records, key=lambda r: (r.submitted_at, r.name), reverse=True)

    def find(self, ref: str) -> JobRecord:
        """The record whose name or backend job id is `ref`, else the only one starting with it."""
        records = self.all()
        exact = [r for r in records if ref in (r.name, r.job_id)]
        matches = exact or [r for r in records if r.name.startswith(ref) or r.job_id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(r.name for r in records[:5]) or "none yet"
            raise JobNotFound(f"no job {ref!r} in {self.root} (recent: {known}); see `lvd jobs list`")
        names = ", ".join(f"{r.name} ({r.backend} {r.job_id})" for r in matches[:5])
        raise JobNotFound(f"{ref!r} matches {len(matches)} jobs: {names}; give more of the name")
