"""Typed settings for writing shards and for the streaming loader.

Training's stage recipes embed `LoaderConfig` (one per stage: its query, resolution, frames, batch size).
"""

from __future__ import annotations

import re
from typing import Literal

import pydantic

from common.config import Config

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str) -> int:
    """`1GB`, `64MiB`, `200000` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {value!r} is not a number of bytes; write e.g. 1GB, 256MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class ShardWriteConfig(Config):
    """How `lvd shards write` packs a curation run into WebDataset shards."""

    shard_max_bytes: int = 1_000_000_000
    """Target shard size; a shard is closed before the sample that would take it past this (a larger
    single sample gets a shard of its own). Accepts 1GB, 256MiB, ..."""
    shard_max_samples: int | None = None
    """Optionally also close a shard after this many samples."""
    selection: Literal["keep", "all_usable"] = "keep"
    """keep: only clips the curation thresholds kept. all_usable: every clip with status ok, with `keep` and
    the pass_* columns in the manifest so that a training stage selects by query."""
    jpeg_quality: int = 95
    frame_max_side: int | None = None
    """Downscale the first/last frame jpgs so their long side is at most this (None: clip resolution)."""
    workers: int = 1
    """`lvd shards write`: CPUs of the local Ray that packs ledger files in parallel, one task per file
    (1: in the command's own process; with RAY_ADDRESS set, the tasks run on that cluster instead)."""

    @pydantic.field_validator("shard_max_bytes", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @pydantic.field_validator("shard_max_bytes")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v < 10_000:
            raise ValueError(f"shard_max_bytes ({v}) is too small to hold a sample; use e.g. 1GB (tests: 200KB)")
        return v

    @pydantic.field_validator("shard_max_samples", "frame_max_side")
    @classmethod
    def _positive_or_none(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{v} must be at least 1, or null for no limit")
        return v

    @pydantic.field_validator("jpeg_quality")
    @classmethod
    def _quality(cls, v: int) -> int:
        if not 1 <= v <= 100:
            raise ValueError(f"jpeg_quality ({v}) must be in 1..100; 95 keeps the frames near-lossless")
        return v

    @pydantic.field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"workers ({v}) must be at least 1")
        return v


class LoaderConfig(Config):
    """The streaming loader of one training stage: which samples, in what order, decoded to what shape."""

    shards: str
    """Folder or fsspec URL (file://, s3://, gs://, ...) holding the shards and their manifest/."""
    query: str | None = None
    """The stage's subset, e.g. "aesthetic >= 5 and motion_score between 0.01 and 0.3"; see shards/query.py.
    None reads every sample (an error on shards written with selection=all_usable: say "keep" or "true")."""
    subset: str | None = None
    """A key list written by `lvd shards query --out`, instead of a query."""

    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None
    """Stop after this many epochs; None streams epoch after epoch."""
    batch_size: int = 4
    """Samples per batch on each rank (video batches)."""
    remainder: Literal["drop", "pad", "uneven"] = "drop"
    """What to do with what does not fill whole batches on every rank. drop: every rank gets the same number
    of full batches, the few samples left over (different ones each epoch) wait for the next epoch.
    pad: the same, but short batches and the last step are filled by repeating the epoch's first samples and
    batches. uneven: every sample exactly once, short batches allowed, ranks may differ by one batch (only for
    one rank or evaluation: a training all-reduce would wait forever)."""

    output: Literal["tensors", "raw"] = "tensors"
    """tensors: decoded, bucketed batches for training. raw: the tar members as bytes (custom pipelines, benchmarks)."""
    num_frames: list[int] = [14]
    """Frame-count buckets of video samples; a clip goes to the largest that fits its duration at `fps`."""
    fps: float = 7.0
    """Frames are sampled at this rate (the frame shown at each instant, as a player does)."""
    resolutions: list[tuple[int, int]] = [(320, 576), (576, 320), (448, 448)]
    """(height, width) buckets; a clip goes to the one nearest its aspect ratio, resized to cover it and
    centre-cropped."""
    clip_start: Literal["random", "start"] = "random"
    """Where in a clip longer than the frames needed the window starts (random is seeded, so resumable)."""
    image_ratio: float = 0.0
    """Fraction of batches that are image batches (single frames, for joint image-video training; 1.0 = images only)."""
    image_batch_size: int | None = None
    """Samples per image batch (default: batch_size)."""
    image_frame: Literal["first", "last", "first_or_last"] = "first_or_last"
    """Which stored frame an image sample uses."""
    latents: Literal["auto", "require", "ignore"] = "auto"
    """auto: samples with precomputed latents load them (batches of latents), others are decoded.
    require: samples without latents are left out. ignore: always decode."""

    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False
    read_json: bool = True
    """Read each sample's json into batch["meta"] (every ledger column; scores and captions come from the
    manifest either way)."""
    read_embeddings: bool = False
    """Read each sample's emb.safetensors (the curation ledger's per-clip embeddings, e.g. the clip stage's
    clip_embedding: K key frames x D, L2-normalised) into batch["clip_embedding"] (float32 B x K x D) with
    batch["clip_embedding_mask"] (bool B; zeros and false for a clip the stage did not score). Off: the member
    is never read. Every embedded sample of the subset must have the same K x D (one CLIP model). output=raw
    returns every member as bytes anyway."""
    verify_samples: bool = True
    """Check the crc32 of every member read against the manifest, so that a flipped byte that still decodes is
    skipped as corrupt rather than trained on (one pass over the bytes read; `lvd bench loader` measures it)."""
    max_corrupt_fraction: float = 0.01
    """Stop the run with an error once more than this fraction of the samples read were corrupt (skipped); the
    fraction is of at least 100 samples, so that one bad sample early on does not stop a run. 0: stop at the
    first; 1: never stop."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> "LoaderConfig":
        if self.query is not None and self.subset is not None:
            raise ValueError("set either query or subset, not both; a subset file is a saved query result")
        if self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least 1")
        if self.image_batch_size is not None and self.image_batch_size < 1:
            raise ValueError(f"image_batch_size ({self.image_batch_size}) must be at least 1, or null for batch_size")
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ValueError(f"image_ratio ({self.image_ratio}) is a fraction of batches; use a value in [0, 1]")
        if not self.num_frames or any(n < 1 for n in self.num_frames):
            raise ValueError(f"num_frames ({self.num_frames}) must list frame counts >= 1, e.g. [14] or [8, 16]")
        if self.fps <= 0:
            raise ValueError(f"fps ({self.fps}) must be positive, e.g. 7")
        if not self.resolutions or any(h < 8 or w < 8 for h, w in self.resolutions):
            raise ValueError(f"resolutions ({self.resolutions}) must list (height, width) pairs of at least 8, "
                             "e.g. [[320, 576]]")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs ({self.epochs}) must be at least 1, or null to stream without end")
        if self.num_workers < 0:
            raise ValueError(f"num_workers ({self.num_workers}) must be 0 (read in the training process) or more")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError(f"max_corrupt_fraction ({self.max_corrupt_fraction}) is a fraction of the samples read; "
                             "use a value in [0, 1], e.g. 0.01")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor ({self.prefetch_factor}) must be at least 1")
        return self

    @property
    def images_per_batch(self) -> int:
        return self.image_batch_size or self.batch_size
