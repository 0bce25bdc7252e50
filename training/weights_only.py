"""DeepSpeed's checkpoint files read with torch's weights-only unpickler, so a resume never runs code.

DeepSpeed saves its state (model, optimizer, ZeRO partitions, the universal form) as torch.save pickles and
reads them back with `torch.load(weights_only=False)` from a dozen places: its checkpoint engine, the
universal-checkpoint loader, ds_to_universal and zero_to_fp32. A file planted in OUT/checkpoints/ would run
arbitrary code on the next resume. `TORCH_FORCE_WEIGHTS_ONLY_LOAD` makes every one of those calls use the
weights-only unpickler (tensors, containers, numbers, strings), and the allow-list below admits the only
other types DeepSpeed's state holds: plain-data classes that the unpickler fills in without calling any
code of theirs.

    python -m training.weights_only deepspeed.utils.zero_to_fp32 OUT/checkpoints OUT/fp32 --safe_serialization

runs one of DeepSpeed's checkpoint tools (any module, with its arguments) under the same rule.
"""

from __future__ import annotations

import os
import pickle
import re
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds objects outside the weights-only allow-list; it was not loaded."""


def deepspeed_state_types() -> list[Any]:
    """The non-tensor types in DeepSpeed's checkpoints (ZeRO 0-3, fp32/bf16/fp16, the universal form)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # DynamicLossScaler: fp16 (deepspeed.extra) saves it where bf16/fp32 save a LossScaler
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load of this process is weights-only (whatever the caller passes) and admits
    DeepSpeed's state types."""
    import torch

    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def refused_files(folder: Path) -> dict[Path, str]:
    """The torch files under `folder` that the weights-only unpickler refuses, with torch's reason. Tensor
    data is memory-mapped, not read, so this costs about one parse of each file's pickle."""
    import torch

    refused: dict[Path, str] = {}
    with weights_only_loads():
        for path in sorted(p for p in folder.rglob("*.pt") if p.is_file()):
            try:
                try:
                    torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError as e:  # a legacy (non-zip) file cannot be mapped: read it
                    if "mmap" not in str(e):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                refused[path] = _reason(str(e))
    return refused


def _reason(message: str) -> str:
    """torch's weights-only error is paragraphs long; keep what was refused."""
    named = re.search(r"GLOBAL (\S+)", message)
    if named:
        return f"it refers to {named.group(1)}"
    lines = message.strip().splitlines()
    return lines[-1] if lines else "it is not a weights-only file"


def unsafe_checkpoint_error(folder: Path) -> UnsafeCheckpoint | None:
    """The error naming the refused files under `folder`, or None when every file loads weights-only."""
    refused = refused_files(folder)
    if not refused:
        return None
    path, reason = next(iter(refused.items()))
    more = f" (and {len(refused) - 1} more file(s) like it)" if len(refused) > 1 else ""
    return UnsafeCheckpoint(
        f"refusing to load checkpoint file {path}{more}: {reason}, which is neither a tensor nor DeepSpeed state, so "
        f"unpickling it could run code. DeepSpeed does not write such files: delete {folder} and resume from an "
        f"earlier checkpoint (write its tag into {folder.parent / 'latest'}) or start over")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    import torch

    # the process and the workers it forks (ds_to_universal's extract pool) inherit both
    os.environ[FORCE_ENV] = "1"
    torch.serialization.add_safe_globals(deepspeed_state_types())
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
