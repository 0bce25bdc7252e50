"""Writing shards: round trip, selection, resume, atomicity under SIGKILL, added tensors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.ledger import Ledger
from shards.config import ShardWriteConfig
from shards.manifest import Manifest
from shards.reader import SampleReader
from curation.testing.fake_runs import clip_level, fake_run, frame_level
from shards.writer import rewrite_shards, write_shards
from tests.shards.conftest import NUM_FRAMES, SHARD_BYTES, loader_config

REPO = Path(__file__).resolve().parents[2]


def _ledger(run: Path) -> pd.DataFrame:
    """The fake run's clips with their decisions, in the order fake_run made them (clip c is row c)."""
    return Ledger(run).read()[1]


def _level(jpg: bytes) -> tuple[float, float]:
    import cv2

    rgb = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    return float(rgb[..., 0].mean()), float(rgb[..., 1].mean())


def test_round_trip_every_kept_clip_once_with_its_bytes_scores_and_frames(fake_run_dir, shards_dir):
    ledger = _ledger(fake_run_dir)
    kept = ledger[ledger["keep"]]
    manifest = Manifest.load(str(shards_dir))
    assert sorted(manifest.samples["key"]) == sorted(kept["clip_id"])
    assert len(manifest.shards) >= 3, "30KB shards of ~8KB samples: several shards"
    assert manifest.samples.groupby("shard").size().to_dict() == dict(zip(manifest.shards["shard"], manifest.shards["num_samples"]))
    reader = SampleReader(str(shards_dir))
    by_key = manifest.samples.set_index("key")
    for c, row in enumerate(ledger.to_dict("records")):
        if not row["keep"]:
            assert row["clip_id"] not in by_key.index
            continue
        files = reader.read(by_key.loc[row["clip_id"]].to_dict() | {"key": row["clip_id"]}, verify=True)
        assert sorted(files) == ["first.jpg", "json", "last.jpg", "mp4"]
        assert bytes(files["mp4"]) == Path(row["clip_path"]).read_bytes()
        doc = json.loads(bytes(files["json"]))
        assert "clip_path" not in doc  # only valid on the writing machine
        assert doc["motion_score"] == row["motion_score"] and doc["text_area_frames"] == [0.0, 0.01, 0.02]
        assert doc["captions"][0]["text"] == f"clip {c} caption a" and doc["captions"][0]["weight"] == 3.0
        assert (doc["aesthetic"] is None) == bool(np.isnan(row["aesthetic"]))
        # first and last frames: frame levels 0 and that of the last frame, green = the clip's level
        r_first, g_first = _level(bytes(files["first.jpg"]))
        r_last, g_last = _level(bytes(files["last.jpg"]))
        assert abs(r_first - frame_level(0)) < 4 and abs(r_last - frame_level(NUM_FRAMES - 1)) < 4
        assert abs(g_first - clip_level(c)) < 4 and abs(g_last - clip_level(c)) < 4
        # the manifest carries every score without knowing what it means
        for score in ("motion_score", "text_area", "aesthetic", "motion_bucket"):
            assert by_key.loc[row["clip_id"], score] == pytest.approx(row[score], nan_ok=True)
    assert set(manifest.score_columns) >= {"motion_score", "text_area", "aesthetic", "motion_bucket"}


def test_shards_are_plain_webdataset(shards_dir):
    import webdataset as wds

    urls = sorted(str(p) for p in shards_dir.glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    manifest = Manifest.load(str(shards_dir))
    assert [s["__key__"] for s in samples] == manifest.samples["key"].tolist()
    assert json.loads(samples[0]["json"])["clip_id"] == samples[0]["__key__"]


def test_all_usable_carries_keep_and_loaders_must_say_which(fake_run_dir, tmp_path):
    from shards.loader import ShardLoader

    out = tmp_path / "all"
    write_shards(fake_run_dir, out, ShardWriteConfig(shard_max_bytes=SHARD_BYTES, selection="all_usable"))
    manifest = Manifest.load(str(out))
    ledger = _ledger(fake_run_dir)
    assert sorted(manifest.samples["key"]) == sorted(ledger.loc[ledger["status"] == "ok", "clip_id"])
    assert manifest.samples["keep"].sum() == ledger["keep"].sum() < len(manifest.samples)
    # the decisions come along: why a usable clip was dropped, as its stable code
    dropped = manifest.samples[~manifest.samples["keep"]]
    assert set(dropped["reason_code"]) == {"motion_score_below_min"}
    assert manifest.samples.loc[manifest.samples["keep"], "reason_code"].isna().all()
    with pytest.raises(ValueError, match="query=keep"):
        ShardLoader(loader_config(out))
    kept = ShardLoader(loader_config(out, query="keep"))
    assert set(manifest.samples["key"].iloc[kept.batches.planner.rows]) == set(ledger.loc[ledger["keep"], "clip_id"])


def test_rerun_writes_nothing_and_other_settings_are_refused(fake_run_dir, shards_dir, shards_copy):
    before = Manifest.load(str(shards_copy)).shards["sha256"].tolist()
    summary = write_shards(fake_run_dir, shards_copy, ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    assert summary.num_written_now == 0
    assert Manifest.load(str(shards_copy)).shards["sha256"].tolist() == before
    with pytest.raises(ValueError, match="shard_max_bytes differ"):
        write_shards(fake_run_dir, shards_copy, ShardWriteConfig(shard_max_bytes="60KB"))


def test_missing_clip_file_is_skipped_with_a_reason(tmp_path):
    run = tmp_path / "run"
    clips = fake_run(run, num_clips=3, dropped_every=0, failed=0)
    Path(clips.loc[1, "clip_path"]).unlink()
    summary = write_shards(run, tmp_path / "out")
    assert summary.num_samples == 2
    assert [s.key for s in summary.skipped] == [clips.loc[1, "clip_id"]]
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["skipped"][0]["reason"].startswith("clip_file")


def test_each_ledger_file_is_one_group_read_once_and_packed_in_file_order(fake_run_dir, tmp_path, monkeypatch):
    """One task per ledger file: the file is read once, its clips go into that group's shards video by video,
    and the driver reads no clip rows at all."""
    from curation import ledger as ledger_module
    from shards import source

    reads = []
    real_read = ledger_module.read_clip_file

    def spy_read(path, decisions_path, columns=None, kept_only=False):
        reads.append(path)
        return real_read(path, decisions_path, columns, kept_only)

    monkeypatch.setattr(source, "read_clip_file", spy_read)
    write_shards(fake_run_dir, tmp_path / "out", ShardWriteConfig(shard_max_bytes=SHARD_BYTES))

    files = Ledger(fake_run_dir).clip_files()
    assert len(files) > 2, "the fake run spreads over several buckets"
    assert reads == files, "every ledger file is read exactly once, by its group's task"
    kept = [real_read(f, Ledger(fake_run_dir).decision_file(f), ["clip_id"], True).column("clip_id").to_pylist()
            for f in files]
    samples = Manifest.load(str(tmp_path / "out")).samples
    assert samples["key"].tolist() == [k for ids in kept for k in sorted(ids)]
    group_of = {k: g for g, ids in enumerate(kept) for k in ids}
    assert [int(s.split("-")[1]) for s in samples["shard"]] == [group_of[k] for k in samples["key"]]


def test_ray_tasks_write_the_same_shards_as_one_process(fake_run_dir, shards_dir, tmp_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        summary = write_shards(fake_run_dir, tmp_path / "ray", ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    finally:
        ray.shutdown()
    assert summary.num_written_now == summary.num_samples == 12
    got, want = Manifest.load(str(tmp_path / "ray")), Manifest.load(str(shards_dir))
    assert got.shards.to_dict("records") == want.shards.to_dict("records")
    assert got.table.drop(["members"]).equals(want.table.drop(["members"]))


def test_a_run_without_ledger_or_decisions_names_the_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ledger in .*run `lvd curate"):
        write_shards(tmp_path / "nothing", tmp_path / "out")
    run = tmp_path / "run"
    fake_run(run, num_clips=3, failed=0)
    shutil.rmtree(run / "decisions")
    for selection in ("keep", "all_usable"):
        with pytest.raises(FileNotFoundError, match=r"the run was not decided .*re-run the same `lvd curate` command, "
                                                    r"or `lvd curate RECIPE --rethreshold`"):
            write_shards(run, tmp_path / selection, ShardWriteConfig(selection=selection))


def test_rethresholded_run_is_read_from_its_decisions(tmp_path):
    """A decision pass rewrites decisions/ only: the next write follows it, and a folder holding a sample it
    no longer keeps is refused."""
    run = tmp_path / "run"
    clips = fake_run(run, num_clips=3, dropped_every=0, failed=0)
    write_shards(run, tmp_path / "before")
    [path] = Ledger(run).clip_files()
    decisions_path = Ledger(run).decision_file(path)
    decisions = pq.read_table(decisions_path)
    victim = clips.loc[1, "clip_id"]
    keep = [cid != victim for cid in decisions.column("clip_id").to_pylist()]
    decisions = decisions.set_column(decisions.schema.get_field_index("keep"), "keep", pa.array(keep))
    pq.write_table(decisions, decisions_path)
    with pytest.raises(ValueError, match="no longer selects"):
        write_shards(run, tmp_path / "before")
    summary = write_shards(run, tmp_path / "after")
    assert summary.num_samples == 2
    assert victim not in set(Manifest.load(str(tmp_path / "after")).samples["key"])


KILLER = """
import os, signal, sys
from shards import writer
from curation.ledger import Ledger
from shards.config import ShardWriteConfig

run, out, mode = sys.argv[1:4]
if mode == "mid_shard":
    # die with the second shard half written: 5 samples added, shards hold ~3
    add, count = writer.ShardWriter.add, [0]
    def dying_add(self, sample):
        add(self, sample)
        count[0] += 1
        if count[0] == 5:
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    writer.ShardWriter.add = dying_add
else:
    # die between renaming the second shard into place and recording its manifest part
    replace = os.replace
    def dying_replace(src, dst):
        replace(src, dst)
        if str(dst).endswith("shard-000000-00001.tar"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = dying_replace
writer.write_shards(run, out, ShardWriteConfig(shard_max_bytes=%r))
""" % SHARD_BYTES


@pytest.mark.parametrize("mode", ["mid_shard", "between_renames"])
def test_killed_writer_leaves_no_partial_shard_and_rerun_completes(mode, fake_run_dir, shards_dir, tmp_path):
    from shards.verify import verify

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(fake_run_dir), str(out), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    visible = sorted(out.glob("shard-*.tar"))
    assert visible, "the first shard was finished before the kill"
    for tar in visible:  # whatever carries a final name is a whole tar: every member complete, end marker there
        with tarfile.open(tar) as t:
            names = t.getnames()
        assert len(names) % 4 == 0 and tar.stat().st_size % 512 == 0
    if mode == "mid_shard":
        assert list(out.glob(".shard-*.tar.tmp")), "the half shard is under its temporary name"
    assert not (out / "info.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        Manifest.load(str(out))

    summary = write_shards(fake_run_dir, out, ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    assert 0 < summary.num_written_now < summary.num_samples
    assert not list(out.glob(".*.tmp"))
    assert verify(str(out)).ok
    # resumed shards are byte-identical to the uninterrupted write
    assert Manifest.load(str(out)).shards.to_dict("records") == Manifest.load(str(shards_dir)).shards.to_dict("records")


def test_rewrite_adds_latents_that_the_loader_loads(shards_dir, tmp_path):
    import torch
    from safetensors.torch import save

    from shards.loader import ShardLoader

    source = Manifest.load(str(shards_dir))
    stored = {}

    def add_latents(key, members):
        g = torch.Generator().manual_seed(sum(map(ord, key)))
        stored[key] = torch.randn(3, 4, 6, 8, generator=g)  # T x C x H x W
        return {"latents.safetensors": save({"latents": stored[key]})}

    rows = np.flatnonzero(source.samples["width"].to_numpy() > source.samples["height"].to_numpy())
    out = tmp_path / "latents"
    summary = rewrite_shards(source, rows, out, ShardWriteConfig(shard_max_bytes="50KB"), add_latents)
    manifest = Manifest.load(str(out))
    assert summary.num_samples == len(rows) and set(manifest.samples["key"]) == set(stored)
    assert manifest.samples["latents_shape"].map(list).tolist() == [[3, 4, 6, 8]] * len(rows)
    # scores came along without a tar read of the source's json
    src = source.samples.set_index("key")
    assert (manifest.samples.set_index("key")["motion_score"] == src.loc[manifest.samples["key"], "motion_score"]).all()
    loader = ShardLoader(loader_config(out, epochs=1, remainder="uneven"))
    seen = 0
    for batch in loader:
        assert batch["kind"] == "latents" and "frames_BTCHW" not in batch
        for key, lat in zip(batch["key"], batch["latents_BTCHW"]):
            assert torch.equal(lat, stored[key])
            seen += 1
    assert seen == len(rows)


def test_cli_write_then_refuse_other_settings_naming_the_fix(fake_run_dir, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "cli"
    assert main(["shards", "write", str(fake_run_dir), str(out), "--set", f"shard_max_bytes={SHARD_BYTES}"]) == 0
    assert "12 samples in" in capsys.readouterr().out
    assert main(["shards", "write", str(fake_run_dir), str(out), "--all-usable"]) == 2
    err = capsys.readouterr().err
    assert "write to a new folder" in err and "selection" in err
    assert main(["shards", "write", str(fake_run_dir), str(tmp_path / "x"), "--set", "shard_max_bytez=1GB"]) == 2
    assert "did you mean shard_max_bytes" in capsys.readouterr().err
