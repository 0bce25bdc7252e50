"""Saving and loading the model in diffusers' folder layout (safetensors), so SVD checkpoints load into it
and our exports load into diffusers.

    DIR/unet/           diffusers UNetSpatioTemporalConditionModel (config.json + safetensors)
    DIR/vae/            diffusers AutoencoderKLTemporalDecoder or AutoencoderKL
    DIR/text_encoder/   ours: config.json (TextEncoderConfig + cross_attention_dim) + model.safetensors
    DIR/lvd_model.json  ours: the ModelConfig the export was made from

A real SVD folder (stabilityai/stable-video-diffusion-img2vid*) has unet/ and vae/ but no text encoder
(SVD conditions on a CLIP image embedding, which this model replaces by text): its text tower then comes
from `text.pretrained` (OpenCLIP ViT-H-14, whose width matches SVD's cross-attention). A training checkpoint
folder holds such an export under `model/`; both are accepted wherever a model folder is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.model.network import (AutoencoderKL, AutoencoderKLTemporalDecoder, LatentVideoDiffusion, TextEncoder,
                            UNetSpatioTemporalConditionModel)
from training.model.presets import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

MODEL_CONFIG = "lvd_model.json"
TEXT_DIR = "text_encoder"
TEXT_WEIGHTS = "model.safetensors"


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding unet/: `path` itself, or `path/model` (a training checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model folder {path} does not exist; train one first (`lvd train RECIPE` exports its "
                         "final model to OUTPUT/model; pass OUTPUT or OUTPUT/model) or pass --random-init")
    for candidate in (path, path / "model"):
        if (candidate / "unet" / "config.json").is_file():
            return candidate
    raise ValueError(f"{path} holds no diffusers-format model (no unet/config.json in it or in {path / 'model'}); "
                     "pass an export made by save_pretrained, a training checkpoint, or an SVD folder")


def save_pretrained(model: LatentVideoDiffusion, out_dir: str | Path) -> Path:
    """Writes the model as a diffusers-format folder; reloading it gives identical outputs."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    model.vae.save_pretrained(out / "vae", safe_serialization=True)
    text_dir = out / TEXT_DIR
    text_dir.mkdir(exist_ok=True)
    # The weights now live here; a reload must not fetch the OpenCLIP checkpoint again.
    text_cfg = model.text_encoder.config.model_copy(update={"pretrained": None})
    (text_dir / "config.json").write_text(json.dumps(
        {**text_cfg.model_dump(mode="json"), "cross_attention_dim": model.text_encoder.proj.out_features}, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.text_encoder.state_dict().items()},
              str(text_dir / TEXT_WEIGHTS))
    cfg = model.config.model_copy(update={"text": text_cfg})
    (out / MODEL_CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return out


def load_pretrained(path: str | Path, config: ModelConfig | None = None, variant: str | None = None,
                    torch_dtype: torch.dtype | None = None, allow_random_text: bool = False) -> LatentVideoDiffusion:
    """Loads an export, a training checkpoint, or a real SVD folder (with `config.text.pretrained` set).

    The UNet's and VAE's sizes always come from their own config.json, the text encoder from the folder's
    text_encoder/ when there is one. `config` (default: the folder's lvd_model.json, else the `svd`
    preset) supplies the preset name, the frame size and, for a folder without text_encoder/, the text
    tower. `variant="fp16"` picks SVD's diffusion_pytorch_model.fp16.safetensors files."""
    import importlib.util

    from safetensors.torch import load_file

    d = resolve_model_dir(path)
    if config is None:
        config = (ModelConfig.model_validate_json((d / MODEL_CONFIG).read_text()) if (d / MODEL_CONFIG).is_file()
                  else ModelConfig(preset="svd"))
    # Without accelerate diffusers cannot skip the random init and warns about it; ask for what works.
    kw: dict = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    if variant:
        kw["variant"] = variant
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    unet = UNetSpatioTemporalConditionModel.from_pretrained(d, subfolder="unet", **kw)
    vae_meta = json.loads((d / "vae" / "config.json").read_text())
    vae_cls = AutoencoderKLTemporalDecoder if vae_meta.get("_class_name") == "AutoencoderKLTemporalDecoder" \
        else AutoencoderKL
    vae = vae_cls.from_pretrained(d, subfolder="vae", **kw)

    text_dir = d / TEXT_DIR
    if text_dir.is_dir():
        meta = json.loads((text_dir / "config.json").read_text())
        cross_dim = meta.pop("cross_attention_dim")
        text_cfg = TextEncoderConfig.model_validate(meta)
        text = TextEncoder(text_cfg, cross_dim)
        text.load_state_dict(load_file(str(text_dir / TEXT_WEIGHTS)))
    else:
        text_cfg = config.text
        if text_cfg.pretrained is None and not allow_random_text:
            raise ValueError(f"{d} has no {TEXT_DIR}/ (a real SVD folder?) and text.pretrained is not set; point "
                             "model.text.pretrained at an OpenCLIP ViT-H-14 checkpoint, or allow a random text tower")
        text = TextEncoder(text_cfg, unet.config.cross_attention_dim)
        if text_cfg.pretrained:
            text.load_open_clip(text_cfg.pretrained)
    if torch_dtype is not None:
        text = text.to(torch_dtype)

    model_cfg = ModelConfig.model_validate({
        "preset": config.preset,
        "unet": UNetConfig.from_diffusers(dict(unet.config)).model_dump(),
        "vae": VAEConfig.from_diffusers(vae_meta.get("_class_name", ""), dict(vae.config)).model_dump(),
        "text": text_cfg.model_dump(),
        "frame_size": config.frame_size,
        "precondition": config.precondition.model_dump(),
    })
    return LatentVideoDiffusion(model_cfg, unet, vae, text)
