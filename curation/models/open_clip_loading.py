"""Loading an open_clip model (CLIP or CoCa) from a resolved local checkpoint, never from the network.

A checkpoint is (after common.checkpoints.resolve):

- a folder in open_clip's hub layout: open_clip_config.json (the architecture) and a weights file, what
  `hf-hub:laion/...` repositories hold; loaded with open_clip's `local-dir:` schema;
- a folder holding only a weights file (some hub repositories), or a weights file itself
  (.safetensors / .bin / .pt / .pth): the architecture is then the recipe's `model` name.

Weights load with safetensors or torch.load(weights_only=True). Towers open_clip builds from Hugging Face
or timm names (SigLIP, XLM-R text, ...) are never fetched for their base weights; a warning says so when
their configs or tokenizers could still be fetched because HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.checkpoints import MissingCheckpoint

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's own preference when a folder holds several weight files (factory._find_checkpoint_in_dir).
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                     "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class OpenClip:
    model: Any
    preprocess: Any      # open_clip's inference transform (PIL image -> tensor)
    tokenizer: Any
    model_cfg: dict      # the architecture: embed_dim, vision_cfg, text_cfg (and multimodal_cfg for CoCa)
    identity: str        # what scored the ledger rows: the folder, or "<model>:<file>"


def load_open_clip(path: Path, model: str, role: str, source: str, model_role: str, *, device: Any = "cpu",
                   precision: str = "fp32") -> OpenClip:
    """`path`: the resolved checkpoint of recipe key `role` (written `source` in the recipe); `model`: the
    architecture name (recipe key `model_role`) used when the checkpoint carries none. `precision` is
    open_clip's (fp32, pure_bf16...)."""
    from common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    path = Path(path)
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        if not any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS):
            raise MissingCheckpoint(
                f"{role}: {path} has {OPEN_CLIP_CONFIG} but no weights ({' or '.join(OPEN_CLIP_WEIGHTS[:3])}); "
                "copy the weights file into it (for an hf-hub repository: `hf download REPO open_clip_model.safetensors`)")
        name, pretrained, identity = f"local-dir:{path}", None, source
        model_cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        arch = f"the architecture in {path / OPEN_CLIP_CONFIG}"
    else:
        weights = _weights_file(path, role)
        model_cfg = open_clip.get_model_config(model)
        if model_cfg is None:
            raise ValueError(f"open_clip has no architecture named {model!r}; set {model_role} to the one "
                             f"{weights.name} was trained as (`python -c \"import open_clip; "
                             "print(open_clip.list_models())\"` lists them)")
        name, pretrained, identity = model, str(weights), f"{model}:{source}"
        arch = f"architecture {model}"
    _warn_hub_parts(model_cfg, path)
    try:
        # pretrained_text/image=False: never fetch a Hugging Face or timm tower's base weights; the checkpoint has them.
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision, pretrained_image=False,
            pretrained_text=False, weights_only=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{role} {path} does not load into {arch}: the weights were made for another architecture. "
                         f"For a single file set {model_role} to the one it was trained with (e.g. "
                         "ViT-L-14-quickgelu for OpenAI's ViT-L/14, ViT-L-14 for LAION's); open_clip hub folders "
                         f"carry their own. open_clip said: {detail}") from e
    return OpenClip(net.eval(), preprocess, open_clip.get_tokenizer(name), model_cfg, identity)


def save_open_clip_folder(model: Any, model_cfg: dict, preprocess_cfg: dict, folder: Path) -> Path:
    """Writes `model` in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors), the
    layout `load_open_clip` reads as a folder and hf-hub repositories hold."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / OPEN_CLIP_WEIGHTS[0]))
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                      indent=2) + "\n")
    return folder


def _weights_file(path: Path, role: str) -> Path:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{role} {path} is neither a folder nor a weights file ({', '.join(WEIGHT_SUFFIXES)}); "
                             "point it at one of them")
        return path
    for name in OPEN_CLIP_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise MissingCheckpoint(f"{role}: {path} holds no open_clip weights (one of {', '.join(OPEN_CLIP_WEIGHTS[:3])}) "
                            f"and no {OPEN_CLIP_CONFIG}; point it at a weights file or a folder holding one")


def _warn_hub_parts(model_cfg: dict | None, path: Path) -> None:
    """open_clip builds some towers/tokenizers from Hugging Face or timm names (SigLIP, XLM-R text, ...),
    fetched from the Hub by transformers/timm themselves unless the cache has them."""
    text, vision = (model_cfg or {}).get("text_cfg", {}), (model_cfg or {}).get("vision_cfg", {})
    names = [n for n in (text.get("hf_model_name"), text.get("hf_tokenizer_name"), vision.get("timm_model_name")) if n]
    if names and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        log.warning("the architecture of %s builds parts from %s through transformers/timm, which may download "
                    "them; set HF_HUB_OFFLINE=1 so that a missing part fails instead", path, ", ".join(names))


def open_clip_models() -> set[str] | None:
    """open_clip's architecture names: its bundled configs, found without importing it (that pulls in
    torchvision), plus any registered at run time (open_clip.add_model_config) when it is imported."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    names = {p.stem for p in folder.glob("*.json")}
    if "open_clip" in sys.modules:
        names |= set(sys.modules["open_clip"].list_models())
    return names or None
