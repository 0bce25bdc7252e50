"""FVD: the Fréchet distance on known Gaussians, and VideoMAE features from a tiny random-weight model saved
with save_pretrained and loaded through the metric's own path (a local folder, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def write_tiny_videomae(folder: Path) -> Path:
    """A random-weight VideoMAE (2 frames of 32x32, 1 layer) saved as safetensors: the extractor's stand-in."""
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=2, tubelet_size=2, hidden_size=16,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    VideoMAEModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_frechet_distance_of_known_gaussians():
    from training.calibration.fvd import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4)) @ np.diag([1.0, 2.0, 0.5, 1.5])
    shift = np.array([3.0, -1.0, 0.0, 2.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a shifted copy has the same covariance: the distance is the squared shift
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # N(0, I) vs N(0, 4I) in 4 dims: tr(I + 4I - 2 * 2I) = 4, up to sampling error
    b, c = rng.normal(size=(20000, 4)), 2 * rng.normal(size=(20000, 4))
    assert frechet_distance(b, c) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_videomae_features_are_the_mean_pooled_last_hidden_state(tmp_path, monkeypatch):
    from training.calibration.fvd import MEAN, STD, VideoMAEFeatures

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_tiny_videomae(tmp_path / "videomae")
    features = VideoMAEFeatures(folder)
    from transformers import VideoMAEModel

    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    got = features(videos)
    assert got.shape == (3, 16)
    # by hand: frames 0 and 3 (resampled to the model's 2), normalised, the model's tokens averaged
    model = VideoMAEModel.from_pretrained(folder).eval()
    pixels = torch.stack([(torch.from_numpy(v[[0, 3]]).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD for v in videos])
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state.mean(1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])  # different videos, different features


def test_a_missing_extractor_is_a_clear_error(tmp_path):
    from training.calibration.fvd import VideoMAEFeatures

    with pytest.raises(ValueError, match="fvd.checkpoint .*no VideoMAE model there"):
        VideoMAEFeatures(tmp_path / "nothing")
