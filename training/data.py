"""Where the training loop's batches come from. The loop asks for little: an iterable of batch dicts in the
shard loader's format (see shards/loader.py) with `state_dict()` / `load_state_dict()` for exact resume.

Two sources fit it:
- `ShardLoader` (shards/loader.py): the stage's subset of the manifest, decoded (or precomputed latents).
- `SyntheticBatches`: batches made in memory once at start-up; for tests that need no shards and for the
  data-free side of `lvd bench train`.

Both deal batches to ranks the same way (rank r of W takes batches c + r, c + r + W, ... of the plan, c
being what was consumed), and their state (epoch, consumed) is global: it is the same on every rank, so
rank 0's copy in a checkpoint restores any rank.

Letters: B batch, T frames, C channels, H x W pixels (or latent cells).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from training.train_config import DataConfig, SyntheticDataConfig

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


def make_batch_source(config: DataConfig, rank: int, world_size: int, latent_channels: int,
                      downsample: int) -> BatchSource:
    if config.source == "synthetic":
        return SyntheticBatches(config.synthetic, rank, world_size, latent_channels, downsample)
    from shards.loader import ShardLoader

    assert config.shards is not None  # DataConfig checks it
    return ShardLoader(config.shards, rank=rank, world_size=world_size)
