"""LAION-style aesthetic heads: a small predictor on top of a CLIP image embedding.

Two published formats, told apart by the keys of their state dict:

- "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor, e.g.
  sac+logos+ava1-l14-linearMSE.pth): an MLP stored as `layers.{0,2,4,6,7}.{weight,bias}`:
  Linear(D, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1)
  Linear(64, 16) Linear(16, 1), with no activations (as published).
- LAION aesthetic v1 (LAION-AI/aesthetic-predictor, e.g. sa_0_4_vit_l_14_linear.pth): one Linear(D, 1)
  stored as `weight` [1, D] and `bias` [1].

Both take the L2-normalised image embedding of the CLIP model they were trained on and give a score on
a roughly 1-10 scale. A head only means something on the embeddings of that CLIP model: the ViT-L/14
heads were fit on OpenAI's CLIP ViT-L/14, not on other ViT-L/14 trainings such as LAION-2B, whose
embedding space is different although it has the same 768 dimensions.

Files are read with safetensors or `torch.load(weights_only=True)`; nothing in them is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

MLP_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
MLP_HIDDEN = (1024, 128, 64, 16)

HeadKind = Literal["mlp", "linear"]


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's MLP (the dropouts do nothing in eval mode)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticLinear(nn.Linear):
    """LAION aesthetic v1: one linear layer, stored without a prefix (`weight` [1, D], `bias` [1])."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim, 1)
        self.embed_dim = embed_dim


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a head file (.safetensors, or a torch pickle read with weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is reported with the file and the fix
        raise ValueError(f"aesthetic head {path} could not be read as a weights-only torch file "
                         f"({type(e).__name__}: {str(e)[:200]}); give a state dict saved with torch.save or a "
                         ".safetensors file") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"aesthetic head {path} holds a {type(obj).__name__}, not a state dict of tensors; "
                         "save the head's state_dict() (torch.save or safetensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def head_kind(state: dict[str, torch.Tensor], path: Path | str = "aesthetic head") -> HeadKind:
    """Which of the two formats `state` is, from its keys."""
    keys = set(state)
    mlp = {f"{p}.{w}" for p in MLP_KEYS for w in ("weight", "bias")}
    if keys == mlp:
        return "mlp"
    if keys == {"weight", "bias"}:
        return "linear"
    raise ValueError(
        f"aesthetic head {path} has keys {sorted(keys)[:12]}, which match neither known format: the improved "
        f"aesthetic predictor MLP ({', '.join(sorted(mlp))}) or a single linear layer (weight [1, D], bias [1]). "
        "Convert it to one of them or set clip.aesthetic_head: null")


def load_head(path: Path, embed_dim: int | None = None) -> nn.Module:
    """The head in `path`, in eval mode on the CPU. With `embed_dim` (the CLIP model's embedding size), a
    head made for another size is refused with a message naming both."""
    state = read_state_dict(path)
    kind = head_kind(state, path)
    first = state["layers.0.weight" if kind == "mlp" else "weight"]
    if first.ndim != 2:
        raise ValueError(f"aesthetic head {path}: first weight has shape {tuple(first.shape)}, expected [out, D]")
    head_dim = int(first.shape[1])
    if embed_dim is not None and head_dim != embed_dim:
        raise ValueError(
            f"aesthetic head {path} takes {head_dim}-dimensional embeddings but the CLIP model gives {embed_dim}: "
            f"the head was trained for another CLIP. Use the head made for this CLIP model (the LAION ViT-L/14 "
            "heads take 768, ViT-B/32 heads 512), point clip.checkpoint at the CLIP the head was trained on, "
            "or set clip.aesthetic_head: null")
    module: nn.Module = AestheticMLP(head_dim) if kind == "mlp" else AestheticLinear(head_dim)
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # shapes of the inner layers do not match the published architecture
        raise ValueError(f"aesthetic head {path} ({kind}) does not fit the published architecture: "
                         f"{str(e)[:300]}") from e
    return module.eval()
