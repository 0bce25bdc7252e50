"""The calibration recipe (recipes/calibrate/*.yaml): which shards, which scores and fractions, which proxy.

    lvd calibrate recipes/calibrate/tiny.yaml --set shards=demo-data/shards-all --set output=demo-data/calibrate
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

from common.config import Config, apply_overrides, validate
from training.calibration.clip_similarity import ClipSimilarityConfig
from training.calibration.fvd import FvdConfig
from training.evaluation import DEFAULT_SIGMAS

SVD_FRACTIONS = [12.5, 25.0, 50.0]


class ScoreArms(Config):
    """One score to calibrate: which end of it is dropped, and how much of the pool each arm drops."""

    direction: Literal["bottom", "top"] = "bottom"
    """bottom: drop the lowest scores (motion, aesthetics, CLIP similarity); top: the highest (text area)."""
    fractions: list[float] | None = None
    """Percent of the pool each arm drops (default: the recipe's `fractions`)."""

    @pydantic.field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            check_fractions(v)
        return v


def check_fractions(values: list[float]) -> None:
    if not values or any(not 0 < f < 100 for f in values):
        raise ValueError(f"fractions ({values}) are percentages of clips to drop; list values in (0, 100), "
                         "e.g. [12.5, 25, 50]")


class HeldOutConfig(Config):
    """The clips every arm is evaluated on, left out of every arm's training subset: chosen from the pool by
    a hash of (seed, key), so the same shards and seed give the same set."""

    num_samples: int = 64
    query: str | None = None
    """Draw the held-out clips only from the pool's samples of this query (a hand-checked or strictly filtered
    set: what the model should be good at); None: from the whole pool."""
    seed: int = 0
    sigmas: list[float] = DEFAULT_SIGMAS
    """EDM noise levels of the held-out denoising loss (see training/evaluation.py)."""

    @pydantic.field_validator("num_samples")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"heldout.num_samples ({v}) must be at least 1")
        return v


class RunnerConfig(Config):
    """Resources of one arm when arms run on a Ray cluster (`lvd calibrate --address`)."""

    num_workers: int = 1
    """Ranks per arm: 1 runs an arm as one Ray task; more run it as a Ray Train worker group of that many
    ranks (as `lvd train --launcher ray`), the resources below per rank."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @pydantic.field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"runner.num_workers ({v}) must be at least 1")
        return v


class CalibrateConfig(Config):
    """A threshold calibration. See training/calibration/__init__.py."""

    name: str = "calibration"
    output: str
    """arms/<arm>/ (subset.parquet, train/ with the proxy's model and eval.json, done.json), heldout.parquet,
    results.json, results.csv, results.md, thresholds.yaml, report.html, config.yaml, run.json."""
    shards: str | None = None
    """The shard folder (its manifest carries every score); write shards with `--all-usable` to calibrate over
    the clips the current thresholds drop too. Exactly one of `shards` and `run`."""
    run: str | None = None
    """A curation run instead of shards: calibrate writes the run's usable clips as shards itself (as
    `lvd shards write RUN OUTPUT/shards --all-usable`; resumable) and calibrates on them."""
    shards_set: list[str] = []
    """With `run`: shard writer settings (`key=value`, as `lvd shards write --set`), e.g. [shard_max_bytes=256MiB]."""
    query: str | None = None
    """The pool every arm draws from, as a query over the manifest (e.g. `keep`); None: every sample."""
    scores: dict[str, ScoreArms]
    """Score column -> direction (and fractions). SVD's: motion_score, aesthetic, caption_similarity (bottom),
    text_area (top)."""
    fractions: list[float] = SVD_FRACTIONS
    """Percent of the pool dropped, per arm; SVD's grid is 12.5 / 25 / 50."""
    baseline: bool = True
    """An arm trained on the whole pool."""
    random_control: bool = True
    """Per fraction, an arm that drops that share of the pool at random (a hash of the key), so a filter is
    compared with losing as many clips for no reason."""
    heldout: HeldOutConfig = HeldOutConfig()
    train: str
    """The proxy's stage recipe (recipes/train/*.yaml): the same steps, batch and seed for every arm."""
    train_set: list[str] = []
    """Overrides of the proxy recipe (`key=value`, as `lvd train --set`), e.g. [steps=40000]."""
    clip: ClipSimilarityConfig | None = None
    """CLIP text-video similarity of each proxy's samples for fixed prompts (a second metric, reported next
    to the held-out loss); None: not measured."""
    fvd: FvdConfig | None = None
    """FVD between each proxy's samples and the held-out clips, with a VideoMAE feature extractor (reported next
    to the held-out loss; meaningful only with a real extractor and many samples); None: not measured."""
    runner: RunnerConfig = RunnerConfig()

    @pydantic.field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        check_fractions(v)
        return v

    @pydantic.model_validator(mode="after")
    def _check(self) -> CalibrateConfig:
        if not self.scores:
            raise ValueError("scores is empty; name at least one score column, e.g. scores: {motion_score: "
                             "{direction: bottom}}")
        if (self.shards is None) == (self.run is None):
            raise ValueError("name exactly one of shards (a shard folder) and run (a curation run, written as shards "
                             f"into OUTPUT/shards); got shards={self.shards!r}, run={self.run!r}")
        return self

    def shard_write_config(self):
        """The shard writer's settings for `run`: `shards_set` over the defaults, every usable clip."""
        from shards.config import ShardWriteConfig

        tree = apply_overrides({}, self.shards_set)
        tree["selection"] = "all_usable"
        return validate(ShardWriteConfig, tree, source="shards_set")

    @property
    def shard_folder(self) -> str:
        """The shards every arm draws from: `shards`, or OUTPUT/shards written from `run`."""
        return self.shards if self.shards is not None else str(Path(self.output) / "shards")

    def fractions_of(self, score: str) -> list[float]:
        return self.scores[score].fractions or self.fractions
