"""The training loop's data side: synthetic batches deal and resume like the shard loader, and ranks with unequal
data agree to stop together (2 real processes on gloo, the loop's agreement, a gradient-sized all-reduce per
step) instead of one waiting forever."""

from __future__ import annotations

import pytest
import torch

from training.data import BatchSource, SyntheticBatches
from training.train_config import SyntheticDataConfig


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
