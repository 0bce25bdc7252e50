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
from curation.testing.fake_runs import manifest_of


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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_rank_loader_reads_only_its_slice_and_yields_the_batches_the_plan_deals_it(shards_dir, tmp_path, monkeypatch,
                                                                                    num_workers):
    from shards.loader import ShardLoader
    from shards.manifest import Manifest
    from tests.shards.conftest import loader_config

    config = loader_config(shards_dir, image_ratio=0.25, remainder="pad", epochs=2, num_workers=num_workers,
                           query="motion_score < 0.45")
    write_plan(Manifest.load(str(shards_dir)), config, tmp_path / "plan", epochs=2)
    in_process = [[b["key"] for b in ShardLoader(config, rank=r, world_size=2)] for r in range(2)]

    def refuse(*args, **kw):
        raise AssertionError("a rank with a plan read the manifest or planned the subset")

    for name in ("load", "scan", "take", "select"):  # (forked DataLoader workers inherit the spies)
        monkeypatch.setattr(Manifest, name, refuse)
    monkeypatch.setattr(SubsetPlanner, "build", refuse)
    for rank in range(2):
        loader = ShardLoader(config, rank=rank, world_size=2, plan=str(tmp_path / "plan"))
        got = list(loader)
        dealt = [b for epoch in range(2) for b in RankSlice(str(tmp_path / "plan"), rank, 2).batches(epoch)]
        assert [(b["epoch"], b["batch_index"]) for b in got] == [(b.epoch, b.batch_index) for b in dealt]
        assert [b["key"] for b in got] == [b.samples.column("key").to_pylist() for b in dealt] == in_process[rank]
        assert {b["kind"] for b in got} == {"video", "image"}
        assert all(b["frames_BTCHW"].shape[1] == (1 if b["kind"] == "image" else 4) for b in got)


def test_a_planned_loader_resumes_exactly_also_on_another_number_of_ranks(shards_dir, tmp_path):
    from shards.loader import ShardLoader
    from shards.manifest import Manifest
    from tests.shards.conftest import loader_config

    config = loader_config(shards_dir, image_ratio=0.25, epochs=3, output="raw", batch_size=1)
    plan = str(tmp_path / "plan")
    write_plan(Manifest.load(str(shards_dir)), config, plan, epochs=3)
    whole = [b["key"] for b in ShardLoader(config, plan=plan)]
    first = ShardLoader(config, plan=plan)
    head = [b["key"] for _, b in zip(range(5), first)]
    again = ShardLoader(config, plan=plan)
    again.load_state_dict(first.state_dict())
    assert head + [b["key"] for b in again] == whole
    # 2 ranks, then 1: the single rank goes on with the very batches the 2 ranks would have consumed next
    two = [ShardLoader(config, rank=r, world_size=2, plan=plan) for r in range(2)]
    steps = [[b["key"] for _, b in zip(range(3), loader)] for loader in two]
    one = ShardLoader(config, plan=plan)
    one.load_state_dict(two[0].state_dict())
    rest = [b["key"] for b in one]
    per_epoch = ShardLoader(config, plan=plan).batches_per_epoch(0)
    assert [k for pair in zip(*steps) for k in pair] + rest[: per_epoch - 6] == whole[:per_epoch]


def test_a_planned_loader_refuses_a_state_of_another_plan_and_epochs_past_the_plan(shards_dir, tmp_path):
    from shards.loader import ShardLoader
    from shards.manifest import Manifest
    from tests.shards.conftest import loader_config

    manifest = Manifest.load(str(shards_dir))
    config = loader_config(shards_dir, output="raw", batch_size=1)
    write_plan(manifest, config, tmp_path / "a", epochs=1)
    write_plan(manifest, config.model_copy(update={"seed": 8}), tmp_path / "b", epochs=1)
    a = ShardLoader(config, plan=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"the plan in .*b was made with other settings \(seed\)"):
        ShardLoader(config, plan=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="saved for another plan"):
        b = ShardLoader(config.model_copy(update={"seed": 8}), plan=str(tmp_path / "b"))
        b.load_state_dict(a.state_dict())
    ShardLoader(config.model_copy(update={"num_workers": 2, "epochs": 1}), plan=str(tmp_path / "a"))  # how it reads
    with pytest.raises(ValueError, match="holds 1 epochs and the run needs epoch 1"):
        list(a)  # epochs=None streams on: past the plan's one epoch is an error, not a silent end


def test_a_planned_loader_skips_and_substitutes_corrupt_samples_as_the_in_process_plan(shards_copy, tmp_path):
    from shards.loader import ShardLoader
    from shards.manifest import Manifest
    from tests.shards.conftest import loader_config
    from tests.shards.test_loader import _damage_mp4

    manifest = Manifest.load(str(shards_copy))
    keys = manifest.samples["key"].tolist()
    for key, how in ((keys[1], "flip"), (keys[6], "zero")):
        _damage_mp4(shards_copy, key, how)
    for batch_size in (1, 3):  # 1: a corrupt batch takes the next good samples of its bucket in the plan
        config = loader_config(shards_copy, epochs=1, batch_size=batch_size, max_corrupt_fraction=0.5)
        write_plan(manifest, config, tmp_path / str(batch_size), epochs=1)
        want, got = ShardLoader(config), ShardLoader(config, plan=str(tmp_path / str(batch_size)))
        assert [b["key"] for b in got] == [b["key"] for b in want]
        assert (got.num_corrupt, got.num_repeated) == (want.num_corrupt, want.num_repeated) == \
            (2, 2 if batch_size == 1 else 0)
