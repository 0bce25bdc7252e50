"""The loader's plan from manifest metadata alone (no shard is read): buckets, batches, epochs, image mixing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shards.config import LoaderConfig
from shards.manifest import Manifest
from curation.testing.fake_runs import manifest_of
from shards.plan import IMAGE, LATENTS, VIDEO, Bucket, SubsetPlanner


def _manifest(durations, sizes, latents=None) -> Manifest:
    n = len(durations)
    samples = pd.DataFrame({
        "key": [f"k{i:03d}" for i in range(n)], "shard": "shard-000000.tar", "offset": np.arange(n) * 1024,
        "size_bytes": 1024, "crc32": 0, "duration_s": durations,
        "width": [w for _, w in sizes], "height": [h for h, _ in sizes],
        "latents_shape": latents if latents is not None else [None] * n,
        "motion_score": np.linspace(0, 1, n),
    })
    return manifest_of(samples)


def _config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": "unused", "fps": 4.0, "resolutions": [(32, 48), (48, 32), (40, 40)], **kw})


def test_each_clip_goes_to_the_longest_frame_bucket_it_fills_and_its_nearest_aspect():
    manifest = _manifest([0.5, 1.2, 3.0, 5.0, 5.0, 5.0], [(48, 80), (48, 80), (80, 48), (64, 64), (48, 72), (72, 48)])
    planner = SubsetPlanner.build(manifest, _config(num_frames=[4, 8, 16]))
    got = [planner.buckets[b] if b >= 0 else None for b in planner.video_bucket]
    assert got == [None,                                   # 0.5 s: not even 4 frames at 4 fps
                   Bucket(VIDEO, (4, 32, 48)),             # 1.2 s: 4 frames, landscape
                   Bucket(VIDEO, (8, 48, 32)),             # 3 s: 8 frames, portrait
                   Bucket(VIDEO, (16, 40, 40)),            # 5 s: 16 frames, square
                   Bucket(VIDEO, (16, 32, 48)),            # 3:2 -> the 3:2 bucket
                   Bucket(VIDEO, (16, 48, 32))]
    assert planner.excluded == {"shorter than 4 frames at 4 fps": 1}


def test_batches_hold_one_bucket_and_the_plan_depends_on_seed_and_epoch_only():
    rng = np.random.default_rng(0)
    sizes = [((48, 80), (80, 48))[i] for i in rng.integers(0, 2, 40)]
    manifest = _manifest([2.0] * 40, sizes)
    planner = SubsetPlanner.build(manifest, _config(batch_size=3, num_frames=[4]))
    plan = planner.plan(0)
    seen = []
    for j in range(len(plan)):
        bucket, items = plan.batch(j)
        assert len(items) == 3 and set(planner.video_bucket[items]) == {bucket}
        seen += items.tolist()
    assert len(seen) == len(set(seen))
    landscape = sum(1 for s in sizes if s[1] > s[0])
    assert len(plan) == landscape // 3 + (40 - landscape) // 3  # drop: only whole batches
    again = SubsetPlanner.build(manifest, _config(batch_size=3, num_frames=[4]))
    assert np.array_equal(again.plan(0).items, plan.items), "same seed, same plan"
    assert not np.array_equal(planner.plan(1).items, plan.items), "each epoch its own order"
    other_seed = SubsetPlanner.build(manifest, _config(batch_size=3, num_frames=[4], seed=9))
    assert not np.array_equal(other_seed.plan(0).items, plan.items)
    assert other_seed.fingerprint != planner.fingerprint


def test_latents_make_their_own_buckets_and_require_leaves_the_rest_out():
    latents = [[2, 4, 8, 8], None, [2, 4, 8, 8], None]
    manifest = _manifest([2.0] * 4, [(48, 80)] * 4, latents)
    auto = SubsetPlanner.build(manifest, _config(batch_size=1, num_frames=[4]))
    kinds = [auto.buckets[b].kind for b in auto.video_bucket]
    assert kinds == [LATENTS, VIDEO, LATENTS, VIDEO]
    required = SubsetPlanner.build(manifest, _config(batch_size=1, num_frames=[4], latents="require"))
    assert (required.video_bucket >= 0).tolist() == [True, False, True, False]
    ignored = SubsetPlanner.build(manifest, _config(batch_size=1, num_frames=[4], latents="ignore"))
    assert {ignored.buckets[b].kind for b in ignored.video_bucket} == {VIDEO}


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_image_batches_come_at_the_ratio(ratio):
    manifest = _manifest([2.0] * 48, [(48, 80)] * 48)
    planner = SubsetPlanner.build(manifest, _config(batch_size=4, image_ratio=ratio, num_frames=[4]))
    plan = planner.plan(0)
    kinds = [planner.buckets[b].kind for b in plan.bucket_ids]
    assert kinds.count(VIDEO) == 12
    assert kinds.count(IMAGE) / len(kinds) == pytest.approx(ratio)


def test_too_few_batches_for_the_ranks_is_an_error_not_a_silent_empty_epoch():
    manifest = _manifest([2.0] * 6, [(48, 80)] * 6)
    planner = SubsetPlanner.build(manifest, _config(batch_size=2, num_frames=[4]))  # 3 batches
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        next(planner.rank_stream((0, 0), rank=0, world_size=4))
    padded = SubsetPlanner.build(manifest, _config(batch_size=2, num_frames=[4], remainder="pad", epochs=1))
    steps = [list(padded.rank_stream((0, 0), rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in steps] == [1, 1, 1, 1]
    assert [s[0].batch_index for s in steps] == [0, 1, 2, 0]  # 3 batches and a repeat of the first
    assert {s[0].state_after for s in steps} == {(1, 0)}
