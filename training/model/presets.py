"""Model sizes: typed configs for the UNet, the VAE and the text encoder, and the named presets.

`tiny` runs on a CPU in seconds (tests, the demo); `svd` is Stable Video Diffusion's UNet and VAE
(stabilityai/stable-video-diffusion-img2vid*) with OpenCLIP ViT-H-14's text tower, so a real SVD
checkpoint loads into it. A recipe names a preset and overrides single keys:

    model: {preset: svd, text: {pretrained: /ckpt/open_clip_vit_h14.safetensors}}
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from common.config import Config
from training.model.edm import PreconditionConfig

# The three ids SVD adds to the timestep embedding: (fps - 1, motion bucket, conditioning-noise level).
NUM_ADDED_TIME_IDS = 3


class UNetConfig(Config):
    """Arguments of diffusers' `UNetSpatioTemporalConditionModel` (names as diffusers spells them)."""

    in_channels: int = 8
    """noisy latents + PixelDance image instructions, concatenated on the channel axis (4 + 4 in SVD)."""
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                       "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int = 1
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    num_frames: int = 14
    """Informational in diffusers (the forward takes any frame count); SVD img2vid: 14, img2vid-xt: 25."""
    sample_size: int | None = None

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but block_out_channels has {n}; "
                                 "give one per resolution level")
        for ch in self.block_out_channels:
            if ch % 32:
                raise ValueError(f"block_out_channels ({ch}) must be multiples of 32 (GroupNorm uses 32 groups)")
        if self.projection_class_embeddings_input_dim != NUM_ADDED_TIME_IDS * self.addition_time_embed_dim:
            raise ValueError(
                f"projection_class_embeddings_input_dim ({self.projection_class_embeddings_input_dim}) must be "
                f"{NUM_ADDED_TIME_IDS} x addition_time_embed_dim ({self.addition_time_embed_dim}): one embedding "
                "each for fps, motion bucket and conditioning noise")
        return self

    def diffusers_kwargs(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """From a loaded UNet's `config` (drops diffusers' private `_...` keys)."""
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in cls.model_fields}
        for key in ("num_attention_heads",):  # diffusers allows a single int for every level
            if isinstance(kw.get(key), int):
                kw[key] = (kw[key],) * len(kw["block_out_channels"])
        return cls(**kw)


class VAEConfig(Config):
    """The frame autoencoder: SVD's `AutoencoderKLTemporalDecoder`, or a plain `AutoencoderKL`."""

    kind: Literal["temporal_decoder", "kl"] = "temporal_decoder"
    """temporal_decoder: SVD's VAE (2D encoder, decoder with temporal layers, less flicker);
    kl: an image VAE (e.g. SD 2.1's), decoding each frame on its own."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    """Latents are multiplied by this so they have roughly unit variance (the diffusion's sigma_data)."""
    sample_size: int = 768

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        kw: dict[str, Any] = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                                  latent_channels=self.latent_channels, scaling_factor=self.scaling_factor,
                                  sample_size=self.sample_size, down_block_types=("DownEncoderBlock2D",) * n)
        if self.kind == "kl":
            kw["up_block_types"] = ("UpDecoderBlock2D",) * n
        return kw

    @classmethod
    def from_diffusers(cls, class_name: str, config: dict[str, Any]) -> VAEConfig:
        kind = "temporal_decoder" if class_name == "AutoencoderKLTemporalDecoder" else "kl"
        return cls(kind=kind, block_out_channels=tuple(config["block_out_channels"]),
                   layers_per_block=config["layers_per_block"], latent_channels=config["latent_channels"],
                   scaling_factor=config["scaling_factor"], sample_size=config.get("sample_size") or 768)


class TextEncoderConfig(Config):
    """An OpenCLIP text tower (CLIP BPE tokenizer) whose token states feed the UNet's cross-attention."""

    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    """The CLIP BPE vocabulary; the tokenizer is open_clip's SimpleTokenizer, whatever the width."""
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    """OpenAI's CLIP weights use QuickGELU; OpenCLIP's LAION ViT-H-14 uses GELU. Must match the weights."""
    embed_dim: int = 1024
    """Width of the tower's pooled CLIP embedding (its `text_projection`)."""
    open_clip_model: str | None = "ViT-H-14"
    """The OpenCLIP architecture the weights come from (checked against width/layers when loading)."""
    pretrained: str | None = None
    """Where the tower's weights come from: a local OpenCLIP checkpoint (.safetensors / .bin / .pt), or an
    OpenCLIP pretrained tag (e.g. laion2b_s32b_b79k) or hf-hub id resolved from the local Hugging Face
    cache. None: random init (tests, or an export whose text_encoder/ folder carries the weights)."""
    projection_init: Literal["random", "clip_text_projection"] = "clip_text_projection"
    """clip_text_projection: when loading pretrained weights and the widths match, the projection to the
    UNet starts as CLIP's text_projection, which maps text into the joint CLIP space that SVD's
    cross-attention saw (CLIP image embeddings); random: a fresh Linear."""

    @pydantic.model_validator(mode="after")
    def _heads_divide(self) -> TextEncoderConfig:
        if self.width % self.heads:
            raise ValueError(f"text width ({self.width}) must be divisible by heads ({self.heads})")
        return self


class ModelConfig(Config):
    """The whole model. `preset` fills every key not given, so a recipe can override one value."""

    preset: Literal["tiny", "svd"] = "tiny"
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    precondition: PreconditionConfig = PreconditionConfig()
    """EDM scaling of the network's input and output; SVD's (v, sigma_data 1) for both presets."""
    frame_size: tuple[int, int] = (576, 1024)
    """Height and width in pixels the model works at: sampling's default size."""

    @pydantic.model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "tiny")
        if name not in PRESET_TREES:
            raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(PRESET_TREES)}")
        return _deep_merge(PRESET_TREES[name], data)

    @pydantic.model_validator(mode="after")
    def _parts_fit(self) -> ModelConfig:
        c = self.vae.latent_channels
        if self.unet.in_channels != 2 * c:
            raise ValueError(f"unet.in_channels ({self.unet.in_channels}) must be 2 x vae.latent_channels ({c}): "
                             "noisy latents and the image instructions are concatenated on the channel axis")
        if self.unet.out_channels != c:
            raise ValueError(f"unet.out_channels ({self.unet.out_channels}) must equal vae.latent_channels ({c})")
        m = self.pixel_multiple
        if any(side % m for side in self.frame_size):
            raise ValueError(f"frame_size {self.frame_size} must be multiples of {m} (VAE x UNet downsampling)")
        return self

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def pixel_multiple(self) -> int:
        """Frame sides must be multiples of this (VAE downsampling x the UNet's downsampling)."""
        return self.vae.downsample * 2 ** (len(self.unet.block_out_channels) - 1)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Presets as plain trees (not ModelConfig instances) so the validator above can merge overrides into them.
PRESET_TREES: dict[str, dict[str, Any]] = {
    # Diffusers' own test size (block_out_channels=(32, 64)); 32x32 frames -> 8x8 latents.
    "tiny": {
        "preset": "tiny",
        "unet": dict(in_channels=8, out_channels=4,
                     down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                     up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                     block_out_channels=(32, 64), layers_per_block=1, num_attention_heads=(2, 4),
                     cross_attention_dim=32, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                     num_frames=4, sample_size=8),
        "vae": dict(kind="temporal_decoder", block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=4,
                    scaling_factor=1.0, sample_size=32),
        "text": dict(width=32, heads=2, layers=2, context_length=16, embed_dim=32, open_clip_model=None,
                     pretrained=None, projection_init="random"),
        "frame_size": (32, 32),
    },
    # stabilityai/stable-video-diffusion-img2vid(-xt): diffusers' defaults for both classes are SVD's sizes.
    "svd": {
        "preset": "svd",
        "unet": UNetConfig().model_dump(),
        "vae": VAEConfig().model_dump(),
        "text": TextEncoderConfig().model_dump(),
        "frame_size": (576, 1024),
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """`preset("tiny")`, or with overrides: `preset("svd", text={"pretrained": path})`."""
    return ModelConfig.model_validate({"preset": name, **overrides})
