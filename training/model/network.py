"""The latent video diffusion model: diffusers' SVD UNet and VAE, an OpenCLIP text tower, the EDM denoiser.

What diffusers lacks and this file adds:
- `unet_forward`: diffusers' `UNetSpatioTemporalConditionModel.forward` always sets `image_only_indicator`
  to zeros; its blocks take the indicator, so this forward (a thin walk over the same submodules, mirroring
  diffusers 0.42.1) passes it through. Image samples then skip every temporal layer exactly (AlphaBlender's
  alpha is 1), which is how images and videos train the same weights (joint training, VDM / Video LDM).
- Text through cross-attention: OpenCLIP token states, projected to the UNet's cross-attention width.
  SVD's UNet cross-attends to one CLIP *image* embedding (1024-d); here it attends to text tokens.
- PixelDance instructions by channel concatenation: SVD's in_channels = 8 is noisy latents (4) + the first
  frame's latent repeated over every frame (4); ours is noisy latents + [first, 0, ..., 0, last]. Same
  width, so an SVD checkpoint loads unchanged and fine-tunes to the new instruction layout.

Shapes: B batch, T frames, C channels (latent, or 3 for RGB), H x W spatial size, L text tokens,
D text width (after projection: the UNet's cross_attention_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.torch_compat import ensure_torchvision_importable
from training.model import edm
from training.model.conditioning import (ConditioningConfig, Conditions, added_time_ids, text_keep_mask,
                                   training_instructions)
from training.model.presets import ModelConfig, TextEncoderConfig

ensure_torchvision_importable()  # diffusers -> transformers -> torchvision, and open_clip -> torchvision

from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # noqa: E402

# Submodule names that hold the temporal layers of diffusers' spatio-temporal blocks. Everything else in
# the UNet is the 2D image model they were inserted into (Video LDM).
TEMPORAL_KEYS = ("temporal_res_block", "temporal_transformer_blocks", "time_pos_embed", "time_mixer")


def is_temporal(parameter_name: str) -> bool:
    return any(k in parameter_name.split(".") for k in TEMPORAL_KEYS)


class TextEncoder(nn.Module):
    """OpenCLIP text tower -> token states (after the final LayerNorm) -> Linear to the UNet's width."""

    def __init__(self, config: TextEncoderConfig, cross_attention_dim: int):
        super().__init__()
        from open_clip import SimpleTokenizer
        from open_clip.transformer import QuickGELU, TextTransformer

        self.config = config
        self.tower = TextTransformer(context_length=config.context_length, vocab_size=config.vocab_size,
                                     width=config.width, heads=config.heads, layers=config.layers,
                                     mlp_ratio=config.mlp_ratio, output_dim=config.embed_dim, output_tokens=True,
                                     act_layer=QuickGELU if config.quick_gelu else nn.GELU)
        self.proj = nn.Linear(config.width, cross_attention_dim)
        self.tokenizer = SimpleTokenizer(context_length=config.context_length)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts).to(self.proj.weight.device)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        _, states_BLW = self.tower(tokens_BL)
        return self.proj(states_BLW)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(self.tokenize(prompts))

    def load_open_clip(self, pretrained: str) -> None:
        """Loads the tower from an OpenCLIP checkpoint file, or a tag / hf-hub id from the local cache."""
        from pathlib import Path

        from open_clip.factory import load_state_dict

        if Path(pretrained).is_file():
            state = load_state_dict(pretrained)
        else:
            import open_clip

            if self.config.open_clip_model is None:
                raise ValueError(f"text.pretrained ({pretrained!r}) is not a file; set text.open_clip_model to the "
                                 "architecture it belongs to (e.g. ViT-H-14) or give a checkpoint path")
            name = pretrained if pretrained.startswith("hf-hub:") else self.config.open_clip_model
            tag = None if pretrained.startswith("hf-hub:") else pretrained
            state = open_clip.create_model(name, pretrained=tag).state_dict()
        # A CLIP keeps its text tower at the top level, a CustomTextCLIP under `text.`.
        wanted = self.tower.state_dict().keys()
        text = {k.removeprefix("text."): v for k, v in state.items() if k.removeprefix("text.") in wanted}
        missing = sorted(set(wanted) - set(text))
        if missing:
            raise ValueError(f"{pretrained} has no text tower matching text config (missing {missing[:3]}...); "
                             "check text.width / layers / context_length against the checkpoint")
        try:
            self.tower.load_state_dict(text)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{pretrained}: the text tower does not fit the text config ({e}); set text.width, "
                             "heads, layers, context_length and embed_dim to the checkpoint's") from None
        proj = self.tower.text_projection
        if self.config.projection_init == "clip_text_projection" and isinstance(proj, nn.Parameter) \
                and tuple(proj.shape) == (self.proj.in_features, self.proj.out_features):
            with torch.no_grad():
                self.proj.weight.copy_(proj.T)
                self.proj.bias.zero_()


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate: mean of loss_B."""
    loss_B: torch.Tensor
    sigma_B: torch.Tensor
    kept_text_B: torch.Tensor
    kept_first_B: torch.Tensor
    kept_last_B: torch.Tensor


@dataclass
class TrainBatch:
    """One training batch in latent space (the shards carry precomputed, scaled latents)."""

    latents_BTCHW: torch.Tensor
    text_BLD: torch.Tensor
    """Projected token states (`model.encode_text(captions)`)."""
    fps_B: torch.Tensor
    motion_bucket_B: torch.Tensor
    """Curation's motion_bucket (0..255); images: 0."""
    is_image_B: torch.Tensor
    """True for images: no temporal mixing, no instructions. An image is a 1-frame sample (T = 1); a T-frame
    sample flagged True is T independent images sharing one caption."""


class LatentVideoDiffusion(nn.Module):
    """UNet + VAE + text encoder, with the EDM denoiser and the training loss."""

    def __init__(self, config: ModelConfig, unet: UNetSpatioTemporalConditionModel,
                 vae: AutoencoderKLTemporalDecoder | AutoencoderKL, text_encoder: TextEncoder):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder

    @classmethod
    def build(cls, config: ModelConfig, load_text_weights: bool = True) -> LatentVideoDiffusion:
        """Random UNet and VAE at the config's sizes; the text tower from `text.pretrained` when set."""
        unet = UNetSpatioTemporalConditionModel(**config.unet.diffusers_kwargs())
        vae_cls = AutoencoderKLTemporalDecoder if config.vae.kind == "temporal_decoder" else AutoencoderKL
        vae = vae_cls(**config.vae.diffusers_kwargs())
        text = TextEncoder(config.text, config.unet.cross_attention_dim)
        if load_text_weights and config.text.pretrained:
            text.load_open_clip(config.text.pretrained)
        return cls(config, unet, vae, text)

    def train(self, mode: bool = True) -> LatentVideoDiffusion:
        """The VAE is never trained here (latents are precomputed with it), so it stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    # ---- frames and text ----

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts)

    @torch.no_grad()
    def encode_frames(self, frames_BTCHW: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """RGB in [-1, 1] -> scaled latents (the diffusion's data). mode() unless `sample`."""
        b, t = frames_BTCHW.shape[:2]
        dist = self.vae.encode(frames_BTCHW.flatten(0, 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z * self.scaling_factor).unflatten(0, (b, t))

    @torch.no_grad()
    def decode_latents(self, latents_BTCHW: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Scaled latents -> RGB in [-1, 1]. The temporal decoder sees `chunk_frames` frames of a clip
        together (all by default; SVD's pipeline decodes in chunks to bound memory at full size)."""
        t = latents_BTCHW.shape[1]
        step = chunk_frames or t
        parts = []
        for start in range(0, t, step):
            part = latents_BTCHW[:, start:start + step]
            n = part.shape[1]
            z = (part / self.scaling_factor).flatten(0, 1).to(self.vae.dtype)
            if isinstance(self.vae, AutoencoderKLTemporalDecoder):
                frames = self.vae.decode(z, num_frames=n).sample
            else:
                frames = self.vae.decode(z).sample
            parts.append(frames.unflatten(0, (part.shape[0], n)))
        return torch.cat(parts, dim=1).clamp(-1, 1)

    # ---- the network ----

    def unet_forward(self, sample_BTCHW: torch.Tensor, timestep_B: torch.Tensor, cond: Conditions) -> torch.Tensor:
        return unet_forward(self.unet, sample_BTCHW, timestep_B, cond.text_BLD, cond.added_time_ids_B3,
                            cond.image_only_B)

    def denoise(self, noisy_BTCHW: torch.Tensor, sigma_B: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """EDM's D(x; sigma): the preconditioned UNet's estimate of the clean latents (a `DenoiseFn`)."""
        p = edm.precondition(sigma_B, self.config.precondition, noisy_BTCHW.ndim)
        x_in = torch.cat([p.c_in * noisy_BTCHW, cond.c_image_BTCHW.to(noisy_BTCHW.dtype)], dim=2)
        # The UNet may run in half precision; the preconditioning (and the sampler's state) stay in float32.
        f = self.unet_forward(x_in.to(self.unet.dtype), p.c_noise, cond).to(p.c_out.dtype)
        return p.c_skip * noisy_BTCHW + p.c_out * f

    def training_loss(self, batch: TrainBatch, objective: edm.ObjectiveConfig, conditioning: ConditioningConfig,
                      generator: torch.Generator | None = None) -> LossOutput:
        """One EDM step: random sigma per sample, randomised instructions and text dropout, weighted loss."""
        x0 = batch.latents_BTCHW
        b, dev = x0.shape[0], x0.device
        instr = training_instructions(x0, batch.is_image_B, conditioning, self.scaling_factor, generator)
        keep_text = text_keep_mask(b, conditioning, generator, dev)
        cond = Conditions(
            text_BLD=batch.text_BLD * keep_text.view(b, 1, 1).to(batch.text_BLD.dtype),
            c_image_BTCHW=instr.c_image_BTCHW,
            added_time_ids_B3=added_time_ids(batch.fps_B, batch.motion_bucket_B, instr.noise_level_B).to(dev),
            image_only_B=batch.is_image_B.bool().to(dev))
        sigma = edm.sample_sigmas(b, objective, generator, dev)
        gen_dev = generator.device if generator is not None else dev
        noise = torch.randn(x0.shape, generator=generator, device=gen_dev).to(dev, x0.dtype)
        noisy = x0 + edm.per_sample(sigma, x0.ndim) * noise
        denoised = self.denoise(noisy, sigma, cond)
        loss_b = edm.weighted_loss(denoised.float(), x0.float(), sigma, self.config.precondition)
        return LossOutput(loss=loss_b.mean(), loss_B=loss_b.detach(), sigma_B=sigma, kept_text_B=keep_text,
                          kept_first_B=instr.kept_first_B, kept_last_B=instr.kept_last_B)

    # ---- parameter groups (freezing per stage) ----

    def temporal_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if is_temporal(n)]

    def spatial_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if not is_temporal(n)]


def unet_forward(unet: UNetSpatioTemporalConditionModel, sample_BTCHW: torch.Tensor, timestep_B: torch.Tensor,
                 text_BLD: torch.Tensor, added_time_ids_B3: torch.Tensor, image_only_B: torch.Tensor) -> torch.Tensor:
    """`UNetSpatioTemporalConditionModel.forward` (diffusers 0.42.1) with `image_only_indicator` exposed.

    One flag per sample: True runs every frame of it through the spatial layers alone. Returns B T C H W.
    """
    b, t = sample_BTCHW.shape[:2]
    dtype = sample_BTCHW.dtype
    timestep_B = timestep_B.reshape(-1).expand(b) if timestep_B.numel() == 1 else timestep_B
    emb = unet.time_embedding(unet.time_proj(timestep_B).to(dtype))
    ids = unet.add_time_proj(added_time_ids_B3.flatten()).reshape(b, -1).to(emb.dtype)
    emb = (emb + unet.add_embedding(ids)).repeat_interleave(t, dim=0)
    text = text_BLD.to(dtype).repeat_interleave(t, dim=0)
    indicator = image_only_B.to(dtype).view(b, 1).expand(b, t)

    h = unet.conv_in(sample_BTCHW.flatten(0, 1))
    skips = (h,)
    for block in unet.down_blocks:
        extra = {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}
        h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **extra)
        skips += res
    h = unet.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=text, image_only_indicator=indicator)
    # Sides that are not a multiple of the total downsampling need the skip's size forwarded to upsamplers.
    uneven = any(s % 2**unet.num_upsamplers for s in sample_BTCHW.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        size = skips[-1].shape[2:] if uneven and i < len(unet.up_blocks) - 1 else None
        extra = {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size,
                  image_only_indicator=indicator, **extra)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h.unflatten(0, (b, t))
