"""StageActor: the Ray-side wrapper of any stage (called directly here, no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from common.config import ConfigError
from curation.ray_steps import StageActor
from curation.stage import ClipBatch, Stage, StageConfig, StageResult
from curation.video_task import encode_jpeg


class RecordingStage(Stage):
    """Scores a clip with its mean pixel and echoes what it saw in its context."""

    name = "recording"
    columns = ("mean_pixel", "seen_caption")
    setups = 0

    def setup(self) -> None:
        RecordingStage.setups += 1

    def __call__(self, batch: ClipBatch) -> StageResult:
        return StageResult({"mean_pixel": [float(f.mean()) for f in batch.key_frames],
                            "seen_caption": [c.get("caption") for c in batch.context]})


class VideoStage(RecordingStage):
    """Reads the evenly spaced clip frames too."""

    name = "recording"
    columns = ("mean_pixel", "seen_caption", "num_clip_frames")
    uses_clip_frames = True

    def __call__(self, batch: ClipBatch) -> StageResult:
        res = super().__call__(batch)
        frames = batch.clip_frames or [None] * len(batch)
        res.scores["num_clip_frames"] = [None if f is None else len(f) for f in frames]
        return res


def _table(motion: list[float | None]) -> pa.Table:
    rows = []
    for i, m in enumerate(motion):
        frames = [encode_jpeg(np.full((16, 16, 3), 40 * i, np.uint8))] * 3
        rows.append({"row_type": "clip", "video_id": "v", "clip_id": f"c{i}", "status": "ok",
                     "record": json.dumps({"clip_id": f"c{i}", "motion_score": m}), "key_frames": frames,
                     "stage_earlier": json.dumps({"caption": f"caption {i}"})})
    for row in rows:
        row["clip_frames"] = [encode_jpeg(np.full((8, 8, 3), 10 * k, np.uint8)) for k in range(5)]
    rows.append({"row_type": "video", "video_id": "v", "clip_id": "", "status": "ok", "record": "{}",
                 "key_frames": [], "clip_frames": [], "stage_earlier": ""})
    return pa.Table.from_pylist(rows)


def _results(table: pa.Table) -> list[dict]:
    return [json.loads(v) if v else None for v in table.column("stage_recording").to_pylist()]


def test_context_carries_the_record_and_earlier_stages():
    actor = StageActor(f"{__name__}.RecordingStage", {})
    out = _results(actor(_table([0.1, 0.2])))
    assert [r["seen_caption"] for r in out[:2]] == ["caption 0", "caption 1"]
    assert out[0]["mean_pixel"] < out[1]["mean_pixel"]
    assert out[2] is None  # the video row is passed on unscored


def test_weights_load_once_per_actor():
    before = RecordingStage.setups
    actor = StageActor(f"{__name__}.RecordingStage", {})
    for _ in range(3):
        actor(_table([0.1]))
    assert RecordingStage.setups - before == 1


def test_clip_frames_reach_only_the_stages_that_read_them():
    out = _results(StageActor(f"{__name__}.VideoStage", {})(_table([0.1, 0.2])))
    assert [r["num_clip_frames"] for r in out[:2]] == [5, 5]
    plain = StageActor(f"{__name__}.RecordingStage", {})
    assert "num_clip_frames" not in _results(plain(_table([0.1])))[0]


def test_only_if_skips_clips_that_fail_fixed_bounds():
    actor = StageActor(f"{__name__}.RecordingStage", {"only_if": {"motion_score": {"min": 0.15}}})
    out = _results(actor(_table([0.1, 0.2, None, 0.3])))
    assert out[0] is None and out[2] is None  # below the bound, and no score at all
    assert out[1]["seen_caption"] == "caption 1" and out[3]["seen_caption"] == "caption 3"


def test_only_if_refuses_percentiles():
    with pytest.raises((ConfigError, ValueError), match="min/max here"):
        StageConfig.model_validate({"only_if": {"motion_score": {"drop_bottom_pct": 10}}})
