"""A fake curation run and its shards, built once per session (no curation pipeline runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NUM_CLIPS = 16        # usable clips; every 4th is dropped by the (fake) thresholds -> 12 kept
NUM_FRAMES = 16       # per clip, at 8 fps: 2 s
SIZES = [(48, 80), (80, 48)]  # (h, w): landscape and portrait clips, alternating
SHARD_BYTES = "30KB"  # a few samples per shard


@pytest.fixture(scope="session")
def fake_run_dir(tmp_path_factory) -> Path:
    from curation.testing.fake_runs import fake_run

    run = tmp_path_factory.mktemp("run") / "run"
    fake_run(run, num_clips=NUM_CLIPS, num_frames=NUM_FRAMES, fps=8.0, sizes=SIZES, captions=True)
    return run


@pytest.fixture(scope="session")
def shards_dir(fake_run_dir, tmp_path_factory) -> Path:
    """Shards of the kept clips. Read-only for tests: copy it (see `shards_copy`) to damage it."""
    from shards.config import ShardWriteConfig
    from shards.writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "kept"
    write_shards(fake_run_dir, out, ShardWriteConfig(shard_max_bytes=SHARD_BYTES))
    return out


@pytest.fixture
def shards_copy(shards_dir, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    return dst


def loader_config(shards, **kw):
    """A loader at test size: 4 frames at 4 fps (1 s of the 2 s clips), small buckets, no workers."""
    from shards.config import LoaderConfig

    base = dict(shards=str(shards), batch_size=2, num_frames=[4], fps=4.0, resolutions=[(32, 48), (48, 32)],
                num_workers=0, seed=3)
    return LoaderConfig(**{**base, **kw})
