"""Local job records: where they live, how `lvd jobs` finds one, what survives a damaged file."""

from __future__ import annotations

import pytest

from jobs.cli import main
from jobs.records import JobNotFound, JobRecord, JobStore


def _record(name: str, backend: str = "slurm", job_id: str = "1", at: str = "2026-01-01T10:00:00+00:00", **kw):
    return JobRecord(name=name, backend=backend, job_id=job_id, command=["curate", "r.yaml"], cwd="/w",
                     submitted_at=at, **kw)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "home"))
    return JobStore()


def test_records_live_under_lvd_home_and_round_trip(store, tmp_path):
    rec = _record("lvd-curate-a", output="/data/out", recipe="/w/r.yaml", info={"log": "/l/slurm-1.out"})
    path = store.save(rec)
    assert path == tmp_path / "home" / "jobs" / "lvd-curate-a.json"
    assert store.find("lvd-curate-a") == rec
    assert not list(path.parent.glob(".*tmp*"))  # written whole, then renamed


def test_find_by_name_backend_id_or_unique_prefix(store):
    store.save(_record("lvd-curate-20260101-a1", job_id="4711", at="2026-01-01T10:00:00+00:00"))
    store.save(_record("lvd-train-20260102-b2", job_id="4712", at="2026-01-02T10:00:00+00:00"))
    store.save(_record("lvd-train-20260103-c3", backend="ray", job_id="lvd-train-20260103-c3",
                       at="2026-01-03T10:00:00+00:00"))
    assert store.find("4711").name == "lvd-curate-20260101-a1"
    assert store.find("lvd-curate").job_id == "4711"
    assert store.find("lvd-train-20260102").job_id == "4712"
    assert [r.name for r in store.all()] == ["lvd-train-20260103-c3", "lvd-train-20260102-b2", "lvd-curate-20260101-a1"]
    with pytest.raises(JobNotFound, match="matches 2 jobs"):
        store.find("lvd-train")
    with pytest.raises(JobNotFound, match="no job 'nope'.*lvd jobs list"):
        store.find("nope")


def test_an_exact_id_beats_a_prefix_of_a_longer_one(store):
    store.save(_record("lvd-a", job_id="12"))
    store.save(_record("lvd-b", job_id="123"))
    assert store.find("12").name == "lvd-a"


def test_a_damaged_record_is_skipped_with_a_note(store, capsys):
    store.save(_record("lvd-good"))
    (store.root / "lvd-bad.json").write_text("{not json")
    assert [r.name for r in store.all()] == ["lvd-good"]
    assert "skipping unreadable record" in capsys.readouterr().err


def test_jobs_list_shows_records_without_asking_the_clusters(store, capsys):
    assert main(["jobs", "list"]) == 0
    assert "no jobs recorded" in capsys.readouterr().out
    store.save(_record("lvd-curate-x", job_id="77", output="/data/runs/x", last_state="SUCCEEDED"))
    store.save(_record("lvd-sample-y", backend="kuberay", job_id="lvd-sample-y", at="2026-01-02T00:00:00+00:00"))
    assert main(["jobs", "list", "--backend", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "lvd-curate-x" in out and "SUCCEEDED" in out and "/data/runs/x" in out and "lvd-sample-y" not in out
    assert main(["jobs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("NAME") and lines[1].startswith("lvd-sample-y")


def test_jobs_status_of_an_unknown_job_names_the_store(store, capsys):
    assert main(["jobs", "status", "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
