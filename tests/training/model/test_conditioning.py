"""PixelDance instructions and CFG dropout in training, SVD's micro-conditioning: measured over many draws."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, validate
from training.model.conditioning import (ConditioningConfig, added_time_ids, instructions_tensor, text_keep_mask,
                                   training_instructions)

SCALE = 0.5  # a VAE scaling factor != 1, so the unscaled-instruction convention is visible


def _clips(b: int, t: int) -> torch.Tensor:
    """Frame k of every clip is the constant k (so an instruction shows which frame it came from)."""
    return torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1).expand(b, t, 1, 4, 4).clone()


def test_last_frame_instruction_comes_from_the_last_three_frames_noised_and_dropped_with_eta():
    b, t = 4000, 6
    cfg = ConditioningConfig()
    instr = training_instructions(_clips(b, t), torch.zeros(b, dtype=torch.bool), cfg, SCALE,
                                  torch.Generator().manual_seed(0))
    c = instr.c_image_BTCHW * SCALE  # back to scaled latents
    counts = torch.bincount(instr.last_index_B, minlength=t)
    assert counts[: t - 3].sum() == 0
    assert all(abs(n / b - 1 / 3) < 0.03 for n in counts[t - 3:].tolist())
    assert instr.kept_last_B.float().mean().item() == pytest.approx(1 - cfg.eta, abs=0.03)
    assert instr.kept_first_B.float().mean().item() == pytest.approx(1 - cfg.first_drop_prob, abs=0.02)
    assert c[:, 1:-1].abs().sum() == 0  # [first, 0, ..., 0, last]
    assert c[~instr.kept_last_B, -1].abs().sum() == 0 and c[~instr.kept_first_B, 0].abs().sum() == 0

    # Kept instructions are the picked frame plus Gaussian noise of the drawn level.
    kept = instr.kept_last_B
    noise_last = (c[kept, -1] - instr.last_index_B[kept].float().view(-1, 1, 1, 1)) / instr.noise_level_B[kept].view(-1, 1, 1, 1)
    noise_first = c[instr.kept_first_B, 0] / instr.noise_level_B[instr.kept_first_B].view(-1, 1, 1, 1)
    for noise in (noise_last, noise_first):
        assert noise.mean().item() == pytest.approx(0.0, abs=0.02)
        assert noise.std().item() == pytest.approx(1.0, rel=0.03)
    log_level = instr.noise_level_B.log()
    assert log_level.mean().item() == pytest.approx(cfg.cond_noise_p_mean, abs=0.03)
    assert log_level.std().item() == pytest.approx(cfg.cond_noise_p_std, rel=0.05)


def test_images_get_no_instructions_and_no_conditioning_noise():
    b, t = 64, 4
    is_image = torch.arange(b) % 2 == 0
    instr = training_instructions(_clips(b, t) + 1, is_image, ConditioningConfig(eta=0, first_drop_prob=0), SCALE,
                                  torch.Generator().manual_seed(1))
    assert instr.c_image_BTCHW[is_image].abs().sum() == 0
    assert (instr.noise_level_B[is_image] == 0).all()
    assert (instr.c_image_BTCHW[~is_image][:, 0].abs() > 0).all()  # videos keep theirs (no dropout here)


def test_text_dropout_rate_and_micro_conditioning():
    keep = text_keep_mask(20_000, ConditioningConfig(text_drop_prob=0.15), torch.Generator().manual_seed(2),
                          torch.device("cpu"))
    assert keep.float().mean().item() == pytest.approx(0.85, abs=0.01)
    ids = added_time_ids(torch.tensor([7, 25]), torch.tensor([127, 3]), torch.tensor([0.02, 0.0]))
    torch.testing.assert_close(ids, torch.tensor([[6.0, 127.0, 0.02], [24.0, 3.0, 0.0]]))  # SVD's fps - 1


def test_instruction_layout_at_inference():
    first, last = torch.ones(2, 4, 3, 3), 2 * torch.ones(2, 4, 3, 3)
    c = instructions_tensor(first, last, 5)
    assert c.shape == (2, 5, 4, 3, 3)
    assert (c[:, 0] == 1).all() and (c[:, -1] == 2).all() and (c[:, 1:-1] == 0).all()
    assert (instructions_tensor(first, None, 5)[:, 1:] == 0).all()
    with pytest.raises(ValueError, match="1-frame sample"):
        instructions_tensor(first, last, 1)


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"eta \(1.5\) is a probability; use a value in \[0, 1\]"):
        validate(ConditioningConfig, {"eta": 1.5})
    with pytest.raises(ConfigError, match="last_frame_window"):
        validate(ConditioningConfig, {"last_frame_window": 0})
