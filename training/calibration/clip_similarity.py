"""CLIP text-video similarity of a proxy's samples: for each fixed prompt, one video sampled from text alone
(fixed seed), every frame embedded with an open_clip CLIP and compared with the prompt's embedding (cosine);
the arm's value is the mean over frames and prompts. Higher is better. It runs where the arm trained, with
the checkpoint loading of curation's clip stage (a local folder or file, or the Hugging Face cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import torch

from common.config import Config


class ClipSimilarityConfig(Config):
    """The CLIP and the fixed prompts of the text-video similarity metric."""

    checkpoint: str
    """open_clip weights, as curation's clip.checkpoint (never downloaded)."""
    model: str = "ViT-L-14-quickgelu"
    """open_clip architecture when `checkpoint` is a single weights file."""
    prompts: list[str]
    num_frames: int = 8
    size: tuple[int, int] = (256, 256)
    """Height, width of the samples (multiples of the model's pixel multiple)."""
    num_steps: int = 25
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> ClipSimilarityConfig:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("clip.prompts must list non-empty prompts, e.g. ['a dog runs on a beach']")
        if self.num_frames < 1 or self.num_steps < 1:
            raise ValueError(f"clip.num_frames ({self.num_frames}) and clip.num_steps ({self.num_steps}) must be >= 1")
        return self


@torch.no_grad()
def clip_similarity(model_dir: str | Path, config: ClipSimilarityConfig, sampler) -> float:
    """Mean cosine between the prompts and the frames the model at `model_dir` samples for them."""
    from curation.stages.clip_score import ClipScore, ClipScoreConfig
    from training.model.export import load_pretrained
    from training.sample.media import to_uint8
    from training.model.sampler import sample_long

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(model_dir).to(device).eval()
    mc = model.config
    h, w = config.size
    m = mc.pixel_multiple
    if h % m or w % m:
        raise ValueError(f"clip.size {h}x{w} must be multiples of {m} for this model")
    scorer = ClipScore(ClipScoreConfig(checkpoint=config.checkpoint, model=config.model, aesthetic_head=None,
                                       num_gpus=1.0 if device.type == "cuda" else 0.0))
    scorer.setup()
    texts = scorer.embed_texts(config.prompts)
    steps = sampler.model_copy(update={"num_steps": config.num_steps})
    sims = []
    for i, prompt in enumerate(config.prompts):
        generator = torch.Generator(device).manual_seed(config.seed + i)
        text = model.encode_text([prompt])
        clips = sample_long(model.denoise, text, None, None, config.num_frames, 1, (h // mc.vae.downsample,
                            w // mc.vae.downsample), steps, mc.latent_channels, model.scaling_factor, generator)
        frames = to_uint8(model.decode_latents(clips[0])[0])
        images = scorer.embed_images(list(frames))
        sims.append(float(np.mean(images @ texts[i])))
    return float(np.mean(sims))
