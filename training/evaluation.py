"""Held-out evaluation during training: the denoising loss of fixed clips at fixed noise levels.

Every `eval.every` steps (and at the end) each held-out clip is noised at each of `eval.sigmas` with noise
seeded by (eval.seed, the clip's key, the sigma's index), so two runs, two steps or two calibration arms see
exactly the same noisy inputs and their losses compare directly, however the clips are batched. The
conditions are fixed too: the clip's highest-weight caption (no dropout), its first frame as the image
instruction without noise augmentation (SVD's image-to-video task), no last-frame instruction. The weights
evaluated are the ones training (not the EMA). The loss at a sigma is EDM's weighted loss (the unit-weight
regression of the network onto its target), so the values of different sigmas are on one scale and their
mean is the summary `eval_loss`.

Ranks split the held-out batches (remainder=uneven); a rank with fewer batches repeats one with weight 0 so
every rank runs the same number of forwards (ZeRO-3 gathers weights collectively in each).

Letters: B batch, T frames, C latent channels, H x W latent cells.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import torch

from common.config import Config

DEFAULT_SIGMAS = [0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 15.0]


class EvalConfig(Config):
    """The held-out set and the noise levels of the validation denoising loss."""

    query: str | None = None
    """The held-out clips as a query over the training shards' manifest (see shards/query.py)."""
    subset: str | None = None
    """... or as a key list (`lvd shards query --out`; `lvd calibrate` writes one). Neither: no evaluation.
    Keep these clips out of the training subset (data.shards.query / subset)."""
    every: int = 0
    """Evaluate every this many steps too (0: at the end only)."""
    sigmas: list[float] = DEFAULT_SIGMAS
    """Noise levels (EDM sigmas) the loss is measured at; the default spans SVD's training distribution."""
    seed: int = 0
    """Seeds the noise of each (clip, sigma): change it and every arm of a calibration sees other noise."""
    batch_size: int | None = None
    """Held-out clips per forward (default: the training batch size)."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.query is not None and self.subset is not None:
            raise ValueError("eval: set either query or subset, not both")
        if not self.sigmas or any(not (math.isfinite(s) and s > 0) for s in self.sigmas):
            raise ValueError(f"eval.sigmas ({self.sigmas}) must list positive noise levels, e.g. [0.2, 1.0, 5.0]")
        if self.every < 0:
            raise ValueError(f"eval.every ({self.every}) must be >= 0 (0: evaluate at the end only)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"eval.batch_size ({self.batch_size}) must be at least 1, or null for the training one")
        return self

    @property
    def enabled(self) -> bool:
        return self.query is not None or self.subset is not None


def sigma_key(sigma: float) -> str:
    return f"eval_loss_sigma_{sigma:g}"


def sample_seed(seed: int, key: str, sigma_index: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode()), sigma_index]).generate_state(1, np.uint64)[0]
               % (2**63 - 1))


def heldout_loader_config(train_loader, config: EvalConfig):
    """The training loader's settings (shards, frames, fps, resolutions) on the held-out clips, each once, in
    manifest order, from the start of the clip, video batches only."""
    return train_loader.model_copy(update={
        "query": config.query, "subset": config.subset, "shuffle": False, "epochs": 1, "remainder": "uneven",
        "image_ratio": 0.0, "clip_start": "start", "num_workers": 0,
        "batch_size": config.batch_size or train_loader.batch_size})


class HeldOutEval:
    """Measures the held-out loss of the model being trained; every rank calls `run` at the same steps."""

    def __init__(self, config: EvalConfig, loader_config, encoders, module, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.config = config
        self.loader_config = heldout_loader_config(loader_config, config)
        self.encoders, self.module = encoders, module
        self.rank, self.world_size, self.device = rank, world_size, device
        self.captions: FixedCaptions | None = None

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """{"eval_loss": mean over sigmas, "eval_samples": N, "eval_loss_sigma_S": mean over clips at S}.
        Batches stream from the shards (the held-out set is never held in memory whole)."""
        import torch.distributed as dist

        from shards.loader import ShardLoader

        loader = ShardLoader(self.loader_config, rank=self.rank, world_size=self.world_size)
        count = torch.tensor([loader.batches_per_epoch()], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        if int(count) == 0:
            raise ValueError(f"the held-out set ({self.config.query or self.config.subset}) selects no clips; "
                             "check eval.query / eval.subset")
        sigmas = self.config.sigmas
        sums = torch.zeros(len(sigmas) + 1, dtype=torch.float64, device=self.device)  # per sigma, then the count
        batches = iter(loader)
        last = None
        was_training = self.module.training
        self.module.eval()
        try:
            for _ in range(int(count)):
                batch, weight = next(batches, None), 1.0
                if batch is None:  # this rank has fewer held-out batches: repeat one, not counted
                    batch, weight = last or next(iter(ShardLoader(self.loader_config, rank=0, world_size=1))), 0.0
                last = batch
                losses_SB = self._losses(batch)
                sums[:-1] += weight * losses_SB.sum(1).double()
                sums[-1] += weight * losses_SB.shape[1]
        finally:
            self.module.train(was_training)
        if self.world_size > 1:
            dist.all_reduce(sums)
        n = float(sums[-1])
        per_sigma = (sums[:-1] / n).tolist()
        out = {"eval_loss": float(np.mean(per_sigma)), "eval_samples": int(n)}
        out.update({sigma_key(s): v for s, v in zip(sigmas, per_sigma)})
        return out

    def _losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """S x B: each clip's weighted loss at each sigma."""
        from training.model import edm
        from training.model.conditioning import Conditions, added_time_ids, instruction_latents, instructions_tensor

        model = self.module.full_model
        # the loader draws one of a clip's captions per batch slot; the evaluation wants the same one always
        if self.captions is None:
            self.captions = FixedCaptions(self.loader_config)
        batch = {**batch, "caption": self.captions(list(batch["key"]))}
        inputs = self.encoders(batch)
        x0 = inputs.latents_BTCHW
        b, t = x0.shape[:2]
        text = self.module.project_text(inputs.text_states_BLW, inputs.has_text_B)
        first = instruction_latents(x0[:, 0], model.scaling_factor)
        cond = Conditions(text_BLD=text, c_image_BTCHW=instructions_tensor(first, None, t),
                          added_time_ids_B3=added_time_ids(inputs.fps_B, inputs.motion_bucket_B,
                                                           torch.zeros(b, device=x0.device)).to(x0.device),
                          image_only_B=inputs.is_image_B)
        keys = list(batch["key"])
        out = []
        for j, sigma in enumerate(self.config.sigmas):
            noise = torch.stack([
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(sample_seed(self.config.seed, k, j)))
                for k in keys]).to(x0.device, x0.dtype)
            sigma_B = torch.full((b,), float(sigma), device=x0.device)
            denoised = model.denoise(x0 + sigma * noise, sigma_B, cond)
            out.append(edm.weighted_loss(denoised.float(), x0.float(), sigma_B, model.config.precondition))
        return torch.stack(out)


class FixedCaptions:
    """key -> the clip's caption of highest weight (the first of equals), for the held-out clips only: their rows
    of the manifest, read once with the key and captions columns."""

    def __init__(self, loader_config) -> None:
        from shards.manifest import Manifest
        from shards.plan import subset_rows

        manifest = Manifest.load(loader_config.shards)
        self.captions = None
        if "captions" in manifest.schema.names:
            held = manifest.take(subset_rows(manifest, loader_config), ["key", "captions"]).to_pandas()
            self.index = pd.Index(held["key"])
            self.captions = held["captions"]

    def __call__(self, keys: list[str]) -> list[str]:
        if self.captions is None:
            return [""] * len(keys)
        out = []
        for pos in self.index.get_indexer(keys):
            caps = list(self.captions.iloc[pos]) if pos >= 0 and self.captions.iloc[pos] is not None else []
            best = max(range(len(caps)), key=lambda i: (float(caps[i].get("weight") or 0.0), -i)) if caps else None
            out.append(str(caps[best].get("text") or "") if best is not None else "")
        return out


def write_eval(path: Path, step: int, values: dict[str, float], config: EvalConfig) -> None:
    """OUT/eval.json: the last evaluation, with what it was measured on (calibration reads it)."""
    record = {"step": step, **values, "sigmas": config.sigmas, "seed": config.seed,
              "heldout": config.subset or config.query}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
