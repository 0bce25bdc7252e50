"""The tiny model end to end: video, image and mixed batches; temporal mixing off for images; the
denoiser's wiring; the SVD-sized model on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

from training.model.conditioning import ConditioningConfig, Conditions
from training.model.edm import ObjectiveConfig
from training.model.network import TrainBatch, unet_forward

B, T, C, H, W = 2, 4, 4, 8, 8


def _batch(model, is_image: list[bool], t: int = T, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    b = len(is_image)
    text = model.encode_text(["a white square moves right", "a blue field"][:b])  # with gradients
    return TrainBatch(latents_BTCHW=torch.randn(b, t, C, H, W, generator=g), text_BLD=text,
                      fps_B=torch.full((b,), 8), motion_bucket_B=torch.tensor([127, 0, 60, 200][:b]),
                      is_image_B=torch.tensor(is_image))


def _grad_norms(model) -> tuple[float, float, float]:
    def total(params):
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for _, p in params if p.grad is not None))

    return (total(model.spatial_parameters()), total(model.temporal_parameters()),
            total(model.text_encoder.named_parameters()))


@pytest.mark.parametrize("kind", ["video", "image", "mixed"])
def test_loss_and_gradients_for_video_image_and_mixed_batches(tiny_model, kind):
    """Images (1-frame videos flagged image-only) train the spatial layers and leave the temporal ones
    untouched; videos train both; a mixed batch (a video beside a stack of independent images) does both."""
    is_image, t = {"video": ([False, False], T), "image": ([True, True], 1), "mixed": ([False, True], T)}[kind]
    batch = _batch(tiny_model, is_image, t)
    out = tiny_model.training_loss(batch, ObjectiveConfig(), ConditioningConfig(), torch.Generator().manual_seed(1))
    assert out.loss_B.shape == (2,) and torch.isfinite(out.loss)
    out.loss.backward()
    spatial, temporal, text = _grad_norms(tiny_model)
    assert spatial > 0 and text > 0  # the text projection learns through cross-attention
    if kind == "image":
        assert temporal == 0.0
    else:
        assert temporal > 0


def _perturb_temporal(model, seed: int = 5) -> int:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.temporal_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return len(model.temporal_parameters())


def test_image_samples_do_not_depend_on_temporal_weights(tiny_model):
    """Per-sample switch: in one batch, the image-only sample's output is bit-identical after every
    temporal weight is changed, while the video sample's output changes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, C, H, W, generator=g)
    with torch.no_grad():
        text = tiny_model.encode_text(["a", "b"])
    cond = Conditions(text, torch.randn(2, T, C, H, W, generator=g), torch.tensor([[7.0, 127, 0.02]] * 2),
                      torch.tensor([False, True]))
    sigma = torch.tensor([1.0, 1.0])
    single = Conditions(text[:1], torch.zeros(1, 1, C, H, W), cond.added_time_ids_B3[:1], torch.tensor([True]))
    x1 = torch.randn(1, 1, C, H, W, generator=g)
    with torch.no_grad():
        before = tiny_model.denoise(x, sigma, cond)
        before_1 = tiny_model.denoise(x1, sigma[:1], single)
        assert _perturb_temporal(tiny_model) > 50
        after = tiny_model.denoise(x, sigma, cond)
        after_1 = tiny_model.denoise(x1, sigma[:1], single)
    assert torch.equal(before[1], after[1])
    assert torch.equal(before_1, after_1)
    assert (before[0] - after[0]).abs().max() > 1e-3


def test_temporal_parameters_are_the_inserted_layers(tiny_model):
    temporal = [n for n, _ in tiny_model.temporal_parameters()]
    spatial = [n for n, _ in tiny_model.spatial_parameters()]
    assert any("temporal_transformer_blocks" in n for n in temporal)
    assert any("temporal_res_block" in n for n in temporal)
    assert any(n.endswith("time_mixer.mix_factor") for n in temporal)
    assert "conv_in.weight" in spatial and not any("temporal" in n for n in spatial)


def test_unet_forward_matches_diffusers_for_videos(tiny_model):
    """Our forward only adds the image-only switch; with it off it must be diffusers' forward exactly."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, 2 * C, H, W, generator=g)
    text = torch.randn(B, 5, 32, generator=g)
    ids = torch.tensor([[7.0, 127, 0.02], [3.0, 10, 0.1]])
    t = torch.tensor([0.3, -0.7])
    with torch.no_grad():
        ours = unet_forward(tiny_model.unet, x, t, text, ids, torch.zeros(B, dtype=torch.bool))
        theirs = tiny_model.unet(x, t, text, ids).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_denoiser_applies_edm_preconditioning(tiny_model, monkeypatch):
    """With the network replaced by F = (its noisy-latent input), D must equal c_skip x + c_out c_in x and
    the network must be called with c_noise = ln(sigma) / 4 and [c_in x, c_image] on the channel axis."""
    seen = {}

    def fake_forward(sample, timestep, cond):
        seen["t"], seen["c_image"] = timestep, sample[:, :, C:]
        return sample[:, :, :C]

    monkeypatch.setattr(tiny_model, "unet_forward", fake_forward)
    sigma = torch.tensor([0.1, 5.0])
    x = torch.randn(B, T, C, H, W)
    c_image = torch.randn(B, T, C, H, W)
    cond = Conditions(torch.zeros(B, 3, 32), c_image, torch.zeros(B, 3), torch.zeros(B, dtype=torch.bool))
    d = tiny_model.denoise(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1, 1)
    c_skip, c_out, c_in = 1 / (s**2 + 1), -s / (s**2 + 1).sqrt(), 1 / (s**2 + 1).sqrt()  # SVD's, sigma_data 1
    torch.testing.assert_close(d, c_skip * x + c_out * c_in * x)
    torch.testing.assert_close(seen["t"], sigma.log() / 4)
    torch.testing.assert_close(seen["c_image"], c_image)


def test_svd_preset_builds_and_runs_on_the_meta_device():
    """The real sizes, without memory: diffusers' SVD config gives the ~1.5B-parameter UNet; shapes flow
    for 14 frames of 576x1024 (72x128 latents) with 77 text tokens. (A GPU check can load real weights.)"""
    from training.model.network import LatentVideoDiffusion
    from training.model.presets import preset

    with torch.device("meta"):
        model = LatentVideoDiffusion.build(preset("svd"), load_text_weights=False)
    model.to("meta")  # diffusers' AlphaBlender creates its mix factor with torch.Tensor(), outside the context
    assert sum(p.numel() for p in model.unet.parameters()) == 1_524_623_082
    assert model.unet.config.in_channels == 8 and model.unet.config.cross_attention_dim == 1024
    assert model.text_encoder.proj.in_features == 1024  # ViT-H-14's text width
    with torch.device("meta"):
        x = torch.empty(1, 14, 4, 72, 128)
        cond = Conditions(torch.empty(1, 77, 1024), torch.empty(1, 14, 4, 72, 128), torch.empty(1, 3),
                          torch.zeros(1, dtype=torch.bool))
        out = model.denoise(x, torch.ones(1), cond)
        text = model.text_encoder(torch.zeros(1, 77, dtype=torch.long))
    assert out.shape == (1, 14, 4, 72, 128) and text.shape == (1, 77, 1024)

