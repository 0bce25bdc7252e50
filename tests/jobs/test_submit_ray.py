"""`lvd submit --backend ray` against a real two-node Ray cluster on loopback (token auth on): a curation job
on the cluster, a tiny training job, logs, status, and cancelling a running job."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from curation.ledger import Ledger
from curation.testing.synthetic import hard_cuts, moving_square, static_frame, write_video
from jobs.cli import main
from jobs.records import JobRecord, JobStore
from tests.jobs.ray_cluster import start_cluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("raycluster"))
    yield c
    c.stop()
    assert not c.leftover_pids(), "Ray processes of the test cluster outlived it"


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory):
    """A working directory as a user has it: HOME holds the cluster's token, nothing else is configured."""
    root = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(cluster.home))
        mp.setenv("LVD_HOME", str(root / "lvd_home"))
        (root / "project").mkdir()
        mp.chdir(root / "project")
        yield root / "project"


@pytest.fixture(scope="module")
def training_job(cluster, project):
    """A tiny training stage (synthetic data, 2 steps, CPU), submitted before the curation test so that both
    run at once (2 busy CPUs are slow). The recipe sits in the working directory, as a user's would."""
    shutil.copy(REPO / "recipes" / "train" / "tiny_stage1.yaml", project / "tiny_stage1.yaml")
    out = project.parent / "train_out"
    record = _submit(cluster.address, "train", "tiny_stage1.yaml", "--set", "data.source=synthetic",
                     "--set", "steps=2", "--set", f"output={out}", extra=("--env", "HF_HUB_OFFLINE=1"))
    return record, out


def _videos(folder: Path) -> Path:
    folder.mkdir()
    write_video(folder / "cut.mp4", hard_cuts([30], 60, speed=2), 24)
    write_video(folder / "square.mp4", moving_square(48, speed=3), 24)
    write_video(folder / "still.mp4", static_frame(48, color_index=2), 24)
    write_video(folder / "square2.mp4", moving_square(48, speed=5, color_index=3), 24)
    return folder


def _submit(address: str, *command: str, extra: tuple[str, ...] = ()) -> JobRecord:
    before = {r.name for r in JobStore().all()}
    assert main(["submit", "--backend", "ray", "--address", address, *extra, "--", *command]) == 0
    (record,) = [r for r in JobStore().all() if r.name not in before]
    return record


def _wait_for(record, states: set[str], timeout_s: float = 120.0) -> str:
    from jobs.backends.ray_jobs import RayJobsBackend

    deadline = time.monotonic() + timeout_s
    while (state := RayJobsBackend().status(record).state.value) not in states:
        assert time.monotonic() < deadline, f"{record.name} still {state} after {timeout_s} s"
        time.sleep(0.5)
    return state


def test_the_cluster_refuses_requests_without_its_token(cluster):
    assert requests.get(f"{cluster.address}/api/version", timeout=10).status_code == 401


def test_curation_job_runs_on_the_cluster_and_reports_success(cluster, project, training_job, tmp_path, capsys):
    videos = _videos(tmp_path / "videos")
    (project / "recipe.yaml").write_text(yaml.safe_dump({
        "inputs": [str(videos)], "decode": {"key_frame_max_side": 320, "timeout_s": 60},
        "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0}, "text": {"enabled": False},
        "thresholds": {"motion_score": {"min": 0.002}}}))
    out = tmp_path / "curated"
    record = _submit(cluster.address, "curate", "recipe.yaml", "--set", f"output={out}", "--no-progress")
    assert record.backend == "ray" and record.job_id == record.name
    assert record.output == str(out) and record.recipe == str(project / "recipe.yaml")
    capsys.readouterr()

    assert main(["jobs", "logs", record.name, "--follow"]) == 0
    logs = capsys.readouterr().out
    assert "funnel" in logs and "input videos" in logs

    assert main(["jobs", "status", record.job_id, "--wait", "--timeout", "120"]) == 0
    assert f"{record.name}: SUCCEEDED" in capsys.readouterr().out

    videos_df, clips = Ledger(out).read()
    assert sorted(videos_df["status"]) == ["ok"] * 4
    assert len(clips) >= 4 and (out / "clips").is_dir()
    # --address auto made the pipeline run on the cluster the job ran on, not on a Ray of its own
    assert set(videos_df["processed_on"]) <= cluster.node_ids()
    # the record keeps the run findable
    assert main(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert record.name in listing and "SUCCEEDED" in listing and str(out) in listing


def test_training_job_trains_and_exports_its_model(training_job, capsys):
    record, out = training_job
    assert record.output == str(out) and record.command[0] == "train"
    assert main(["jobs", "status", record.name, "--wait", "--timeout", "240"]) == 0, \
        capsys.readouterr().out + "\n" + _logs(record, capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert (out / "model" / "unet" / "config.json").is_file()
    assert "step 2/2" in _logs(record, capsys)


def _logs(record, capsys) -> str:
    main(["jobs", "logs", record.name])
    return capsys.readouterr().out


def test_cancelling_a_running_job_stops_it(cluster, project, tmp_path, capsys):
    out = tmp_path / "never" / "long.mp4"
    record = _submit(cluster.address, "sample", "--random-init", "--preset", "tiny", "--steps", "100000",
                     "--out", str(out))
    assert _wait_for(record, {"RUNNING", "FAILED", "SUCCEEDED"}) == "RUNNING"
    assert main(["jobs", "cancel", record.name]) == 0
    assert _wait_for(record, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout_s=60) == "STOPPED"
    capsys.readouterr()
    assert main(["jobs", "status", record.name]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert JobStore().find(record.name).cancelled_at is not None
    # the lvd process itself is gone (its command line holds this test's unique output path)
    deadline = time.monotonic() + 20
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the cancelled job's process is still running"
        time.sleep(0.5)
    assert not out.exists()
