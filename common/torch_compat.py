"""Makes `import torchvision` work against the CPU build of torch.

The torchvision wheel that matches torch 2.13.0 is a CUDA build; its C++ ops do not load against CPU
torch, and its import then fails registering fake kernels for `torchvision::nms` / `qnms`. Defining
just those two op schemas (only when they are missing) lets transforms and models import, which is all
open_clip and EasyOCR need. `torchvision.ops` stays unusable on such an install.
"""

from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries: list[torch.library.Library] = []  # kept alive: dropping a Library removes its definitions


def ensure_torchvision_importable() -> None:
    """Call before the first `import torchvision` (directly or through open_clip / easyocr)."""
    if _torchvision_ops_load():
        return
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define(schema)
            _libraries.append(lib)


def _torchvision_ops_load() -> bool:
    """True when torchvision's own C++ ops load (a matching build, e.g. CUDA torch on a GPU machine)."""
    import importlib.util
    from pathlib import Path

    if hasattr(torch.ops.torchvision, "nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to patch; the import will fail on its own terms
    lib = Path(spec.origin).parent / "_C.so"
    try:
        torch.ops.load_library(str(lib))
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.torchvision, "nms")
