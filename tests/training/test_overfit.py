"""The tiny model learns: trained on two short clips, its loss falls by a large factor, and sampling from a
clip's first and last frames gives back that clip (and not the other one), measured in PSNR.

Two clips rather than one make the instructions falsifiable: a model that memorised a single clip would
reproduce it whatever it was conditioned on. Both clips share one prompt, so only the image instructions
can tell them apart. PSNR is measured on latents (the tiny VAE is random, so pixels add nothing)."""

from __future__ import annotations

import numpy as np
import torch

from curation.testing.synthetic import moving_square
from tests.training.conftest import build_tiny
from training.model.conditioning import ConditioningConfig
from training.model.edm import ObjectiveConfig
from training.model.network import TrainBatch
from training.model.sampler import ClipRequest, SamplerConfig, sample_clip

T, STEPS = 4, 300


def _clip(color_index: int, speed: float) -> torch.Tensor:
    frames = np.stack(list(moving_square(T, h=32, w=32, speed=speed, color_index=color_index, seed=color_index)))
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    return float(10 * torch.log10(peak**2 / (a - b).pow(2).mean()))


def test_tiny_model_overfits_and_reproduces_clips_from_first_and_last_frames():
    model = build_tiny(seed=0)
    for p in [*model.vae.parameters(), *model.text_encoder.parameters()]:
        p.requires_grad_(False)
    # A square crossing red to the right, and one crossing blue to the left (speed -5 mod 64).
    latents = model.encode_frames(torch.stack([_clip(0, 5.0), _clip(2, 59.0)]))
    latents = (latents - latents.mean()) / latents.std()  # the random tiny VAE's scale -> sigma_data = 1
    peak = float(latents.max() - latents.min())
    with torch.no_grad():
        text = model.encode_text(["a white square crosses the frame"] * 2)

    objective, conditioning = ObjectiveConfig(p_mean=0.0, p_std=1.2), ConditioningConfig()

    def batch(repeat: int) -> TrainBatch:
        n = 2 * repeat
        return TrainBatch(latents.repeat(repeat, 1, 1, 1, 1), text.repeat(repeat, 1, 1), torch.full((n,), 8),
                          torch.full((n,), 127), torch.zeros(n, dtype=torch.bool))

    eval_batch = batch(8)

    def eval_loss() -> float:  # the same sigmas, noise and instruction draws before and after training
        with torch.no_grad():
            return model.training_loss(eval_batch, objective, conditioning, torch.Generator().manual_seed(123)).loss.item()

    sampler = SamplerConfig(num_steps=20, sigma_max=80.0, cfg_scale=1.0, cfg_min_scale=1.0, tau=1.0)

    def sample(k: int, first: bool = True, last: bool = True) -> torch.Tensor:
        request = ClipRequest(text[k:k + 1], latents[k:k + 1, 0] if first else None,
                              latents[k:k + 1, -1] if last else None, T, (8, 8))
        with torch.no_grad():
            return sample_clip(model.denoise, request, sampler, 4, model.scaling_factor, torch.Generator().manual_seed(7))

    loss_before = eval_loss()
    psnr_untrained = _psnr(sample(0), latents[:1], peak)

    train = batch(1)
    opt = torch.optim.AdamW([p for p in model.unet.parameters()], lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        loss = model.training_loss(train, objective, conditioning, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    loss_after = eval_loss()

    psnr = {}
    for k in (0, 1):
        s = sample(k)
        psnr[k] = (_psnr(s, latents[k:k + 1], peak), _psnr(s, latents[1 - k:2 - k], peak))
    text_only = sample(0, first=False, last=False)
    print(f"loss {loss_before:.3f} -> {loss_after:.3f} (x{loss_before / loss_after:.1f}); PSNR dB "
          f"untrained {psnr_untrained:.1f}, clip A {psnr[0][0]:.1f} (vs B {psnr[0][1]:.1f}), "
          f"clip B {psnr[1][0]:.1f} (vs A {psnr[1][1]:.1f}), text only vs A/B "
          f"{_psnr(text_only, latents[:1], peak):.1f}/{_psnr(text_only, latents[1:], peak):.1f}")

    assert loss_before / loss_after > 4  # measured ~8 at 300 steps
    for k in (0, 1):
        own, other = psnr[k]
        assert own > 27  # measured ~33 dB
        assert own > other + 8  # the instructions pick the clip (measured ~14 dB apart)
        assert own > psnr_untrained + 10
