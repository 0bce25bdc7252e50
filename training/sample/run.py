"""`lvd sample`'s work: load (or randomly build) a model, sample clips from a prompt and image
instructions, write an mp4, a contact sheet and the run's config next to them."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from training.model.config import DiffusionConfig
from training.model.export import load_pretrained
from training.sample.media import load_image, to_uint8, write_contact_sheet, write_mp4
from training.model.network import LatentVideoDiffusion
from training.model.sampler import join_clips, sample_long


@dataclass
class SampleRequest:
    prompt: str
    out: Path
    first_frame: Path | None = None
    last_frame: Path | None = None
    num_frames: int | None = None
    """Frames per clip; None: the model's unet.num_frames."""
    num_clips: int = 1
    seed: int = 0
    size: tuple[int, int] | None = None
    """Height, width in pixels; None: the model's frame_size."""
    device: str = "cpu"


@dataclass
class SampleResult:
    video: Path
    contact_sheet: Path
    run_dir: Path
    num_frames: int
    seconds: float


def load_model(config: DiffusionConfig, model_dir: Path | None, model_config_given: bool, seed: int) -> LatentVideoDiffusion:
    if model_dir is not None:
        return load_pretrained(model_dir, config=config.model if model_config_given else None)
    torch.manual_seed(seed)  # a random model is part of what the seed reproduces
    return LatentVideoDiffusion.build(config.model)


@torch.no_grad()
def run_sample(config: DiffusionConfig, request: SampleRequest, model: LatentVideoDiffusion) -> SampleResult:
    start = time.perf_counter()
    model = model.to(request.device).eval()
    mc = model.config
    height, width = request.size or mc.frame_size
    m = mc.pixel_multiple
    if height % m or width % m:
        raise ValueError(f"size {height}x{width} must be multiples of {m} for this model; e.g. "
                         f"{height // m * m or m}x{width // m * m or m}")
    num_frames = request.num_frames or mc.unet.num_frames
    if request.last_frame is not None and num_frames < 2:
        raise ValueError("a last-frame instruction needs --num-frames of at least 2")

    dev = torch.device(request.device)
    if request.prompt:
        text = model.encode_text([request.prompt])
    else:  # no prompt is the condition training gives dropped captions: zeros, not the empty string's tokens
        text = torch.zeros(1, mc.text.context_length, mc.unet.cross_attention_dim, device=dev)

    def latent_of(path: Path | None) -> torch.Tensor | None:
        if path is None:
            return None
        frame = load_image(path, height, width).to(dev)
        return model.encode_frames(frame[None, None])[:, 0]

    first, last = latent_of(request.first_frame), latent_of(request.last_frame)
    down = mc.vae.downsample
    generator = torch.Generator(dev).manual_seed(request.seed)
    # one step per network evaluation of the ODE, as diffusers pipelines count them (TQDM_DISABLE=1 or -q: none)
    bar = tqdm(total=request.num_clips * config.sampler.num_steps, unit="step", desc="sample", file=sys.stderr)
    clips = sample_long(model.denoise, text, first, last, num_frames, request.num_clips, (height // down, width // down),
                        config.sampler, mc.latent_channels, model.scaling_factor, generator, on_step=bar.update)
    bar.close()
    frames = join_clips([model.decode_latents(c, chunk_frames=14) for c in clips])[0]

    out = Path(request.out)
    pixels = to_uint8(frames)
    write_mp4(out, pixels, fps=config.sampler.fps)
    title = [f"prompt: {request.prompt or '(none: unconditional)'}",
             f"seed {request.seed} | {config.sampler.num_steps} steps | cfg {config.sampler.cfg_scale:g} | "
             f"{height}x{width} | {request.num_clips} clip(s) of {num_frames} frames | {config.sampler.fps} fps"]
    sheet = write_contact_sheet(out.with_name(out.stem + "_sheet.png"), pixels, columns=num_frames, title=title)
    from common.runinfo import write_run_info

    run_dir = out.with_name(out.stem + "_run")
    write_run_info(run_dir, config, "sample", {
        "prompt": request.prompt, "first_frame": str(request.first_frame) if request.first_frame else None,
        "last_frame": str(request.last_frame) if request.last_frame else None, "num_frames": num_frames,
        "num_clips": request.num_clips, "seed": request.seed, "size": [height, width], "device": request.device,
        "model_config": mc.model_dump(mode="json")})
    return SampleResult(out, sheet, run_dir, len(pixels), time.perf_counter() - start)
