"""Resume after a kill, and a 2-node Ray cluster: both give the ledger a clean single run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from curation.ledger import VOLATILE_COLUMNS, Ledger
from curation.pipeline import run_curation
from curation.testing.synthetic import hard_cuts, moving_square, static_frame, write_video
from tests.curation.conftest import make_config

REPO = Path(__file__).resolve().parents[2]


def _inputs(folder: Path, n: int) -> Path:
    for i in range(n):
        frames = hard_cuts([30], 60, speed=2 + i) if i % 3 == 0 else (
            moving_square(48, speed=1 + i) if i % 3 == 1 else static_frame(48, color_index=i))
        write_video(folder / f"v{i:02d}.mp4", frames, 24)
    return folder


def _comparable(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    videos, clips = Ledger(run_dir).read()
    videos = videos.drop(columns=[c for c in VOLATILE_COLUMNS | {"processed_on"} if c in videos.columns])
    clips = clips.drop(columns=["clip_path"])
    return videos.sort_values("video_id").reset_index(drop=True), clips.sort_values("clip_id").reset_index(drop=True)


def _assert_same_ledger(a: Path, b: Path) -> None:
    va, ca = _comparable(a)
    vb, cb = _comparable(b)
    pd.testing.assert_frame_equal(va, vb)
    pd.testing.assert_frame_equal(ca, cb)


def test_killed_run_resumes_to_the_same_ledger_as_a_clean_run(tmp_path):
    src = _inputs(tmp_path / "videos", 12)
    recipe = tmp_path / "recipe.yaml"
    cfg = make_config(tmp_path, [src], text={"enabled": False}, decode={"num_workers": 1})
    tree = cfg.model_dump(mode="json")
    recipe.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "jobs.cli", "curate", str(recipe), "--no-progress", "--set", "ray.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--set", f"output={killed_dir}"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = killed_dir / "ledger" / "videos"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(committed.glob("bucket=*/*.parquet"))) < 1:
        assert proc.poll() is None, "the run finished before it could be killed; give it more videos"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, nothing else
    proc.wait()
    done_before = Ledger(killed_dir).videos_dataset().count_rows()
    assert 1 <= done_before < 12
    assert not (killed_dir / "decisions").exists()

    subprocess.run([*cmd, "--set", f"output={killed_dir}"], cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)
    subprocess.run([*cmd, "--set", f"output={tmp_path / 'clean'}"], cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)
    _assert_same_ledger(killed_dir, tmp_path / "clean")
    # every run leaves its resolved config, package versions and git revision beside its outputs
    resumed = subprocess.run([*cmd, "--set", f"output={killed_dir}"], cwd=REPO, env=env, check=True, timeout=600,
                             capture_output=True, text=True)
    assert "0 videos processed, 12 already in the ledger" in resumed.stdout
    info = json.loads((killed_dir / "run.json").read_text())
    assert info["command"] == "curate" and info["packages"]["ray"] == "2.60.0" and info["git_revision"]
    assert yaml.safe_load((killed_dir / "config.yaml").read_text())["output"] == str(killed_dir)
    # and clip files exist for every usable clip (copy mode)
    _, clips = Ledger(killed_dir).read()
    assert all(Path(p).is_file() for p in clips.loc[clips["status"] == "ok", "clip_path"])
    # no half-written files were left behind by the kill
    assert not list(killed_dir.rglob(".*.tmp*"))


def test_two_node_cluster_gives_the_same_ledger_as_one_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    src = _inputs(tmp_path / "videos", 6)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        cfg = make_config(tmp_path, [src], output=str(tmp_path / "two_nodes"), text={"enabled": False})
        run_curation(cfg, address=cluster.address, progress=False)
        used = set(Ledger(tmp_path / "two_nodes").read()[0]["processed_on"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    one = make_config(tmp_path, [src], output=str(tmp_path / "one_node"), text={"enabled": False},
                      ray={"num_cpus": 2})
    run_curation(one, progress=False)
    _assert_same_ledger(tmp_path / "two_nodes", tmp_path / "one_node")
    assert len(used) == 2, f"videos were processed on {len(used)} node(s), expected both"


def test_a_worker_node_removed_mid_run_loses_no_clip_and_duplicates_none(tmp_path):
    """Ray retries what the lost node held, or the run fails and the same command, rerun, completes; either
    way the ledger equals a clean run's."""
    import ray
    from ray.cluster_utils import Cluster

    src = _inputs(tmp_path / "videos", 10)
    recipe = tmp_path / "recipe.yaml"
    cfg = make_config(tmp_path, [src], text={"enabled": False}, decode={"num_workers": 2},
                      ledger={"videos_per_file": 1})
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    out = tmp_path / "node_lost"
    cmd = [sys.executable, "-m", "jobs.cli", "curate", str(recipe), "--no-progress", "--set", f"output={out}",
           "--address", cluster.address]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list((out / "ledger" / "videos").glob("bucket=*/*.parquet"))) < 2:
            assert proc.poll() is None, "the run finished before a node could be removed; give it more videos"
            time.sleep(0.2)
        cluster.remove_node(worker)
        try:
            first_rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:  # stuck on the lost node's actors: stop the driver, rerun
            os.killpg(proc.pid, signal.SIGKILL)
            first_rc = proc.wait()
        if first_rc != 0 or not (out / "decisions").is_dir():
            subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    clean = make_config(tmp_path, [src], output=str(tmp_path / "clean"), text={"enabled": False}, ray={"num_cpus": 2})
    run_curation(clean, progress=False)
    _assert_same_ledger(out, tmp_path / "clean")
    videos, clips = Ledger(out).read()
    assert videos["video_id"].is_unique and clips["clip_id"].is_unique and len(videos) == 10
