"""StageActor: the Ray-side wrapper of any stage (called directly here, no Ray needed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from common.config import ConfigError
from curation.ledger import pipeline_row, rows_table
from curation.ray_steps import StageActor
from curation.stages.base import ClipBatch, Stage, StageConfig, StageResult
from curation.video.task import encode_jpeg


class RecordingStage(Stage):
    """Scores a clip with its mean pixel and echoes the caption an earlier stage wrote into its context."""

    name = "recording"
    columns = ("aesthetic", "clip_model")
    setups = 0

    def setup(self) -> None:
        RecordingStage.setups += 1

    def __call__(self, batch: ClipBatch) -> StageResult:
        return StageResult({"aesthetic": [float(f.mean()) for f in batch.key_frames],
                            "clip_model": [c["captions"][0]["text"] if c.get("captions") else None
                                           for c in batch.context]})


class VideoStage(RecordingStage):
    """Reads the evenly spaced clip frames too."""

    columns = ("aesthetic", "clip_model", "motion_pairs")
    uses_clip_frames = True

    def __call__(self, batch: ClipBatch) -> StageResult:
        res = super().__call__(batch)
        frames = batch.clip_frames or [None] * len(batch)
        res.scores["motion_pairs"] = [None if f is None else len(f) for f in frames]
        return res


class StrayColumnStage(RecordingStage):
    columns = ("sharpness",)


def _table(motion: list[float | None], videos: int = 1) -> pa.Table:
    """`videos` video rows, each with one clip per motion value, plus an unusable clip."""
    rows = []
    for v in range(videos):
        clips, keys, spread = [], [], []
        for i, m in enumerate(motion):
            clips.append({"clip_id": f"v{v}-c{i}", "video_id": f"v{v}", "status": "ok", "motion_score": m,
                          "captions": [{"text": f"caption {i}", "weight": 1.0, "source": "image"}]})
            keys.append([encode_jpeg(np.full((16, 16, 3), 40 * i, np.uint8))] * 3)
            spread.append([encode_jpeg(np.full((8, 8, 3), 10 * k, np.uint8)) for k in range(5)])
        clips.append({"clip_id": f"v{v}-bad", "video_id": f"v{v}", "status": "dropped", "reason": "too_short: 1 s"})
        keys.append([])
        spread.append([])
        rows.append(pipeline_row({"video_id": f"v{v}", "source": f"/x/{v}.mp4", "status": "ok"}, clips, keys, spread))
    return rows_table(rows)


def _results(table: pa.Table) -> list[dict]:
    return [c for clips in table.column("clips").to_pylist() for c in clips]


def test_context_carries_the_clip_row_and_earlier_stages():
    actor = StageActor(f"{__name__}.RecordingStage", {})
    out = _results(actor(_table([0.1, 0.2])))
    assert [r["clip_model"] for r in out[:2]] == ["caption 0", "caption 1"]
    assert out[0]["aesthetic"] < out[1]["aesthetic"]
    assert out[2]["aesthetic"] is None and out[2]["reason_code"] == "too_short"  # passed on unscored


def test_clips_of_many_videos_are_scored_in_stage_sized_calls():
    calls = []

    class Counting(RecordingStage):
        def __call__(self, batch):
            calls.append(len(batch))
            return super().__call__(batch)

    actor = StageActor.__new__(StageActor)
    actor.stage = Counting(Counting.Config(batch_size=4))
    out = _results(actor(_table([0.1, 0.2, 0.3], videos=3)))
    assert calls == [4, 4, 1]
    assert [r["aesthetic"] is not None for r in out] == [True, True, True, False] * 3


def test_weights_load_once_per_actor():
    before = RecordingStage.setups
    actor = StageActor(f"{__name__}.RecordingStage", {})
    for _ in range(3):
        actor(_table([0.1]))
    assert RecordingStage.setups - before == 1


def test_clip_frames_reach_only_the_stages_that_read_them():
    out = _results(StageActor(f"{__name__}.VideoStage", {})(_table([0.1, 0.2])))
    assert [r["motion_pairs"] for r in out[:2]] == [5, 5]
    plain = StageActor(f"{__name__}.RecordingStage", {})
    assert _results(plain(_table([0.1])))[0]["motion_pairs"] is None


def test_only_if_skips_clips_that_fail_fixed_bounds():
    actor = StageActor(f"{__name__}.RecordingStage", {"only_if": {"motion_score": {"min": 0.15}}})
    out = _results(actor(_table([0.1, 0.2, None, 0.3])))
    assert out[0]["clip_model"] is None and out[2]["clip_model"] is None  # below the bound, and no score at all
    assert out[1]["clip_model"] == "caption 1" and out[3]["clip_model"] == "caption 3"


def test_a_stage_writing_a_column_the_ledger_lacks_is_refused():
    with pytest.raises(TypeError, match=r"\['sharpness'\]; add them to ledger.CLIP_SCHEMA"):
        StageActor(f"{__name__}.StrayColumnStage", {})


def test_only_if_refuses_percentiles():
    with pytest.raises((ConfigError, ValueError), match="min/max here"):
        StageConfig.model_validate({"only_if": {"motion_score": {"drop_bottom_pct": 10}}})
