"""The training loop's data side: synthetic batches deal and resume like the shard loader, and ranks with unequal
data agree to stop together (2 real processes on gloo, the loop's agreement, a gradient-sized all-reduce per
step) instead of one waiting forever."""

from __future__ import annotations

import json

import pytest
import torch

from training.data import BatchSource, SyntheticBatches
from training.stage_config import SyntheticDataConfig


def _keys(batches, n):
    it = iter(batches)
    return [next(it)["key"] for _ in range(n)]


def test_synthetic_batches_resume_exactly_and_deal_ranks_apart():
    config = SyntheticDataConfig(num_samples=6, batch_size=2, num_frames=3, height=16, width=16, image_ratio=0.5)
    whole = _keys(SyntheticBatches(config), 7)
    first = SyntheticBatches(config)
    head = _keys(first, 3)
    resumed = SyntheticBatches(config)
    resumed.load_state_dict(first.state_dict())
    assert head + _keys(resumed, 4) == whole  # across an epoch boundary (3 batches per epoch) too
    assert isinstance(first, BatchSource)
    # two ranks take alternate batches of the same plan: together, the single rank's batches
    rank0, rank1 = (SyntheticBatches(config, rank=r, world_size=2) for r in (0, 1))
    assert _keys(rank0, 1) + _keys(rank1, 1) == whole[:2]


def test_synthetic_frames_move_and_images_are_single_frames():
    config = SyntheticDataConfig(num_samples=4, batch_size=2, num_frames=4, height=32, width=32, image_ratio=0.5,
                                 epochs=2)
    batches = list(SyntheticBatches(config))
    assert {b["kind"] for b in batches} == {"video", "image"}
    for b in batches:
        t = b["frames_BTCHW"].shape[1]
        assert t == (1 if b["kind"] == "image" else 4) and b["is_image_B"].all() == (b["kind"] == "image")
    video = next(b for b in batches if b["kind"] == "video")["frames_BTCHW"].float()
    assert (video[:, 1:] - video[:, :-1]).abs().mean() > 1.0  # the square moves between frames


def _rank_loop(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from training.engine import all_ranks_have

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    config = SyntheticDataConfig(num_samples=6, batch_size=2, num_frames=2, height=8, width=8, epochs=1)
    it = iter(SyntheticBatches(config, rank=rank, world_size=world))
    steps = 0
    while steps < 10:
        batch = next(it, None)
        if not all_ranks_have(batch is not None, torch.device("cpu")):
            break
        grad = torch.ones(1000)
        dist.all_reduce(grad)  # the step's gradient all-reduce: would hang if only one rank got here
        steps += 1
    torch.save(steps, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ranks_with_unequal_data_agree_to_stop(tmp_path):
    """One epoch of 3 batches over 2 ranks: rank 0 holds 2, rank 1 holds 1. Both take step 1 and stop."""
    import torch.multiprocessing as mp

    from training.engine import free_port

    init = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_rank_loop, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)] == [1, 1]


def test_the_stage_plan_is_written_once_reused_extended_and_kept_on_resume(tmp_path, monkeypatch):
    import hashlib
    import time

    from shards import plan_file
    from tests.training.train_helpers import make_shards, shard_data, stage_tree
    from training.data import PlanError, stage_plan
    from training.stage_config import TrainConfig

    shards = make_shards(tmp_path)
    writes = []
    write_plan = plan_file.write_plan
    monkeypatch.setattr(plan_file, "write_plan", lambda *a, **kw: writes.append(1) or write_plan(*a, **kw))

    def config(steps=8, **loader):
        return TrainConfig.model_validate(stage_tree(tmp_path / "out", shard_data(shards, **loader), steps=steps))

    def epoch_hashes(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("epoch-*.parquet"))}

    folder = tmp_path / "out" / "plan"
    assert stage_plan(config(), 0, 2) == str(folder) and len(writes) == 1
    doc = json.loads((folder / "plan.json").read_text())
    # 8 steps of one batch on each of 2 ranks, 2 epochs of margin
    assert len(doc["batches"]) == -(-8 // -(-doc["batches"][0] // 2)) + 2
    before = epoch_hashes(folder)
    stage_plan(config(num_workers=2), 0, 2)  # how it is read is no reason to plan again
    stage_plan(config(), 1, 2)               # another rank finds it there
    assert len(writes) == 1 and epoch_hashes(folder) == before
    stage_plan(config(steps=200), 0, 2)      # a longer run: more epochs, the first ones the same
    after = epoch_hashes(folder)
    assert len(writes) == 2 and len(after) > len(before) and {k: after[k] for k in before} == before
    stage_plan(config(steps=200, query="motion_score < 0.45"), 0, 2)  # other data, no checkpoint: planned anew
    assert len(writes) == 3
    (tmp_path / "out" / "checkpoints").mkdir()
    (tmp_path / "out" / "checkpoints" / "latest").write_text("step_00000003")
    with pytest.raises(PlanError, match="resumes from a checkpoint taken in it"):
        stage_plan(config(steps=200), 0, 2)
    assert len(writes) == 3

    # a rank waiting for rank 0's plan: rank 0's failure ends the wait with its reason, else a timeout does
    other = config(query="motion_score < 0.3").model_copy(deep=True)
    other.data.plan_timeout_s = 0.5
    t0 = time.monotonic()
    with pytest.raises(PlanError, match="raise data.plan_timeout_s"):
        stage_plan(other, 1, 2)
    assert time.monotonic() - t0 < 5
    from shards.manifest import Manifest

    plan_file.plan_failed(Manifest.load(str(shards)), other.data.shards, folder, "the subset is empty")
    with pytest.raises(PlanError, match="rank 0 could not write the plan .*: the subset is empty"):
        stage_plan(other, 1, 2)
