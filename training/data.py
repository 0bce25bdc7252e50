"""Where the training loop's batches come from. The loop asks for little: an iterable of batch dicts in the
shard loader's format (see shards/loader.py) with `state_dict()` / `load_state_dict()` for exact resume.

Two sources fit it:
- `ShardLoader` (shards/loader.py): the stage's subset of the manifest, decoded (or precomputed latents). Each
  rank reads its own batches of the stage's plan, written once into OUTPUT/plan (stage_plan).
- `SyntheticBatches`: batches made in memory once at start-up; for tests that need no shards and for the
  data-free side of `lvd bench train`.

Both deal batches to ranks the same way (rank r of W takes batches c + r, c + r + W, ... of the plan, c
being what was consumed), and their state (epoch, consumed) is global: it is the same on every rank, so
rank 0's copy in a checkpoint restores any rank.

Letters: B batch, T frames, C channels, H x W pixels (or latent cells).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from training.stage_config import SyntheticDataConfig, TrainConfig

STATE_FORMAT = 1


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop reads: batch dicts (shards/loader.py's format) and a resumable state."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


COLOURS = ("red", "green", "blue", "yellow", "white", "purple", "orange", "cyan")


class SyntheticBatches:
    """Endless (or `epochs`-long) batches of a small fixed dataset held in memory. Sample i is a square of
    colour i moving at its own speed; its caption says so. See SyntheticDataConfig."""

    def __init__(self, config: SyntheticDataConfig, rank: int = 0, world_size: int = 1,
                 latent_channels: int = 4, downsample: int = 4) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0
        c = config
        n, t, h, w = c.num_samples, c.num_frames, c.height, c.width
        rng = np.random.default_rng(c.seed)
        self.speeds = rng.uniform(1.0, 4.0, n) * rng.choice([-1.0, 1.0], n)
        if c.kind == "frames":
            self.frames_NTCHW = torch.from_numpy(np.stack([self._clip(i, t, h, w) for i in range(n)])).permute(0, 1, 4, 2, 3).contiguous()
        else:
            g = torch.Generator().manual_seed(c.seed)
            self.latents_NTCHW = torch.randn(n, t, latent_channels, h // downsample, w // downsample, generator=g)
        self.captions = [f"a {COLOURS[i % len(COLOURS)]} square moves {'right' if self.speeds[i] > 0 else 'left'}"
                         for i in range(n)]
        # motion bucket grows with speed, as curation's does with the motion score
        self.motion_bucket = np.clip(np.abs(self.speeds) * 50, 0, 255).astype(np.float32)
        self.batches_per_epoch = n // c.batch_size

    def _clip(self, i: int, t: int, h: int, w: int) -> np.ndarray:
        """T x H x W x 3 uint8: a square of side h/3 moving horizontally over a two-tone background."""
        side = max(2, h // 3)
        frames = np.empty((t, h, w, 3), np.uint8)
        bg = np.array([(i * 53) % 200 + 30, 90, 140], np.uint8)
        colour = np.array([[255, 40, 40], [40, 220, 40], [40, 40, 255], [240, 240, 40],
                           [250, 250, 250], [170, 40, 200], [250, 150, 30], [40, 220, 220]][i % 8], np.uint8)
        for j in range(t):
            frames[j] = bg
            frames[j, h // 2:, :] = bg // 2
            x = int(round(w / 2 - side / 2 + self.speeds[i] * j * w / 16)) % w
            y = (h - side) // 2
            cols = (np.arange(side) + x) % w
            frames[j, y:y + side][:, cols] = colour
        return frames

    # ---- the plan: epoch e is a seeded permutation cut into batches; batch j is an image batch or not

    def _batch(self, epoch: int, j: int) -> dict[str, Any]:
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        perm = rng.permutation(c.num_samples)
        image_flags = rng.random(self.batches_per_epoch) < c.image_ratio
        idx = perm[j * c.batch_size:(j + 1) * c.batch_size]
        is_image = bool(image_flags[j])
        b = len(idx)
        batch: dict[str, Any] = {"key": [f"synthetic-{i:04d}" for i in idx], "caption": [self.captions[i] for i in idx],
                                 "fps_B": torch.full((b,), 0.0 if is_image else c.fps),
                                 "motion_bucket_B": torch.from_numpy(self.motion_bucket[idx]),
                                 "is_image_B": torch.full((b,), is_image), "epoch": epoch, "batch_index": j,
                                 "num_corrupt": 0}
        if c.kind == "frames":
            frames = self.frames_NTCHW[torch.from_numpy(idx)]
            batch.update(kind="image" if is_image else "video", frames_BTCHW=frames[:, :1] if is_image else frames)
        else:
            latents = self.latents_NTCHW[torch.from_numpy(idx)]
            batch.update(kind="latents", latents_BTCHW=latents[:, :1] if is_image else latents)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        c, w = self.config, self.world_size
        while c.epochs is None or self.epoch < c.epochs:
            m = self.batches_per_epoch
            last_epoch = c.epochs is not None and self.epoch == c.epochs - 1
            while self.consumed < m:
                j = self.consumed + self.rank
                if j >= m:
                    if last_epoch:  # this rank's share of the final step is past the end: it is done
                        return
                    break           # earlier epochs drop the leftover batches, as the shard loader's "drop"
                batch = self._batch(self.epoch, j)
                self.consumed += w
                batch["state"] = self.state_dict()
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "source": "synthetic", "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") != "synthetic" or state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state {state} is not a synthetic-batches state of format {STATE_FORMAT}; "
                             "resume with the data source the checkpoint was saved with")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


PLAN_DIR = "plan"


class PlanError(RuntimeError):
    """The stage's plan could not be made or found: data settings that select nothing, a plan of other data
    under a resumed run, rank 0's failure or a timeout while waiting for it. The message says what to do."""


def plan_epochs(config: TrainConfig, world_size: int) -> Callable[[int], int]:
    """Epochs a stage's plan must hold, given its batches per epoch: enough for every step on `world_size` ranks,
    with a margin for the epoch a resumed run (on another number of ranks) is in the middle of; no more than
    data.shards.epochs."""
    loader = config.data.shards
    assert loader is not None
    micro_batches = config.steps * config.deepspeed.gradient_accumulation_steps

    def epochs(batches: int) -> int:
        per_rank = batches // world_size if loader.remainder == "drop" else -(-batches // world_size)
        needed = -(-micro_batches // max(1, per_rank)) + 2
        return needed if loader.epochs is None else min(loader.epochs, needed)

    return epochs


def stage_plan(config: TrainConfig, rank: int, world_size: int, waited_for: bool = True) -> str:
    """The folder of the stage's plan (OUTPUT/plan), once it is there: built once, by rank 0 (or reused, when
    `lvd train` wrote it before the ranks started, or the run resumes), while the other ranks wait for it.
    `waited_for`: other ranks wait, so rank 0 leaves a failure marker for them when it cannot write it."""
    from shards.manifest import Manifest
    from shards.plan_file import ensure_plan, plan_failed, wait_for_plan
    from training.checkpoint import LATEST

    loader = config.data.shards
    assert loader is not None
    out = Path(config.output) / PLAN_DIR
    try:
        manifest = Manifest.load(loader.shards)  # (its shard list: the plan's source is the shards' fingerprint)
        epochs = plan_epochs(config, world_size)
        if rank != 0:
            wait_for_plan(manifest, loader, out, epochs, config.data.plan_timeout_s)
            return str(out)
        try:
            ensure_plan(manifest, loader, out, epochs, keep=(Path(config.output) / "checkpoints" / LATEST).is_file())
        except Exception as e:
            if waited_for:
                plan_failed(manifest, loader, out, str(e))
            raise
    except (ValueError, FileNotFoundError, TimeoutError) as e:
        raise PlanError(str(e)) from None
    return str(out)


def make_batch_source(config: TrainConfig, rank: int, world_size: int, latent_channels: int,
                      downsample: int) -> BatchSource:
    data = config.data
    if data.source == "synthetic":
        return SyntheticBatches(data.synthetic, rank, world_size, latent_channels, downsample)
    from shards.loader import ShardLoader

    assert data.shards is not None  # DataConfig checks it
    return ShardLoader(data.shards, rank=rank, world_size=world_size, plan=stage_plan(config, rank, world_size))
