"""The diffusion maths, after Karras et al. 2022 (EDM), as SVD trains: preconditioning, noise levels, loss.

Data x0 is noised as x = x0 + sigma * n. The network F sees c_in * x and c_noise(sigma); the denoiser is
D(x; sigma) = c_skip * x + c_out * F. With

    c_skip = sd^2 / (sigma^2 + sd^2)    c_in = 1 / sqrt(sigma^2 + sd^2)    c_noise = ln(sigma) / 4
    c_out  = s * sigma * sd / sqrt(sigma^2 + sd^2)

(sd = sigma_data, the data's standard deviation) the network's input and its regression target have unit
variance at every sigma. `s` is the sign of c_out: SVD uses -1 (its "VScalingWithEDMcNoise", sd = 1),
which makes F's target the v of v-prediction; EDM's paper uses +1. A real SVD checkpoint needs -1.

Loss: lambda(sigma) * |D - x0|^2 with lambda = (sigma^2 + sd^2) / (sigma * sd)^2 = 1 / c_out^2, i.e. a plain
unit-weight regression of F onto its target. Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), per stage.

Shapes: B batch, T frames, C latent channels, H x W latent size; `sigma_B` is one noise level per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pydantic
import torch

from common.config import Config


class PreconditionConfig(Config):
    """How the network's input and output are scaled: part of the model (a checkpoint is trained with one)."""

    sigma_data: float = 1.0
    """Standard deviation of the (scaled) latents; SVD: 1.0."""
    parameterization: Literal["v", "edm"] = "v"
    """v: c_out < 0, SVD's convention (required to fine-tune an SVD checkpoint); edm: c_out > 0 (EDM paper)."""

    @pydantic.field_validator("sigma_data")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"sigma_data ({v}) must be a positive number; SVD uses 1.0")
        return v


class ObjectiveConfig(Config):
    """The training noise distribution of one stage."""

    p_mean: float = 0.7
    p_std: float = 1.6
    """ln(sigma) ~ N(p_mean, p_std^2). EDM's image default is (-1.2, 1.2); video models need more noise to
    destroy a clip's redundant frames, so SVD shifts it up. (0.7, 1.6) is what public SVD fine-tuning code
    uses; set per stage in the recipe."""

    @pydantic.field_validator("p_std")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"p_std ({v}) must be a positive number")
        return v


@dataclass(frozen=True)
class Preconditioning:
    """The four EDM coefficients for a batch of noise levels, each shaped to broadcast over B T C H W."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor  # per sample, shape B: the UNet's timestep input


def per_sample(sigma_B: torch.Tensor, ndim: int) -> torch.Tensor:
    """One value per sample, shaped to broadcast over a tensor with `ndim` axes."""
    return sigma_B.reshape(-1, *([1] * (ndim - 1)))


def precondition(sigma_B: torch.Tensor, config: PreconditionConfig, ndim: int = 5) -> Preconditioning:
    sd = config.sigma_data
    s = per_sample(sigma_B, ndim)
    norm = (s**2 + sd**2).sqrt()
    sign = -1.0 if config.parameterization == "v" else 1.0
    return Preconditioning(c_skip=sd**2 / norm**2, c_out=sign * s * sd / norm, c_in=1.0 / norm,
                           c_noise=0.25 * sigma_B.log())


def loss_weight(sigma_B: torch.Tensor, config: PreconditionConfig, ndim: int = 5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, broadcastable over B T C H W."""
    sd = config.sigma_data
    s = per_sample(sigma_B, ndim)
    return (s**2 + sd**2) / (s * sd) ** 2


def network_target(x0: torch.Tensor, noisy: torch.Tensor, sigma_B: torch.Tensor, config: PreconditionConfig) -> torch.Tensor:
    """What F must output for D to return x0 exactly: (x0 - c_skip x) / c_out (v in SVD's convention)."""
    p = precondition(sigma_B, config, x0.ndim)
    return (x0 - p.c_skip * noisy) / p.c_out


def weighted_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma_B: torch.Tensor, config: PreconditionConfig) -> torch.Tensor:
    """Per-sample loss lambda(sigma) * mean |D - x0|^2 over every axis but the batch; shape B."""
    err = loss_weight(sigma_B, config, x0.ndim) * (denoised - x0) ** 2
    return err.flatten(1).mean(1)


def sample_sigmas(num: int, config: ObjectiveConfig, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels, one per sample: log-normal with the stage's p_mean / p_std."""
    z = torch.randn(num, generator=generator, device=generator.device if generator is not None else device)
    return (config.p_mean + config.p_std * z).exp().to(device)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's sampling schedule, sigma_max down to sigma_min in `num_steps` levels, then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps ({num_steps}) must be at least 1")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
