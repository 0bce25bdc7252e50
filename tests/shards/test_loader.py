"""The streaming loader: splitting over ranks and workers, exact resume, decoding, buckets, image mixing,
corrupt samples."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from shards.loader import ShardLoader
from shards.manifest import Manifest
from curation.testing.fake_runs import clip_level, clip_number, frame_level
from tests.shards.conftest import NUM_FRAMES, loader_config

QUERY = "motion_score < 0.45"


def _rank_loaders(config, world_size, state=None):
    loaders = [ShardLoader(config, rank=r, world_size=world_size) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return loaders


def _take(loader, steps):
    return list(itertools.islice(iter(loader), steps))


@pytest.mark.parametrize("remainder", ["drop", "pad", "uneven"])
def test_two_ranks_two_workers_read_disjoint_samples_covering_the_subset(shards_dir, remainder):
    config = loader_config(shards_dir, query=QUERY, epochs=1, remainder=remainder, num_workers=2, output="raw")
    manifest = Manifest.load(str(shards_dir))
    subset = manifest.samples.iloc[manifest.select(QUERY)]
    assert 4 < len(subset) < len(manifest.samples)
    per_rank = [list(loader) for loader in _rank_loaders(config, 2)]
    for rank, batches in enumerate(per_rank):
        assert {b["worker"] for b in batches} == {(rank, 0), (rank, 1)}, "both workers of both ranks read"
    keys = Counter(k for batches in per_rank for b in batches for k in b["key"])
    # independent expectation: two aspect buckets (landscape / portrait), 2 per batch, 2 ranks
    sizes = [int((subset["width"] > subset["height"]).sum()), int((subset["width"] < subset["height"]).sum())]
    if remainder == "uneven":  # every sample exactly once
        assert keys == Counter(subset["key"])
    elif remainder == "drop":  # disjoint, equal full batches per rank, only the remainder left out
        full = sum(n // 2 for n in sizes)
        assert len(per_rank[0]) == len(per_rank[1]) == full // 2
        assert max(keys.values()) == 1 and set(keys) < set(subset["key"])
        assert sum(keys.values()) == 2 * 2 * (full // 2)
        assert all(len(b["key"]) == 2 for batches in per_rank for b in batches)
    else:  # pad: every sample at least once, equal counts, the only repeats are the padding
        batches = sum(-(-n // 2) for n in sizes)
        assert len(per_rank[0]) == len(per_rank[1]) == -(-batches // 2)
        assert set(keys) == set(subset["key"])
        assert sum(keys.values()) - len(subset) == 2 * 2 * len(per_rank[0]) - len(subset)
    for loader in _rank_loaders(config, 2):
        assert loader.batches_per_epoch() == len(per_rank[0])


def _same_batch(a, b):
    assert a["key"] == b["key"] and (a["epoch"], a["batch_index"]) == (b["epoch"], b["batch_index"])
    assert torch.equal(a["frames_BTCHW"], b["frames_BTCHW"]) and a["caption"] == b["caption"]


def test_resume_gives_the_batches_of_an_uninterrupted_run(shards_dir):
    config = loader_config(shards_dir, num_workers=2)  # 6 batches an epoch -> 3 steps on 2 ranks
    straight = [_take(loader, 5) for loader in _rank_loaders(config, 2)]   # crosses an epoch boundary
    first = _rank_loaders(config, 2)
    for loader in first:
        _take(loader, 2)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1] == {**states[0], "epoch": 0, "consumed": 4}
    # rebuilt from the state, with another number of workers: workers do not change the data
    resumed = [_take(loader, 3) for loader in _rank_loaders(loader_config(shards_dir, num_workers=0), 2, states[0])]
    for rank in range(2):
        for a, b in zip(straight[rank][2:], resumed[rank], strict=True):
            _same_batch(a, b)
    assert straight[0][3]["epoch"] == 1, "the comparison went past the epoch boundary"


def test_resume_with_another_world_size_consumes_the_same_next_batches(shards_dir):
    # batch_size 1: 12 batches an epoch; 2 ranks -> 6 steps
    config = loader_config(shards_dir, batch_size=1, num_workers=2)
    straight = {(b["epoch"], b["batch_index"]): b for loader in _rank_loaders(config, 2) for b in _take(loader, 12)}
    first = _rank_loaders(config, 2)
    for loader in first:
        _take(loader, 2)
    state = first[0].state_dict()  # 4 batches consumed

    # one rank: exactly the uninterrupted sequence, step by step
    (single,) = _rank_loaders(config, 1, state)
    order = sorted(k for k in straight if k >= (0, 4))[:10]
    for key, batch in zip(order, _take(single, 10), strict=True):
        _same_batch(straight[key], batch)

    # three ranks: 8 batches left in the epoch -> 2 whole steps (batches 4..9); the 2 left over (10, 11) wait
    # for the next epoch, which then deals all 12 batches over 4 steps
    three = [_take(loader, 6) for loader in _rank_loaders(config, 3, state)]
    assert all(len(r) == 6 for r in three)
    got = {(b["epoch"], b["batch_index"]): b for r in three for b in r}
    assert sorted(got) == [(0, j) for j in range(4, 10)] + [(1, j) for j in range(12)]
    for key in got:
        _same_batch(straight[key], got[key])
    assert all(ShardLoader(config, rank=r, world_size=3).batches_per_epoch(1) == 4 for r in range(3))


def test_state_of_another_plan_is_refused_and_world_size_is_loud(shards_dir, monkeypatch):
    loader = ShardLoader(loader_config(shards_dir))
    _take(loader, 1)
    with pytest.raises(ValueError, match="another plan"):
        ShardLoader(loader_config(shards_dir, batch_size=1)).load_state_dict(loader.state_dict())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every rank would read the same samples"):
        ShardLoader(loader_config(shards_dir))


def test_decoded_frames_are_the_right_frames_at_the_target_rate_and_bucket(shards_dir):
    loader = ShardLoader(loader_config(shards_dir, clip_start="start", epochs=1, remainder="uneven"))
    seen = 0
    for batch in loader:
        frames = batch["frames_BTCHW"]
        assert frames.dtype == torch.uint8 and frames.shape[:3] == (len(batch["key"]), 4, 3)
        for key, clip, meta in zip(batch["key"], frames, batch["meta"]):
            c = clip_number(key)
            landscape = meta["width"] > meta["height"]
            assert tuple(clip.shape[-2:]) == ((32, 48) if landscape else (48, 32))
            red = clip[:, 0].float().mean(dim=(1, 2))
            green = clip[:, 1].float().mean(dim=(1, 2))
            # 8 fps clip read at 4 fps: frames 0, 2, 4, 6
            assert torch.allclose(red, torch.tensor([float(frame_level(2 * i)) for i in range(4)]), atol=4)
            assert torch.allclose(green, torch.full((4,), float(clip_level(c))), atol=4)
            seen += 1
        assert batch["fps_B"].tolist() == [4.0] * len(batch["key"]) and not batch["is_image_B"].any()
        assert set(batch["scores"]) >= {"motion_score", "aesthetic"}
        for key, caption in zip(batch["key"], batch["caption"]):
            assert caption in {f"clip {clip_number(key)} caption a", f"clip {clip_number(key)} caption b"}
    assert seen == 12


def test_random_window_is_seeded_and_inside_the_clip(shards_dir):
    def starts(seed):
        out = {}
        for batch in ShardLoader(loader_config(shards_dir, seed=seed, epochs=1, remainder="uneven")):
            for key, clip in zip(batch["key"], batch["frames_BTCHW"]):
                red = clip[:, 0].float().mean(dim=(1, 2)).numpy()
                first = int(round(red[0] / 10))
                assert 0 <= first <= NUM_FRAMES - 8  # a 4-frame window at 4 fps spans 8 source frames
                assert np.allclose(red, [frame_level(first + 2 * i) for i in range(4)], atol=4)
                out[key] = first
        return out

    a = starts(5)
    assert a == starts(5) and len(set(a.values())) > 1


def test_image_batches_mix_in_at_the_ratio_from_the_stored_frames(shards_dir):
    loader = ShardLoader(loader_config(shards_dir, image_ratio=0.5, image_batch_size=3, epochs=1))
    batches = list(loader)
    images = [b for b in batches if b["kind"] == "image"]
    videos = [b for b in batches if b["kind"] == "video"]
    assert len(images) == len(videos) == 6
    assert [b["kind"] for b in batches] != ["video"] * 6 + ["image"] * 6, "interleaved, not appended"
    levels = set()
    for b in images:
        assert b["frames_BTCHW"].shape[:2] == (3, 1) and b["is_image_B"].all() and (b["fps_B"] == 0).all()
        for key, frame in zip(b["key"], b["frames_BTCHW"]):
            red = float(frame[0, 0].float().mean())
            level = min((frame_level(0), frame_level(NUM_FRAMES - 1)), key=lambda v: abs(v - red))
            assert abs(red - level) < 4
            assert abs(float(frame[0, 1].float().mean()) - clip_level(clip_number(key))) < 4
            levels.add(level)
    assert len(levels) == 2, "both first and last frames are used"
    only_images = list(ShardLoader(loader_config(shards_dir, image_ratio=1.0, image_batch_size=4, epochs=1)))
    assert {b["kind"] for b in only_images} == {"image"} and sum(len(b["key"]) for b in only_images) == 12


def _damage_mp4(shards, key, how):
    """Flips one byte of sample `key`'s mp4 (decodes, wrongly: only a checksum sees it) or zeroes it all."""
    manifest = Manifest.load(str(shards))
    row = int(np.flatnonzero(manifest.samples["key"] == key)[0])
    offset, size, _ = (int(a[0]) for a in manifest.member_ranges(np.array([row]), "mp4"))
    rec = manifest.samples.iloc[row]
    path = shards / rec["shard"]
    data = bytearray(path.read_bytes())
    start = int(rec["offset"]) + offset
    if how == "flip":
        data[start + size // 2] ^= 0x01
    else:
        data[start : start + size] = bytes(size)
    path.write_bytes(bytes(data))


def _truncate(shards, shard, cut):
    path = shards / shard
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - cut)
    return path.stat().st_size


def test_corrupt_samples_are_skipped_counted_and_never_replaced_by_copies(shards_copy, caplog):
    manifest = Manifest.load(str(shards_copy))
    keys = manifest.samples["key"].tolist()
    _damage_mp4(shards_copy, keys[1], "flip")
    _damage_mp4(shards_copy, keys[6], "zero")
    _truncate(shards_copy, manifest.samples["shard"].iloc[-1], 2000)  # into the last sample's data
    truncated = keys[-1]
    caplog.set_level(logging.WARNING, logger="lvd.shards")

    def read(**kw):
        loader = ShardLoader(loader_config(shards_copy, epochs=1, remainder="uneven", max_corrupt_fraction=0.05, **kw))
        batches = list(loader)
        return loader, batches, [k for b in batches for k in b["key"]]

    # by default each member's crc32 is checked: the flipped byte, which still decodes, is caught
    loader, batches, got = read()
    assert sorted(got) == sorted(set(keys) - {keys[1], keys[6], truncated}), "each good sample once, no copies"
    assert loader.num_corrupt == 3 == sum(b["num_corrupt"] for b in batches) and loader.num_repeated == 0
    assert loader.num_read == 12 == sum(b["num_read"] for b in batches)
    assert all(b["frames_BTCHW"].shape[0] == len(b["key"]) == b["num_read"] - b["num_corrupt"] for b in batches)
    assert sum("skipping corrupt sample" in r.message for r in caplog.records) == 3
    # without checksums the flipped byte goes to training
    loader, _, got = read(verify_samples=False)
    assert keys[1] in got and loader.num_corrupt == 2
    # batches of one: a bad sample's batch takes the next good sample of its bucket, and says so
    caplog.clear()
    loader = ShardLoader(loader_config(shards_copy, epochs=1, batch_size=1, max_corrupt_fraction=0.05))
    ones = list(loader)
    assert len(ones) == 12 and not {keys[1], keys[6], truncated} & {b["key"][0] for b in ones}
    assert loader.num_corrupt == loader.num_repeated == 3 == sum(b["num_repeated"] for b in ones)
    assert sum("take their place (read twice this epoch)" in r.message for r in caplog.records) == 3


def test_a_truncated_shard_never_fills_batches_with_copies(shards_copy):
    """Half a shard cut off, read in order (its samples side by side in batches): what is cut is counted, the
    batches shrink, no sample comes twice."""
    manifest = Manifest.load(str(shards_copy))
    s = manifest.samples
    shard = manifest.shards["shard"].iloc[1]
    rows = s[s["shard"] == shard]
    size = _truncate(shards_copy, shard, int(manifest.shards["size_bytes"].iloc[1]) // 2)
    lost = set(rows.loc[rows["offset"] + rows["size_bytes"] > size, "key"])
    assert 0 < len(lost) < len(rows)
    for output in ("raw", "tensors"):
        loader = ShardLoader(loader_config(shards_copy, epochs=1, remainder="uneven", shuffle=False, batch_size=4,
                                           max_corrupt_fraction=1.0, output=output))
        got = [k for b in loader for k in b["key"]]
        assert sorted(got) == sorted(set(s["key"]) - lost), output
        assert loader.num_corrupt == len(lost) and loader.num_repeated == 0


def test_too_many_corrupt_samples_stop_the_run_loudly(shards_copy):
    from shards.loader import CorruptDataError

    manifest = Manifest.load(str(shards_copy))
    for key in manifest.samples["key"].iloc[[0, 5]]:
        _damage_mp4(shards_copy, key, "flip")
    config = loader_config(shards_copy, epochs=1, shuffle=False)
    # 2 bad samples: more than 1% of (at least) 100
    with pytest.raises(CorruptDataError, match=r"2 of the \d+ samples read were corrupt .* max_corrupt_fraction "
                                               r"\(0.01\).*lvd shards verify"):
        list(ShardLoader(config))
    # with room for them, the epoch completes
    loader = ShardLoader(config.model_copy(update={"max_corrupt_fraction": 0.02}))
    assert len([k for b in loader for k in b["key"]]) == 10 and loader.num_corrupt == 2


def test_object_storage_urls_read_the_same_batches(shards_dir):
    """fsspec URLs (here memory://, standing in for s3:// or gs://) take the ranged-read path."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shards_dir.rglob("*"):
        if path.is_file():
            fs.pipe(f"/lvd-test-shards/{path.relative_to(shards_dir)}", path.read_bytes())
    local = list(ShardLoader(loader_config(shards_dir, epochs=1, remainder="uneven")))
    remote = list(ShardLoader(loader_config("memory://lvd-test-shards", epochs=1, remainder="uneven")))
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        _same_batch(a, b)
    fs.rm("/lvd-test-shards", recursive=True)


def test_configs_name_the_bad_value_and_the_fix():
    from shards.config import LoaderConfig, ShardWriteConfig

    assert ShardWriteConfig(shard_max_bytes="1GB").shard_max_bytes == 10**9
    assert ShardWriteConfig(shard_max_bytes="256MiB").shard_max_bytes == 256 * 2**20
    with pytest.raises(ValueError, match="write e.g. 1GB"):
        ShardWriteConfig(shard_max_bytes="lots")
    with pytest.raises(ValueError, match=r"image_ratio \(1.5\) is a fraction of batches"):
        LoaderConfig(shards="x", image_ratio=1.5)
    with pytest.raises(ValueError, match="either query or subset"):
        LoaderConfig(shards="x", query="keep", subset="s.parquet")
    with pytest.raises(ValueError, match=r"max_corrupt_fraction \(2.0\) is a fraction of the samples read"):
        LoaderConfig(shards="x", max_corrupt_fraction=2.0)
