"""Fixtures for pipeline tests: a Ray of our own, synthetic inputs, recipes at test size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# beside the repository; LVD_SHARED_VIDEOS points elsewhere (a git worktree lives one level deeper)
SHARED_VIDEOS = Path(os.environ.get("LVD_SHARED_VIDEOS") or Path(__file__).resolve().parents[2].parent / "shared" / "videos")


def shared_video(rel: str) -> Path:
    path = SHARED_VIDEOS / rel
    if not path.is_file():
        pytest.skip(f"{path} not present (real test videos are optional)")
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A Ray started by this test module and stopped by it; never `ray stop`."""
    import ray

    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def make_config(tmp_path: Path, inputs: list, **sections):
    """A curation config at test size (small key frames, short clips)."""
    from curation.config import CurationConfig

    tree = {
        "inputs": [str(i) for i in inputs],
        "output": str(tmp_path / "run"),
        "decode": {"key_frame_max_side": 320, "timeout_s": 30},
        "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0},
        "text": {"batch_size": 8, "max_side": 320},
        "thresholds": {"motion_score": {"min": 0.002}, "text_area": {"max": 0.05}},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    if tree["text"].get("enabled") is False and "thresholds" not in sections:
        del tree["thresholds"]["text_area"]  # a threshold on a score no stage produces is refused
    return CurationConfig.model_validate(tree)


