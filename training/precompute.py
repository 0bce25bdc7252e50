"""Precomputing latents and text states into shards, so training skips decoding and encoding.

    lvd precompute SHARDS OUT --model runs/svd/stage1_image --set num_frames=14 --set fps=7 --set workers=8

Each sample's clip is decoded as the training loader would (the first `num_frames` frames at `fps`, resized and
centre-cropped to the nearest resolution bucket), encoded with the model's VAE (the mean of its posterior,
scaled: what the diffusion trains on), and one of its captions (drawn by weight, seeded) is encoded by the
frozen text tower (token states before the trainable projection). The work is split over Ray tasks (GPUs
when asked); then the shard writer copies every sample into OUT with `latents.safetensors` and
`text.safetensors` added, without re-encoding anything else. The training loader (latents: auto) then
reads latents where they exist and decodes the rest; training accepts both in one run.

The latents belong to the VAE that made them: precompute with the VAE of the model being trained (the
stage's init_from), and again if that VAE ever changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydantic

from common.config import Config
from common.local_ray import local_ray


class PrecomputeConfig(Config):
    shards: str
    """The source shard folder (or fsspec URL)."""
    output: str
    """The new shard folder: the same samples with latents.safetensors and text.safetensors added."""
    model: str
    """A diffusers-format folder (an lvd export, a stage's output, an SVD folder) whose VAE and text tower encode."""
    query: str | None = None
    """Which samples get latents (all others are copied as they are). None: all (or `keep` on all-usable shards)."""
    num_frames: int = 14
    fps: float = 7.0
    resolutions: list[tuple[int, int]] = [(320, 576), (576, 320), (448, 448)]
    text: bool = True
    """Also precompute the text tower's token states of one caption per clip."""
    batch_size: int = 8
    workers: int = 0
    """Ray tasks encoding in parallel; 0: encode in this process (no Ray)."""
    num_gpus: float = 0.0
    """GPUs per Ray task."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> PrecomputeConfig:
        if self.num_frames < 1 or self.fps <= 0 or self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"num_frames ({self.num_frames}), fps ({self.fps}) and batch_size ({self.batch_size}) must "
                             f"be positive and workers ({self.workers}) >= 0")
        return self

    def loader_config(self):
        from shards.config import LoaderConfig

        # One pass over the subset, in order, every sample exactly once (uneven: a rank may have a short batch).
        return LoaderConfig(shards=self.shards, query=self.query, batch_size=self.batch_size,
                            num_frames=[self.num_frames], fps=self.fps, resolutions=self.resolutions,
                            clip_start="start", shuffle=False, epochs=1, remainder="uneven", latents="ignore",
                            image_ratio=0.0, num_workers=0, seed=self.seed)


@dataclass
class PrecomputeSummary:
    output: str
    num_encoded: int
    num_samples: int
    seconds: float

    def lines(self) -> list[str]:
        return [f"{self.num_encoded} of {self.num_samples} samples got precomputed latents in {self.seconds:.1f}s; "
                f"shards with them in {self.output}"]


def _device(config: PrecomputeConfig):
    import torch

    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def encode_part(config: PrecomputeConfig, part: int, num_parts: int, out_dir: str) -> int:
    """Encodes part `part` of `num_parts` of the subset; writes KEY.latents.safetensors (and .text) into out_dir."""
    import torch
    from safetensors.torch import save

    from shards.loader import ShardLoader
    from training.export import load_pretrained

    dev = _device(config)
    model = load_pretrained(config.model, allow_random_text=not config.text)
    del model.unet  # only the VAE and the text tower work here
    model.vae.to(dev).eval()
    model.text_encoder.to(dev).eval()
    loader = ShardLoader(config.loader_config(), rank=part, world_size=num_parts)
    count = 0
    with torch.no_grad():
        for batch in loader:
            if batch["kind"] != "video":
                continue
            frames = batch["frames_BTCHW"].to(dev).float() / 127.5 - 1.0
            latents = model.encode_frames(frames).float().cpu()
            states = None
            if config.text:
                tower = model.text_encoder
                _, states = tower.tower(tower.tokenizer(list(batch["caption"])).to(dev))
                states = states.float().cpu()
            for i, key in enumerate(batch["key"]):
                files = {"latents.safetensors": save({"latents": latents[i].contiguous()})}
                if states is not None and batch["caption"][i]:
                    files["text.safetensors"] = save({"text": states[i].contiguous()})
                for ext, data in files.items():
                    tmp = Path(out_dir) / f".{key}.{ext}.tmp"
                    tmp.write_bytes(data)
                    os.replace(tmp, Path(out_dir) / f"{key}.{ext}")
                count += 1
    return count


def precompute(config: PrecomputeConfig, address: str | None = None) -> PrecomputeSummary:
    from shards.manifest import Manifest
    from shards.writer import rewrite_shards

    start = time.perf_counter()
    source = Manifest.load(config.shards)
    work = Path(tempfile.mkdtemp(prefix="lvd-precompute-", dir=Path(config.output).parent
                                 if Path(config.output).parent.exists() else None))
    try:
        if config.workers == 0:
            encoded = encode_part(config, 0, 1, str(work))
        else:
            encoded = _encode_on_ray(config, str(work), address)

        def add_files(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for ext in ("latents.safetensors", "text.safetensors"):
                path = work / f"{key}.{ext}"
                if path.is_file():
                    out[ext] = path.read_bytes()
            return out

        summary = rewrite_shards(source, None, config.output, add_files=add_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrecomputeSummary(str(config.output), encoded, summary.num_samples, time.perf_counter() - start)


def _encode_on_ray(config: PrecomputeConfig, work: str, address: str | None) -> int:
    import ray

    with ExitStack() as started:  # shuts down the Ray this call started
        if not ray.is_initialized():
            if address:
                ray.init(address=address, logging_level="WARNING")
                started.callback(ray.shutdown)
            else:
                started.enter_context(local_ray(num_cpus=max(config.workers, 1), include_dashboard=False,
                                                logging_level="WARNING"))
        task = ray.remote(num_cpus=1, num_gpus=config.num_gpus)(encode_part)
        # the work folder must be storage every task sees (here: local Ray, or a shared file system)
        return sum(ray.get([task.remote(config, k, config.workers, work) for k in range(config.workers)]))

