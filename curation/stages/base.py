"""The two kinds of curation step.

`FrameAnalyzer`: consumes the single low-resolution decode of a video frame by frame (cut detection,
optical flow). It never holds more than a bounded window of frames.

`Stage`: scores a batch of clips from their key frames (text area, CLIP, captions). It loads weights in
`setup()` (once per worker), does no I/O of its own, and returns one score per clip, or a reason for a
clip it could not score. Keeping or dropping is a separate threshold step over the stored scores.

Shapes: frames are RGB uint8, H x W x 3; a clip's key frames are K x H x W x 3 (first, middle, last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import pydantic

from common.config import Config
from curation.post.thresholds import Threshold


class FrameAnalyzer(Protocol):
    def push(self, index: int, time_s: float, frame: np.ndarray) -> None:
        """Frame `index` (decode order) shown at `time_s`, RGB at the decode's working size."""

    def finish(self) -> Any:
        """The analysis of the whole video, once every frame was pushed."""


@dataclass
class ClipBatch:
    """Clips to score: ids and key frames (K x H x W x 3 uint8 RGB), in the same order. `context[i]` holds
    clip i's ledger record so far: its clip row (duration_s, fps, ...) and the columns earlier stages wrote
    (e.g. `captions` for the CLIP stage's text-image similarity)."""

    clip_ids: list[str]
    key_frames: list[np.ndarray]
    context: list[dict[str, Any]] = field(default_factory=list)
    clip_frames: list[np.ndarray | None] | None = None
    """N x H x W x 3 frames evenly spaced over each clip, for stages that look at the clip as a video
    (only sent when such a stage asks for more than the three key frames; None otherwise)."""

    def __post_init__(self) -> None:
        if not self.context:
            self.context = [{} for _ in self.clip_ids]

    def __len__(self) -> int:
        return len(self.clip_ids)


@dataclass
class StageResult:
    """One value per clip for each score column; `reasons[i]` is set when clip i could not be scored."""

    scores: dict[str, list[Any]]
    reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        lengths = {len(v) for v in self.scores.values()} | ({len(self.reasons)} if self.reasons else set())
        assert len(lengths) <= 1, f"every score column needs one value per clip, got lengths {lengths}"


class StageConfig(Config):
    """Settings every model-backed stage has: how it is batched and placed on a Ray actor pool."""

    enabled: bool = True
    batch_size: int = 16
    """Clips per call (and per Ray batch)."""
    num_actors: int = 1
    """Actors in the stage's pool; each loads the weights once."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per actor; fractions share a GPU (0.25: four actors per GPU)."""
    only_if: dict[str, Threshold] = {}
    """Score only the clips whose earlier scores pass these fixed bounds (e.g. {motion_score: {min: 0.002}}),
    to spend no model time on clips the thresholds will drop anyway. Skipped clips get no score from this
    stage: loosening those thresholds later (--rethreshold) leaves them with a missing score, so re-run the
    stage to score them."""

    @pydantic.field_validator("batch_size", "num_actors")
    @classmethod
    def _at_least_one(cls, v: int, info: pydantic.ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} ({v}) must be at least 1; to skip the stage set enabled: false")
        return v

    @pydantic.field_validator("only_if")
    @classmethod
    def _fixed_bounds(cls, v: dict[str, Threshold]) -> dict[str, Threshold]:
        relative = [name for name, rule in v.items() if rule.drop_bottom_pct is not None or rule.drop_top_pct is not None]
        if relative:
            raise ValueError(f"only_if rules for {relative} use drop_bottom_pct/drop_top_pct, which need every clip "
                             "of the run; a stage sees one batch: use min/max here and keep the percentile in thresholds")
        return v

    def wants(self, context: dict[str, Any]) -> bool:
        """Whether a clip with these earlier scores is to be scored (see only_if). A missing score fails."""
        for name, rule in self.only_if.items():
            value = context.get(name)
            if not isinstance(value, (int, float)) or value != value:
                return False
            if (rule.min is not None and value < rule.min) or (rule.max is not None and value > rule.max):
                return False
        return True


class Stage:
    """A scoring step over clip batches. Subclasses set `name`, `Config`, `columns`, and implement
    `setup` and `__call__`."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    columns: ClassVar[tuple[str, ...]]  # the score columns this stage writes
    uses_clip_frames: ClassVar[bool] = False  # whether it reads ClipBatch.clip_frames (decoded only then)

    def __init__(self, config: StageConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self._ready = False

    def setup(self) -> None:
        """Loads weights; called once per worker before the first batch."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, batch: ClipBatch) -> StageResult:
        raise NotImplementedError
