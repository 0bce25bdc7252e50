"""Saving and loading in diffusers' folder layout, through the same loading code real checkpoints use."""

from __future__ import annotations

import shutil

import pytest
import torch

from training.model.conditioning import Conditions
from training.model.export import load_pretrained, resolve_model_dir, save_pretrained

B, T, C, H, W = 2, 3, 4, 8, 8


def _outputs(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, H, W, generator=g)
    with torch.no_grad():
        text = model.encode_text(["a white square", "waves on a beach"])
        cond = Conditions(text, torch.randn(B, T, C, H, W, generator=g), torch.tensor([[6.0, 127, 0.02]] * B),
                          torch.tensor([False, True]))
        return {"text": text, "denoised": model.denoise(x, torch.tensor([0.5, 3.0]), cond),
                "decoded": model.decode_latents(x), "encoded": model.encode_frames(torch.rand(1, 2, 3, 32, 32, generator=g) * 2 - 1)}


@pytest.mark.parametrize("vae", ["temporal_decoder", "kl"])
def test_save_and_reload_in_diffusers_format_gives_identical_outputs(tmp_path, vae):
    from tests.training.conftest import build_tiny

    tiny_model = build_tiny(vae={"kind": vae}).train()
    before = _outputs(tiny_model)
    out = save_pretrained(tiny_model, tmp_path / "export")
    for part in ("unet", "vae"):
        assert (out / part / "diffusion_pytorch_model.safetensors").is_file()
        assert not list((out / part).glob("*.bin"))  # safetensors only, never pickles
    assert (out / "text_encoder" / "model.safetensors").is_file()
    reloaded = load_pretrained(out)
    assert reloaded.config == tiny_model.config
    after = _outputs(reloaded)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_diffusers_loads_our_unet_and_vae_on_its_own(tiny_model, tmp_path):
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    out = save_pretrained(tiny_model, tmp_path / "export")
    unet = UNetSpatioTemporalConditionModel.from_pretrained(out / "unet")
    vae = AutoencoderKLTemporalDecoder.from_pretrained(out / "vae")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_model.unet.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), tiny_model.vae.state_dict().values()))


def test_svd_layout_without_text_encoder_needs_text_weights(tiny_model, tmp_path):
    """A real SVD folder has unet/ and vae/ only: loading it asks for the text tower's checkpoint, and with
    one (here an OpenCLIP CLIP at tiny size, saved as OpenCLIP saves it) loads it into the text encoder."""
    out = save_pretrained(tiny_model, tmp_path / "export")
    svd_like = tmp_path / "svd_like"
    for part in ("unet", "vae"):
        shutil.copytree(out / part, svd_like / part)
    with pytest.raises(ValueError, match="text.pretrained"):
        load_pretrained(svd_like, config=tiny_model.config)

    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    t = tiny_model.config.text
    clip = CLIP(embed_dim=t.embed_dim, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16,
                                                                image_size=32),
                text_cfg=CLIPTextCfg(context_length=t.context_length, width=t.width, heads=t.heads, layers=t.layers))
    ckpt = tmp_path / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(ckpt))
    text_cfg = t.model_copy(update={"pretrained": str(ckpt), "projection_init": "clip_text_projection"})
    loaded = load_pretrained(svd_like, config=tiny_model.config.model_copy(update={"text": text_cfg}))
    tower = loaded.text_encoder.tower.state_dict()
    assert torch.equal(tower["token_embedding.weight"], clip.token_embedding.weight)
    assert torch.equal(tower["transformer.resblocks.1.mlp.c_fc.weight"], clip.transformer.resblocks[1].mlp.c_fc.weight)
    # The projection to the UNet starts as CLIP's text projection (the joint space SVD's UNet attended to).
    assert torch.equal(loaded.text_encoder.proj.weight, clip.text_projection.T)
    # The tower computes what OpenCLIP computes: the pooled output is CLIP's text embedding.
    tokens = loaded.text_encoder.tokenize(["a dog runs"])
    with torch.no_grad():
        pooled, _ = loaded.text_encoder.tower(tokens)
        torch.testing.assert_close(pooled, clip.encode_text(tokens))
    assert torch.equal(loaded.unet.conv_in.weight, tiny_model.unet.conv_in.weight)


def test_training_checkpoint_folder_resolves_to_its_model(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt" / "step_100" / "model")
    assert resolve_model_dir(tmp_path / "ckpt" / "step_100") == tmp_path / "ckpt" / "step_100" / "model"
    with pytest.raises(ValueError, match="no diffusers-format model"):
        resolve_model_dir(tmp_path / "ckpt")
