"""FVD of a proxy's samples: the Fréchet distance between VideoMAE features of videos the proxy generates and
of the held-out clips (mean and covariance of each set; lower is better).

A video's feature is a transformers VideoMAEModel's last hidden state, mean-pooled over its tokens (I3D, the
extractor of the original FVD, is not on PyPI, so values do not compare with published FVDs). One video is
generated per held-out clip, from that clip's caption alone (fixed seeds), so both sets share their prompts.
The number means something only with a real, pretrained extractor and many samples (hundreds or more: the
covariance of d-dimensional features from fewer than d videos is singular); with a random-weight stand-in and
a handful of clips it exercises the code path only."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydantic
import torch

from common.config import Config

# VideoMAEImageProcessor's normalisation (ImageNet's)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class FvdConfig(Config):
    """The feature extractor and the samples of the FVD metric."""

    checkpoint: str
    """A transformers VideoMAE model: a local save_pretrained folder or a Hugging Face name already in the
    cache (never downloaded), e.g. MCG-NJU/videomae-base."""
    num_frames: int = 16
    """Frames of each generated video (resampled in time to the extractor's num_frames)."""
    size: tuple[int, int] = (256, 256)
    """Height, width of the generated videos (multiples of the model's pixel multiple)."""
    num_samples: int | None = None
    """Held-out clips (and generated videos) to compare; None: every held-out clip."""
    num_steps: int = 25
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> FvdConfig:
        if self.num_frames < 1 or self.num_steps < 1:
            raise ValueError(f"fvd.num_frames ({self.num_frames}) and fvd.num_steps ({self.num_steps}) must be >= 1")
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError(f"fvd.num_samples ({self.num_samples}) must be at least 2 (a covariance needs two "
                             "videos; a meaningful FVD hundreds)")
        return self


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two N x D feature sets."""
    from scipy.linalg import LinAlgWarning, sqrtm

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)
        try:
            root = sqrtm(cov_a @ cov_b)
        except LinAlgWarning:
            root = None
    if root is None or not np.isfinite(root).all():
        # singular product (fewer videos than dimensions): regularise, as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        root = sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(np.real(root)))


class VideoMAEFeatures:
    """uint8 T x H x W x 3 videos -> one feature vector each (mean-pooled last hidden state)."""

    def __init__(self, checkpoint: str | Path, device: torch.device | None = None) -> None:
        from common.torch_compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # transformers' modeling imports torchvision
        from transformers import VideoMAEModel

        self.device = device or torch.device("cpu")
        try:
            self.model = VideoMAEModel.from_pretrained(str(checkpoint), local_files_only=True, use_safetensors=True)
        except OSError as e:
            raise ValueError(f"fvd.checkpoint {checkpoint}: no VideoMAE model there or in the Hugging Face cache "
                             f"({str(e).splitlines()[0]}); save one with save_pretrained and name its folder") from None
        self.model = self.model.to(self.device).eval()
        self.num_frames, self.size = self.model.config.num_frames, self.model.config.image_size

    def _pixels(self, video: np.ndarray) -> torch.Tensor:
        idx = np.linspace(0, len(video) - 1, self.num_frames).round().astype(int)
        x = torch.from_numpy(np.ascontiguousarray(video[idx])).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                            antialias=True)
        return (x - MEAN) / STD

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> np.ndarray:
        pixels = torch.stack([self._pixels(v) for v in videos]).to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state.mean(1).double().cpu().numpy()


def heldout_videos(loader_config, heldout: str, limit: int | None) -> tuple[list[np.ndarray], list[str]]:
    """The held-out clips (as the held-out loss reads them) as uint8 videos, with their fixed captions."""
    from shards.loader import ShardLoader
    from training.evaluation import EvalConfig, FixedCaptions, heldout_loader_config
    from training.sample.media import to_uint8

    config = heldout_loader_config(loader_config, EvalConfig(subset=heldout))
    captions = FixedCaptions(config)
    videos, texts = [], []
    for batch in ShardLoader(config, rank=0, world_size=1):
        if "frames_BTCHW" not in batch:
            raise ValueError("fvd needs the held-out clips' frames; the proxy trains on precomputed latents "
                             "(remove fvd, or calibrate on shards with frames)")
        videos += [to_uint8(f) for f in batch["frames_BTCHW"]]
        texts += captions(list(batch["key"]))
        if limit is not None and len(videos) >= limit:
            break
    return videos[:limit], texts[:limit]


@torch.no_grad()
def fvd(model_dir: str | Path, config: FvdConfig, sampler, loader_config, heldout: str) -> float:
    """FVD between the model at `model_dir`'s samples for the held-out captions and the held-out clips."""
    from training.model.export import load_pretrained
    from training.sample.media import to_uint8
    from training.model.sampler import sample_long

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference, captions = heldout_videos(loader_config, heldout, config.num_samples)
    features = VideoMAEFeatures(config.checkpoint, device)
    model = load_pretrained(model_dir).to(device).eval()
    mc = model.config
    h, w = config.size
    if h % mc.pixel_multiple or w % mc.pixel_multiple:
        raise ValueError(f"fvd.size {h}x{w} must be multiples of {mc.pixel_multiple} for this model")
    steps = sampler.model_copy(update={"num_steps": config.num_steps})
    generated = []
    for i, caption in enumerate(captions):
        generator = torch.Generator(device).manual_seed(config.seed + i)
        clips = sample_long(model.denoise, model.encode_text([caption]), None, None, config.num_frames, 1,
                            (h // mc.vae.downsample, w // mc.vae.downsample), steps, mc.latent_channels,
                            model.scaling_factor, generator)
        generated.append(to_uint8(model.decode_latents(clips[0])[0]))
    return frechet_distance(features(generated), features(reference))
