"""The curation recipe: inputs, output, and one section per step."""

from __future__ import annotations

import difflib
from typing import Literal

import pyarrow as pa
import pydantic

from common.config import Config
from curation.stages.captioning import CaptionConfig, Captioning
from curation.stages.clip_score import ClipScore, ClipScoreConfig
from curation.video.cuts import CutsConfig
from curation.post.dedup import DedupConfig
from curation.inputs import VIDEO_EXTENSIONS
from curation.video.motion import MotionConfig
from curation.ledger import CLIP_SCHEMA
from curation.stages.text_area import TextArea, TextAreaConfig
from curation.post.thresholds import Threshold

# Model stages in pipeline order, with the ledger columns each writes; every other numeric clip column
# (motion, times, sizes) is written by the decode of every run.
STAGE_COLUMNS = {"text": TextArea.columns, "caption": Captioning.columns, "clip": ClipScore.columns}
NUMERIC_CLIP_COLUMNS = tuple(f.name for f in CLIP_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))


class DecodeConfig(Config):
    """The one sequential decode of each video, and the limits that keep untrusted media in check."""

    short_side: int = 128          # working size of the shared low-resolution frames (cuts, flow)
    key_frame_max_side: int = 768  # first/middle/last frames of each clip, for the model stages
    # sampled: taken during the one decode, every 1/key_frame_fps s; a clip's first/middle/last key
    #   frames are the samples inside it nearest those frames (less than 1/key_frame_fps s away).
    # exact: the exact first/middle/last frames, read by a second, targeted decode.
    key_frames: Literal["sampled", "exact"] = "sampled"
    key_frame_fps: float = 4.0
    timeout_s: float = 60.0        # per video: timeout_s + timeout_per_video_s * duration
    timeout_per_video_s: float = 2.0
    probe_timeout_s: float = 30.0
    # a decode with no new frame for this long ends (decode_timeout): the limit above trusts the declared
    # duration, which a lying header can stretch to hours
    stall_timeout_s: float = 30.0
    max_pixels: int = 4096 * 4096  # larger frames are refused (a decompression bomb costs memory per frame)
    num_workers: int | None = None  # decode actors; None = as many as fit beside the stage actors
    num_cpus: float = 1.0           # Ray CPUs each decode actor reserves (below 1 packs them beside light stages)

    @pydantic.field_validator("short_side", "key_frame_max_side")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v < 16:
            raise ValueError(f"frame sizes must be at least 16 pixels, got {v}; use e.g. 128")
        return v

    @pydantic.field_validator("key_frame_fps")
    @classmethod
    def _sampling(cls, v: float) -> float:
        if not 0.5 <= v <= 30:
            raise ValueError(f"key_frame_fps ({v}) must be in [0.5, 30]; clips shorter than 1/key_frame_fps "
                             "seconds fall back to an exact read, so use e.g. 4")
        return v

    @pydantic.field_validator("num_workers")
    @classmethod
    def _some_workers(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"num_workers ({v}) must be at least 1; leave it unset (null) to fit as many as the CPUs allow")
        return v

    @pydantic.field_validator("timeout_s", "probe_timeout_s", "stall_timeout_s")
    @classmethod
    def _positive_time(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"time limits must be positive, got {v}; use e.g. 60")
        return v


class ClipFilesConfig(Config):
    """How clip files are cut from their source video."""

    mode: Literal["copy", "reencode", "none"] = "copy"  # copy: at keyframes, no re-encode (SVD); reencode: exact frames, H.264
    crf: int = 18
    preset: str = "veryfast"


class LedgerConfig(Config):
    """How the run folder's datasets are partitioned (see curation/ledger.py)."""

    num_buckets: int = 8
    """Hash buckets of the video id (hive partitions `bucket=NNN`); fixed by a run's first invocation."""
    videos_per_file: int = 1024
    """Videos one writer task commits at most (one file pair per bucket it holds): ~16k clips per file at
    16 clips per video. Small runs commit in smaller batches so progress moves."""

    @pydantic.field_validator("num_buckets", "videos_per_file")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"ledger sizes must be at least 1, got {v}; use e.g. 8 buckets, 1024 videos per file")
        return v


class RayConfig(Config):
    num_cpus: int | None = None  # for the embedded local Ray; None = all cores

    @pydantic.field_validator("num_cpus")
    @classmethod
    def _some_cpus(cls, v: int | None) -> int | None:
        if v is not None and v < 1:  # a Ray without CPUs schedules nothing: the run would wait forever
            raise ValueError(f"num_cpus ({v}) must be at least 1; leave it unset (null) to use every core")
        return v


class CurationConfig(Config):
    inputs: list[str] = []
    # a recipe input that does not exist: "error" stops before any work; "record" lists it in the ledger as
    # not_found and goes on (for long generated input lists). Entries of list files are always recorded.
    inputs_missing: Literal["error", "record"] = "error"
    output: str = "runs/curation"
    extensions: list[str] = VIDEO_EXTENSIONS  # in folders, other files are counted as ignored, not listed
    decode: DecodeConfig = DecodeConfig()
    cuts: CutsConfig = CutsConfig()
    motion: MotionConfig = MotionConfig()
    text: TextAreaConfig = TextAreaConfig()
    # Model stages with weights to fetch are off unless the recipe has their section (enabled defaults to
    # true inside a section): a recipe without them runs with no model weights at all.
    caption: CaptionConfig = CaptionConfig(enabled=False)
    clip: ClipScoreConfig = ClipScoreConfig(enabled=False)
    clips: ClipFilesConfig = ClipFilesConfig()
    # score column -> rule; applied in this order, which is also the funnel's order
    thresholds: dict[str, Threshold] = {}
    dedup: DedupConfig = DedupConfig()  # after the thresholds, among the clips they keep
    ledger: LedgerConfig = LedgerConfig()
    ray: RayConfig = RayConfig()

    def scores_available(self, before: str | None = None) -> list[str]:
        """The numeric clip columns this recipe's run writes: every decode column and those of the enabled model
        stages (only the stages before `before`, a stage section, when given: what its only_if can see)."""
        absent: set[str] = set()
        reached = False
        for section, columns in STAGE_COLUMNS.items():
            reached = reached or section == before
            if reached or not getattr(self, section).enabled:
                absent.update(columns)
        return [c for c in NUMERIC_CLIP_COLUMNS if c not in absent]

    @pydantic.model_validator(mode="after")
    def _scores_exist(self) -> "CurationConfig":
        # Checked here, not after the decode: a misspelt score would otherwise cost a full run, then a traceback.
        problems = [_unknown_score(f"thresholds.{name}", name, self.scores_available()) for name in self.thresholds]
        for section in STAGE_COLUMNS:
            stage = getattr(self, section)
            if stage.enabled:
                problems += [_unknown_score(f"{section}.only_if.{name}", name, self.scores_available(before=section),
                                            only_if=True) for name in stage.only_if]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def clip_frames_per_clip(self) -> int:
        """Evenly spaced frames each clip sends through the pipeline besides its three key frames: the video
        captioner's caption.video.num_frames, or 0 when no enabled stage wants more than the key frames."""
        video = self.caption.video
        return video.num_frames if self.caption.enabled and video.enabled and video.num_frames > 3 else 0

    @pydantic.field_validator("extensions")
    @classmethod
    def _dotted(cls, v: list[str]) -> list[str]:
        bad = [e for e in v if not e.startswith(".")]
        if bad:
            raise ValueError(f"extensions must start with a dot, got {bad}; write e.g. .mp4")
        return [e.lower() for e in v]


def _unknown_score(key: str, name: str, available: list[str], only_if: bool = False) -> str | None:
    """Why `name` cannot be thresholded (None when it can): the stage producing it is off, comes later, or no
    stage writes such a score (with the nearest valid name)."""
    if name in available:
        return None
    owner = next((section for section, columns in STAGE_COLUMNS.items() if name in columns), None)
    if owner is not None and name in NUMERIC_CLIP_COLUMNS:
        if only_if:
            return (f"{key}: {name} is scored by the {owner} stage, which does not run before this one; "
                    f"filter on an earlier score ({', '.join(_scores(available))})")
        return f"{key}: {name} is scored by the {owner} stage, which is not enabled; enable {owner} or remove the rule"
    hint = difflib.get_close_matches(name, available, n=1)
    fix = f"did you mean {hint[0]}?" if hint else f"scores here: {', '.join(_scores(available))}"
    return f"{key}: no enabled stage produces a score named {name!r}; {fix}"


def _scores(available: list[str]) -> list[str]:
    """The columns worth suggesting as scores (not bookkeeping such as clip_index or frame numbers)."""
    shown = ("motion_score", "motion_bucket", "duration_s", "num_frames", "fps", "width", "height",
             *(c for columns in STAGE_COLUMNS.values() for c in columns))
    return [c for c in available if c in shown]
