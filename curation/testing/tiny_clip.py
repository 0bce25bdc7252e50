"""Tiny random-weight stand-ins for the CLIP stage: an open_clip CLIP and aesthetic heads.

They are written in the same layout as the real checkpoints, so the stage loads them through the path
a user's checkpoint takes:

- the CLIP as an open_clip hub folder: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and
  `open_clip_model.safetensors`, what `hf-hub:laion/...` repositories hold and open_clip's `local-dir:`
  loader reads (a 32 px ViT with one block, a one-block text tower with the standard 49408-token
  vocabulary and a 16-token context; ~1.6 M parameters, almost all the token embedding: ~6.5 MB);
- heads as .safetensors state dicts in the improved-aesthetic-predictor MLP or the single-linear format.

Each folder is marked with `common.checkpoints.mark_random`, so every run that uses one says its scores
mean nothing. `make demo` (through curation.testing.tiny_models) and the tests build them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from common.checkpoints import mark_random

TINY_EMBED_DIM = 32
TINY_MODEL_CFG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# open_clip's OpenAI preprocessing (what the LAION ViT-L/14 hub configs carry too)
TINY_PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"}


def write_tiny_open_clip(folder: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random open_clip CLIP into `folder` (open_clip's hub layout) and returns the folder."""
    from common.torch_compat import ensure_torchvision_importable
    from curation.models.open_clip_loading import save_open_clip_folder

    ensure_torchvision_importable()
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_MODEL_CFG)))
    folder = save_open_clip_folder(model, TINY_MODEL_CFG, TINY_PREPROCESS_CFG, Path(folder))
    mark_random(folder, "tiny open_clip CLIP (clip.checkpoint)")
    return folder


def write_tiny_aesthetic_head(path: str | Path, embed_dim: int = TINY_EMBED_DIM,
                              kind: Literal["mlp", "linear"] = "mlp", seed: int = 0) -> Path:
    """Writes a random aesthetic head for `embed_dim`-dimensional embeddings to `path` (.safetensors) and
    marks its folder as random weights."""
    from safetensors.torch import save_file

    from curation.models.aesthetic import AestheticLinear, AestheticMLP

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: tiny heads are written as .safetensors")
    if kind not in ("mlp", "linear"):
        raise ValueError(f"kind {kind!r}: write 'mlp' (improved aesthetic predictor) or 'linear' (aesthetic v1)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticMLP(embed_dim) if kind == "mlp" else AestheticLinear(embed_dim)
        # Biases centre the scores around 5 like the real heads, so a demo's threshold has something to cut.
        last = head.layers[-1] if kind == "mlp" else head
        torch.nn.init.constant_(last.bias, 5.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}, str(path))
    mark_random(path.parent, f"tiny aesthetic head ({kind}, clip.aesthetic_head)")
    return path


def write_tiny_clip_assets(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """The tiny CLIP (`folder`/clip) and an MLP head (`folder`/aesthetic/head.safetensors); returns the
    `clip` recipe keys that point at them ({"checkpoint": ..., "aesthetic_head": ...})."""
    folder = Path(folder)
    clip = write_tiny_open_clip(folder / "clip", seed=seed)
    head = write_tiny_aesthetic_head(folder / "aesthetic" / "head.safetensors", TINY_EMBED_DIM, "mlp", seed=seed)
    return {"checkpoint": str(clip), "aesthetic_head": str(head)}
