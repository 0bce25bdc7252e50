"""What the UNet is conditioned on besides the noisy latents, and how training randomises it.

- Image instructions (PixelDance): c_image = [f_first, 0, ..., 0, f_last] in latent space, concatenated to
  the noisy latents on the channel axis. In training the last-frame instruction is picked at random from
  the clip's last `last_frame_window` frames (so the model treats it as guidance, not as a frame to copy),
  perturbed with noise, and dropped with probability `eta`; the first frame is dropped with
  `first_drop_prob`, so image-to-video (first only) and text-to-video (none) come from the same weights.
- Text: token states; dropped (zeros, as SVD's unconditional embedding) with `text_drop_prob` for
  classifier-free guidance.
- Micro-conditioning (SVD): (fps - 1, motion bucket, conditioning-noise level) through added time ids.

Image batches (1-frame videos, or frames flagged image-only) get no instructions: an image instruction
on a one-frame sample would be the answer itself.

Shapes: B batch, T frames, C latent channels, H x W latent size, L text tokens, D text width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pydantic
import torch

from common.config import Config


class ConditioningConfig(Config):
    """Randomisation of the conditions during training (PixelDance instructions, CFG dropout, SVD's noise aug)."""

    last_frame_window: int = 3
    """The last-frame instruction is one of the clip's last this-many frames (PixelDance: 3)."""
    eta: float = 0.25
    """Probability of dropping the last-frame instruction (PixelDance's eta)."""
    first_drop_prob: float = 0.1
    """Probability of dropping the first-frame instruction, which trains text-only generation."""
    text_drop_prob: float = 0.15
    """Probability of dropping the text, for classifier-free guidance."""
    cond_noise_p_mean: float = -3.0
    cond_noise_p_std: float = 0.5
    """The instructions are perturbed with Gaussian noise of std sigma_c, ln(sigma_c) ~ N(mean, std^2)
    (SVD's conditioning augmentation: a median of 0.05); sigma_c is also a micro-condition."""

    @pydantic.field_validator("eta", "first_drop_prob", "text_drop_prob")
    @classmethod
    def _probability(cls, v: float, info: pydantic.ValidationInfo) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{info.field_name} ({v}) is a probability; use a value in [0, 1]")
        return v

    @pydantic.field_validator("last_frame_window")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"last_frame_window ({v}) must be at least 1 (1 = always the true last frame)")
        return v


@dataclass
class Conditions:
    """Everything the UNet sees besides the noisy latents, for one batch."""

    text_BLD: torch.Tensor
    """Token states already projected to the UNet's cross-attention width (zeros = no text)."""
    c_image_BTCHW: torch.Tensor
    """Image instructions in SVD's convention: unscaled VAE latents (see `instruction_latents`)."""
    added_time_ids_B3: torch.Tensor
    """(fps - 1, motion bucket, conditioning-noise level) per sample."""
    image_only_B: torch.Tensor
    """True: the sample is an image (or a stack of independent images): temporal mixing is switched off."""

    def without_text(self) -> Conditions:
        return replace(self, text_BLD=torch.zeros_like(self.text_BLD))

    def without_images(self) -> Conditions:
        return replace(self, c_image_BTCHW=torch.zeros_like(self.c_image_BTCHW))

    def without_last_frame(self) -> Conditions:
        if self.c_image_BTCHW.shape[1] < 2:  # a 1-frame sample's only slot is the first frame
            return self
        c = self.c_image_BTCHW.clone()
        c[:, -1] = 0
        return replace(self, c_image_BTCHW=c)

    def cat(self, other: Conditions) -> Conditions:
        """Both batches in one (the conditional and unconditional halves of a guided step)."""
        return Conditions(*(torch.cat([a, b]) for a, b in zip(
            (self.text_BLD, self.c_image_BTCHW, self.added_time_ids_B3, self.image_only_B),
            (other.text_BLD, other.c_image_BTCHW, other.added_time_ids_B3, other.image_only_B))))


def added_time_ids(fps_B: torch.Tensor, motion_bucket_B: torch.Tensor, noise_level_B: torch.Tensor) -> torch.Tensor:
    """SVD's micro-conditioning, shape B x 3. SVD was trained on fps - 1 (its pipeline subtracts 1 too), so
    the id is fps - 1; the motion bucket is curation's `motion_bucket` (0..255)."""
    return torch.stack([fps_B.float() - 1.0, motion_bucket_B.float(), noise_level_B.float()], dim=1)


def instruction_latents(latents_BCHW: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Scaled latents -> the units c_image uses. SVD concatenates `vae.encode(image).mode()` *without* the
    scaling factor, and its UNet's first conv learned that scale, so instructions are unscaled here too."""
    return latents_BCHW / scaling_factor


def instructions_tensor(first_BCHW: torch.Tensor | None, last_BCHW: torch.Tensor | None, num_frames: int,
                        like_BCHW: torch.Tensor | None = None) -> torch.Tensor:
    """c_image = [first, 0, ..., 0, last] (B T C H W); a missing instruction is zeros. For num_frames == 1
    only the first slot exists and a last-frame instruction is an error."""
    ref = first_BCHW if first_BCHW is not None else last_BCHW if last_BCHW is not None else like_BCHW
    if ref is None:
        raise ValueError("instructions_tensor needs a first or last frame, or like_BCHW for the shape")
    if num_frames == 1 and last_BCHW is not None:
        raise ValueError("a 1-frame sample has no last-frame slot; pass only a first frame (or use num_frames >= 2)")
    c = ref.new_zeros(ref.shape[0], num_frames, *ref.shape[1:])
    if first_BCHW is not None:
        c[:, 0] = first_BCHW
    if last_BCHW is not None:
        c[:, -1] = last_BCHW
    return c


@dataclass
class TrainingInstructions:
    """The randomised image instructions of one training batch, and what was drawn (for logging and tests)."""

    c_image_BTCHW: torch.Tensor
    noise_level_B: torch.Tensor
    kept_first_B: torch.Tensor
    kept_last_B: torch.Tensor
    last_index_B: torch.Tensor
    """Which frame of the clip became the last-frame instruction."""


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, normal: bool = False):
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gen_device).to(device)


def training_instructions(latents_BTCHW: torch.Tensor, is_image_B: torch.Tensor, config: ConditioningConfig,
                          scaling_factor: float, generator: torch.Generator | None = None) -> TrainingInstructions:
    """PixelDance's instructions for a training batch of (scaled) clip latents."""
    b, t = latents_BTCHW.shape[:2]
    dev = latents_BTCHW.device
    window = min(config.last_frame_window, t)
    last_index = t - 1 - (_rand((b,), generator, dev) * window).long().clamp(max=window - 1)
    noise_level = (config.cond_noise_p_mean + config.cond_noise_p_std * _rand((b,), generator, dev, normal=True)).exp()
    video = ~is_image_B.bool()
    keep_first = (_rand((b,), generator, dev) >= config.first_drop_prob) & video
    keep_last = (_rand((b,), generator, dev) >= config.eta) & video & (t > 1)
    noise_level = torch.where(video, noise_level, torch.zeros_like(noise_level))

    batch = torch.arange(b, device=dev)
    first = latents_BTCHW[:, 0]
    last = latents_BTCHW[batch, last_index]
    sigma_c = noise_level.view(b, 1, 1, 1)
    first = (first + sigma_c * _rand(tuple(first.shape), generator, dev, normal=True)) * keep_first.view(b, 1, 1, 1)
    last = (last + sigma_c * _rand(tuple(last.shape), generator, dev, normal=True)) * keep_last.view(b, 1, 1, 1)
    c_image = instructions_tensor(instruction_latents(first, scaling_factor),
                                  instruction_latents(last, scaling_factor) if t > 1 else None, t)
    return TrainingInstructions(c_image_BTCHW=c_image, noise_level_B=noise_level, kept_first_B=keep_first,
                                kept_last_B=keep_last, last_index_B=last_index)


def text_keep_mask(batch_size: int, config: ConditioningConfig, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """True where a sample keeps its text (dropped ones get zeros, the unconditional text)."""
    return _rand((batch_size,), generator, device) >= config.text_drop_prob

