"""The plan written once and read per rank: the same batches as the in-process plan, each rank only its own."""

from __future__ import annotations

from collections import Counter
from itertools import takewhile

import numpy as np
import pandas as pd
import pytest

from shards import plan_file
from shards.config import LoaderConfig
from shards.plan import SubsetPlanner
from shards.plan_file import RankSlice, write_plan
from shards.testing import manifest_of


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    rng = np.random.default_rng(1)
    n = 90
    sizes = [((48, 80), (80, 48))[i] for i in rng.integers(0, 2, n)]
    samples = pd.DataFrame({
        "key": [f"k{i:03d}" for i in range(n)], "offset": np.arange(n) * 1024, "size_bytes": 1024, "crc32": 7,
        "duration_s": rng.choice([0.5, 1.5, 3.0], n), "width": [w for _, w in sizes],
        "height": [h for h, _ in sizes], "latents_shape": [None] * n, "aesthetic": rng.normal(5, 1, n),
    })
    return manifest_of(samples, tmp_path_factory.mktemp("m"))


def _config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": "unused", "fps": 4.0, "num_frames": [4, 8], "batch_size": 3,
                           "resolutions": [(32, 48), (48, 32)], "query": "aesthetic >= pct(aesthetic, 10)", **kw})


def _stream(planner: SubsetPlanner, start, rank, world, epoch):
    steps = takewhile(lambda s: s.epoch == epoch, planner.rank_stream(start, rank, world))  # (endless with epochs=None)
    return [(s.batch_index, s.state_after) for s in steps]


@pytest.mark.parametrize("remainder", ["drop", "pad", "uneven"])
def test_two_ranks_two_workers_read_disjoint_batches_covering_the_plan(manifest, tmp_path, monkeypatch, remainder):
    monkeypatch.setattr(plan_file, "ROW_GROUP", 7)  # batches straddle row groups: a rank skips and stitches them
    config = _config(remainder=remainder, image_ratio=0.25, epochs=2)
    summary = write_plan(manifest, config, tmp_path / "plan", epochs=2)
    planner = SubsetPlanner.build(manifest, config)
    aesthetic = manifest.table.column("aesthetic").to_numpy()  # scores travel with the batch
    assert summary.fingerprint == planner.fingerprint and summary.num_samples == len(planner.rows) < manifest.num_samples
    for epoch in range(2):
        plan = planner.plan(epoch)
        got = {(r, k): list(RankSlice(str(tmp_path / "plan"), r, 2, k, 2).batches(epoch)) for r in range(2) for k in range(2)}
        for (r, k), batches in got.items():
            want = _stream(planner, (epoch, 0), r, 2, epoch)[k::2]  # worker k of 2: every 2nd of the rank's batches
            assert [(b.batch_index, b.state_after) for b in batches] == want
            for b in batches:
                bucket, items = plan.batch(b.batch_index)
                assert b.bucket == bucket and b.samples.column("position").to_pylist() == items.tolist()
                assert b.samples.column("key").to_pylist() == [f"k{planner.rows[i]:03d}" for i in items]
                assert b.samples.column("aesthetic").to_pylist() == aesthetic[planner.rows[items]].tolist()
        read = Counter(b.batch_index for batches in got.values() for b in batches)
        if remainder == "pad":  # every batch, and the last step filled with the epoch's first batches
            assert set(read) == set(range(len(plan))) and sum(read.values()) % 2 == 0
        elif remainder == "uneven":  # every batch exactly once
            assert read == Counter(range(len(plan)))
        else:  # disjoint, equal counts per rank, at most one leftover batch
            assert max(read.values()) == 1 and len(plan) - len(read) < 2
            assert len(got[0, 0]) + len(got[0, 1]) == len(got[1, 0]) + len(got[1, 1])


def test_resume_and_another_world_size_read_what_the_planner_deals(manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_file, "ROW_GROUP", 5)
    config = _config()
    write_plan(manifest, config, tmp_path / "plan", epochs=1)
    planner = SubsetPlanner.build(manifest, config)
    for world, consumed in [(3, 0), (3, 6), (1, 5)]:
        for rank in range(world):
            got = [(b.batch_index, b.state_after)
                   for b in RankSlice(str(tmp_path / "plan"), rank, world).batches(0, consumed)]
            assert got == _stream(planner, (0, consumed), rank, world, 0)


def test_cli_writes_the_plan_and_names_a_missing_one(manifest, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "plan"
    assert main(["shards", "plan", manifest.root, str(out), "--epochs", "2", "--set", "batch_size=3",
                 "--set", "num_frames=[4]", "--set", "fps=4"]) == 0
    assert f"in {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["epoch-00000.parquet", "epoch-00001.parquet", "plan.json",
                                                     "subset.parquet"]
    assert main(["shards", "plan", manifest.root, str(tmp_path / "p2"), "--set", "batch_sise=3"]) == 2
    assert "did you mean batch_size" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="lvd shards plan"):
        RankSlice(str(tmp_path / "nothing"), 0, 1)
