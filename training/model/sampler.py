"""Sampling: EDM's Euler (optionally Heun) ODE solver, classifier-free guidance with SVD's per-frame scale,
PixelDance's tau schedule for the last-frame instruction, and autoregressive long videos.

The solver only sees a denoiser `D(x, sigma_B, step)`, so the maths is tested against an analytic denoiser
(Gaussian data) with no network involved; `GuidedDenoiser` turns the model (or any `DenoiseFn`) into one.

Shapes: B batch, T frames, C latent channels, H x W latent size, L text tokens, D text width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import torch

from common.config import Config
from training.model import edm
from training.model.conditioning import Conditions, added_time_ids, instruction_latents, instructions_tensor

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor]
"""(noisy_BTCHW, sigma_B, conditions) -> denoised_BTCHW, e.g. a bound `model.denoise` with its EDM config."""
StepDenoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(x_BTCHW, sigma_B, step index) -> denoised_BTCHW: what the ODE solver calls."""


class SamplerConfig(Config):
    """How a clip is sampled. Defaults follow SVD's pipeline where SVD has the setting."""

    num_steps: int = 25
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    heun: bool = False
    """Heun's second-order correction (EDM's sampler; two network calls per step) instead of plain Euler."""
    cfg_scale: float = 3.0
    """Classifier-free guidance at the last frame (SVD: max_guidance_scale)."""
    cfg_min_scale: float = 1.0
    """Guidance at the first frame; the scale rises linearly across frames (SVD: min_guidance_scale). Frames
    near the first-frame instruction need little guidance; set equal to cfg_scale for a constant scale."""
    guidance: Literal["text", "all"] = "text"
    """What the unconditional branch drops: text only (instructions kept; guidance towards the prompt), or
    text and image instructions (SVD's image-to-video guidance)."""
    tau: float = 0.5
    """Fraction of the denoising steps that see the last-frame instruction (PixelDance's tau): it fixes the
    layout early and leaves the model free to finish the clip naturally."""
    noise_aug_strength: float = 0.02
    """Noise added to the instruction latents; also the conditioning-noise micro-condition (SVD: 0.02)."""
    fps: int = 7
    motion_bucket_id: int = 127

    @pydantic.field_validator("num_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"num_steps ({v}) must be at least 1; SVD uses 25")
        return v

    @pydantic.field_validator("tau")
    @classmethod
    def _tau(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"tau ({v}) is a fraction of the denoising steps; use a value in [0, 1]")
        return v

    @pydantic.field_validator("noise_aug_strength")
    @classmethod
    def _noise(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"noise_aug_strength ({v}) must be >= 0; SVD's default is 0.02")
        return v

    @pydantic.field_validator("motion_bucket_id")
    @classmethod
    def _bucket(cls, v: int) -> int:
        if not 0 <= v <= 255:
            raise ValueError(f"motion_bucket_id ({v}) must be in 0..255 (SVD's default is 127)")
        return v

    @pydantic.model_validator(mode="after")
    def _sigmas(self) -> SamplerConfig:
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"sigma_min ({self.sigma_min}) must be positive and below sigma_max ({self.sigma_max})")
        return self

    def sigmas(self) -> torch.Tensor:
        return edm.karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    def last_frame_steps(self) -> int:
        return round(self.tau * self.num_steps)

    def frame_scales(self, num_frames: int) -> torch.Tensor:
        return torch.linspace(self.cfg_min_scale, self.cfg_scale, num_frames)


def ode_sample(denoise: StepDenoiser, noise_BTCHW: torch.Tensor, sigmas: torch.Tensor,
               heun: bool = False, on_step: Callable[[], Any] | None = None) -> torch.Tensor:
    """Solves the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigmas[0] down to 0.

    `noise_BTCHW` is unit Gaussian noise; the start is sigmas[0] * noise (EDM). `on_step` is called after
    each step (a progress bar's update)."""
    x = noise_BTCHW * sigmas[0]
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s.expand(b), i)) / s
        x_next = x + (s_next - s) * d
        if heun and s_next > 0:
            d_next = (x_next - denoise(x_next, s_next.expand(b), i)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
        if on_step is not None:
            on_step()
    return x


class GuidedDenoiser:
    """Classifier-free guidance with one scale per frame, and the last-frame instruction for the first
    `last_frame_steps` steps only. Both branches run as one batch, as diffusers' pipelines do."""

    def __init__(self, denoise: DenoiseFn, cond: Conditions, uncond: Conditions | None,
                 scale_T: torch.Tensor, last_frame_steps: int):
        self.denoise = denoise
        self.cond, self.uncond = cond, uncond
        self.cond_late, self.uncond_late = cond.without_last_frame(), uncond.without_last_frame() if uncond else None
        self.scale = scale_T.view(1, -1, 1, 1, 1)
        self.last_frame_steps = last_frame_steps

    def __call__(self, x_BTCHW: torch.Tensor, sigma_B: torch.Tensor, step: int) -> torch.Tensor:
        early = step < self.last_frame_steps
        cond = self.cond if early else self.cond_late
        uncond = self.uncond if early else self.uncond_late
        if uncond is None:
            return self.denoise(x_BTCHW, sigma_B, cond)
        both = self.denoise(torch.cat([x_BTCHW, x_BTCHW]), torch.cat([sigma_B, sigma_B]), cond.cat(uncond))
        d_cond, d_uncond = both.chunk(2)
        # Guiding D or the network output F is the same thing: D is affine in F with shared coefficients.
        return d_uncond + self.scale.to(x_BTCHW.dtype) * (d_cond - d_uncond)


@dataclass
class ClipRequest:
    """One clip to sample: text states and the optional first / last frame latents (scaled)."""

    text_BLD: torch.Tensor
    first_BCHW: torch.Tensor | None
    last_BCHW: torch.Tensor | None
    num_frames: int
    latent_hw: tuple[int, int]


def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device, dtype)


def sample_clip(denoise: DenoiseFn, request: ClipRequest, config: SamplerConfig, latent_channels: int,
                scaling_factor: float, generator: torch.Generator | None = None,
                on_step: Callable[[], Any] | None = None) -> torch.Tensor:
    """Samples one clip's latents (B T C H W, scaled) from text and image instructions."""
    text = request.text_BLD
    b, dev, dtype = text.shape[0], text.device, torch.float32  # the ODE state stays float32 whatever the UNet runs in
    t, (h, w) = request.num_frames, request.latent_hw
    like = torch.zeros(b, latent_channels, h, w, device=dev, dtype=dtype)

    def perturbed(latent: torch.Tensor | None) -> torch.Tensor | None:
        if latent is None:
            return None
        noisy = latent + config.noise_aug_strength * _randn(latent.shape, generator, dev, latent.dtype)
        return instruction_latents(noisy, scaling_factor)

    c_image = instructions_tensor(perturbed(request.first_BCHW), perturbed(request.last_BCHW), t, like)
    full = torch.full((b,), 1.0, device=dev)
    ids = added_time_ids(full * config.fps, full * config.motion_bucket_id, full * config.noise_aug_strength)
    cond = Conditions(text, c_image, ids.to(dev), torch.zeros(b, dtype=torch.bool, device=dev))
    scales = config.frame_scales(t).to(dev)
    uncond = None
    if bool((scales != 1.0).any()):
        uncond = cond.without_text() if config.guidance == "text" else cond.without_text().without_images()
    guided = GuidedDenoiser(denoise, cond, uncond, scales, config.last_frame_steps())
    noise = _randn((b, t, latent_channels, h, w), generator, dev, dtype)
    return ode_sample(guided, noise, config.sigmas().to(dev), heun=config.heun, on_step=on_step)


def sample_long(denoise: DenoiseFn, text_BLD: torch.Tensor, first_BCHW: torch.Tensor | None,
                last_BCHW: torch.Tensor | None, num_frames: int, num_clips: int, latent_hw: tuple[int, int],
                config: SamplerConfig, latent_channels: int, scaling_factor: float,
                generator: torch.Generator | None = None, on_step: Callable[[], Any] | None = None) -> list[torch.Tensor]:
    """Autoregressive long video: each clip's last generated frame is the next clip's first-frame
    instruction. `last_BCHW` (where the video should end) guides the final clip. Returns the clips' latents;
    `join_clips` drops each later clip's first frame, which re-generates the previous clip's last frame."""
    if num_clips < 1:
        raise ValueError(f"num_clips ({num_clips}) must be at least 1")
    if num_clips > 1 and num_frames < 2:
        raise ValueError(f"num_frames ({num_frames}) must be at least 2 to extend a video clip by clip")
    clips: list[torch.Tensor] = []
    first = first_BCHW
    for k in range(num_clips):
        request = ClipRequest(text_BLD, first, last_BCHW if k == num_clips - 1 else None, num_frames, latent_hw)
        clip = sample_clip(denoise, request, config, latent_channels, scaling_factor, generator, on_step)
        clips.append(clip)
        first = clip[:, -1]
    return clips


def join_clips(clips: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates autoregressive clips on the frame axis, without the repeated first frames."""
    return torch.cat([clips[0], *(c[:, 1:] for c in clips[1:])], dim=1)
