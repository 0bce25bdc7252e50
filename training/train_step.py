"""One training step's two halves: the frozen encoders that turn a loader batch into model inputs, and the
trainable module DeepSpeed wraps.

The split is what keeps the frozen VAE and text tower out of DeepSpeed: `DenoiserTrainModule` registers only
the UNet and the text projection, so ZeRO partitions (and the optimizer sees) only what can train, while
`FrozenEncoders` holds the VAE and the OpenCLIP tower as plain no-grad modules on the device.

Letters: B batch, T frames, C channels, H x W pixels or latent cells, L text tokens, W text tower width,
D the UNet's cross-attention width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.model.conditioning import ConditioningConfig
from training.model.edm import ObjectiveConfig
from training.model.network import LatentVideoDiffusion, TrainBatch


@dataclass
class StepInputs:
    """A batch in model space: scaled latents, text token states (before the trainable projection)."""

    latents_BTCHW: torch.Tensor
    text_states_BLW: torch.Tensor
    has_text_B: torch.Tensor
    """False where the sample has no caption: its text condition is zeros, the model's unconditional text."""
    fps_B: torch.Tensor
    motion_bucket_B: torch.Tensor
    is_image_B: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In DenoiserTrainModule.forward's order."""
        return (self.latents_BTCHW, self.text_states_BLW, self.has_text_B, self.fps_B, self.motion_bucket_B,
                self.is_image_B)

    @property
    def batch_size(self) -> int:
        return int(self.latents_BTCHW.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.latents_BTCHW.shape[1])


class FrozenEncoders:
    """The VAE and the text tower, frozen: loader batch (frames or latents, captions or text states) ->
    StepInputs on the training device."""

    def __init__(self, model: LatentVideoDiffusion, device: torch.device, default_motion_bucket: float) -> None:
        self.model = model
        self.device = device
        self.default_motion_bucket = default_motion_bucket
        for module in (model.vae, model.text_encoder.tower):
            module.requires_grad_(False)
            module.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> StepInputs:
        dev = self.device
        if "latents_BTCHW" in batch:
            latents = batch["latents_BTCHW"].to(dev, torch.float32)
        else:
            frames = batch["frames_BTCHW"].to(dev)
            if frames.dtype == torch.uint8:
                frames = frames.float() / 127.5 - 1.0
            latents = self.model.encode_frames(frames).float()
        b = latents.shape[0]
        captions = batch.get("caption") or [""] * b
        has_text = torch.tensor([bool(c) for c in captions], device=dev)
        if "text_BLD" in batch:  # precomputed: the tower's token states (see training/precompute.py)
            states = batch["text_BLD"].to(dev, torch.float32)
            has_text = torch.ones(b, dtype=torch.bool, device=dev)
        else:
            tower = self.model.text_encoder
            _, states = tower.tower(tower.tokenizer(list(captions)).to(dev))
            states = states.float()
        is_image = batch["is_image_B"].to(dev).bool()
        motion = batch["motion_bucket_B"].to(dev, torch.float32)
        motion = torch.where(torch.isnan(motion), torch.full_like(motion, self.default_motion_bucket), motion)
        motion = torch.where(is_image, torch.zeros_like(motion), motion)  # images carry no motion (model.TrainBatch)
        return StepInputs(latents, states, has_text, batch["fps_B"].to(dev, torch.float32), motion, is_image)


class DenoiserTrainModule(nn.Module):
    """What DeepSpeed trains: the UNet and the text projection. Its forward is the diffusion loss of a batch.

    The full model is kept as an unregistered reference: its `training_loss` and `denoise` run through the
    very same `unet` object, whose parameters DeepSpeed owns (and under ZeRO-3 gathers per module)."""

    def __init__(self, model: LatentVideoDiffusion, objective: ObjectiveConfig, conditioning: ConditioningConfig) -> None:
        super().__init__()
        self.unet = model.unet
        self.text_proj = model.text_encoder.proj
        object.__setattr__(self, "full_model", model)  # not a submodule: the VAE and tower stay out of DeepSpeed
        self.objective, self.conditioning = objective, conditioning

    def project_text(self, states_BLW: torch.Tensor, has_text_B: torch.Tensor) -> torch.Tensor:
        text = self.text_proj(states_BLW.to(self.text_proj.weight.dtype))
        return text * has_text_B.view(-1, 1, 1).to(text.dtype)

    def forward(self, latents_BTCHW: torch.Tensor, text_states_BLW: torch.Tensor, has_text_B: torch.Tensor,
                fps_B: torch.Tensor, motion_bucket_B: torch.Tensor, is_image_B: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's diffusion loss (a scalar). Tensors in, a tensor out: ZeRO-3 finds a module's inputs and
        outputs to hook its backward pass, which it cannot inside dataclasses."""
        batch = TrainBatch(latents_BTCHW=latents_BTCHW, text_BLD=self.project_text(text_states_BLW, has_text_B),
                           fps_B=fps_B, motion_bucket_B=motion_bucket_B, is_image_B=is_image_B)
        return self.full_model.training_loss(batch, self.objective, self.conditioning, generator).loss


def select_trainable(module: DenoiserTrainModule, trainable: str, train_text_projection: bool) -> list[nn.Parameter]:
    """Sets requires_grad per the stage's `trainable` and returns the parameters the optimizer gets."""
    from training.model.network import is_temporal

    for name, p in module.unet.named_parameters():
        p.requires_grad_(trainable == "all" or (trainable == "temporal") == is_temporal(name))
    module.text_proj.requires_grad_(train_text_projection)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"trainable={trainable} with train_text_projection={train_text_projection} leaves nothing "
                         "to train (a UNet without temporal layers?); pick another setting")
    return params


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's noise, instruction and dropout draws: a function of where the run is,
    not of a generator's history, so a resumed run draws exactly what the uninterrupted run drew."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] % (2**63 - 1))


def count_parameters(params: list[nn.Parameter]) -> int:
    # ZeRO-3 replaces each parameter's data by an empty tensor and keeps the full size in ds_numel.
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

