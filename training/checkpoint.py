"""Training checkpoints: DeepSpeed's (model, optimizer, LR scheduler, ZeRO partitions) plus what lvd adds,
in one folder per step, and the `latest` pointer written last.

    OUT/checkpoints/latest                     the tag of the newest complete checkpoint
    OUT/checkpoints/step_00000100/             DeepSpeed's files (mp_rank_*, zero_pp_rank_*_optim_states)
        lvd_state.json                         step, samples seen, loader state, world size, ZeRO stage
        rng/rank_00000.json                    each rank's torch / numpy / python RNG states
        ema.safetensors                        the EMA (rank 0's fp32 averages)
    OUT/checkpoints/step_00000100_universal/   made on demand: DeepSpeed's universal checkpoint, for a resume
                                               on another number of ranks

A kill at any moment leaves `latest` on the previous complete checkpoint: lvd's files are written before
DeepSpeed's, and `latest` is replaced (atomically, by rank 0) only after every rank has finished writing.
Everything lvd writes is JSON or safetensors; DeepSpeed's own files are its torch.save pickles, read (by
DeepSpeed, in this process and in ds_to_universal) with torch's weights-only unpickler only
(training/weights_only.py): a planted file that would run code is refused with an error naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.weights_only import unsafe_checkpoint_error, weights_only_loads

LATEST = "latest"
STATE_FILE = "lvd_state.json"
EMA_FILE = "ema.safetensors"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """The process's global RNG states as JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


class CheckpointStore:
    """The checkpoints of one stage (OUT/checkpoints). Every method that touches DeepSpeed is collective."""

    def __init__(self, root: str | Path, rank: int, world_size: int) -> None:
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag / STATE_FILE).is_file():
            raise ValueError(f"{pointer} names {tag}, which has no {STATE_FILE}; the checkpoint folder was edited by "
                             "hand. Point `latest` at a complete step_* folder or remove it to start over")
        return tag

    def read_state(self, tag: str) -> dict[str, Any]:
        return json.loads((self.root / tag / STATE_FILE).read_text())

    def save(self, engine: Any, step: int, state: dict[str, Any], ema: Any | None, keep_last: int) -> str:
        """Writes checkpoint `step` (collective). `state` is lvd's part (loader state etc.), from rank 0."""
        import torch.distributed as dist

        tag = tag_for(step)
        folder = self.root / tag
        (folder / "rng").mkdir(parents=True, exist_ok=True)
        _write_json_atomic(folder / "rng" / f"rank_{self.rank:05d}.json", rng_state())
        if self.rank == 0:
            if ema is not None:
                ema.save(folder / EMA_FILE)
            _write_json_atomic(folder / STATE_FILE, {**state, "step": step, "world_size": self.world_size})
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        dist.barrier()  # every rank's files are on disk before `latest` moves
        if self.rank == 0:
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / LATEST)
            for old in self._prune(keep_last, tag):
                print(f"checkpoint {self.root / old} removed (checkpoint.keep_last: {keep_last})", flush=True)
        dist.barrier()
        return tag

    def _prune(self, keep_last: int, current: str) -> list[str]:
        """Removes all but the newest `keep_last` checkpoints (and `current`); returns the removed tags."""
        if keep_last <= 0:
            return []
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
        keep = set(tags[-keep_last:]) | {current}
        removed = [tag for tag in tags if tag not in keep]
        for tag in removed:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            shutil.rmtree(self.root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        return removed

    def needs_universal(self, tag: str, zero_stage: int) -> bool:
        """A ZeRO checkpoint is partitioned for the world size it was saved with; another one needs the
        universal form. (Without ZeRO every rank holds everything and the plain checkpoint loads anywhere.)"""
        saved = self.read_state(tag)
        return saved["world_size"] != self.world_size and (saved.get("zero_stage", 0) > 0 or zero_stage > 0)

    def make_universal(self, tag: str) -> str:
        """Converts checkpoint `tag` to DeepSpeed's universal form (rank 0, once; collective wait)."""
        import torch.distributed as dist

        out = tag + UNIVERSAL_SUFFIX
        if self.rank == 0 and not (self.root / out / "zero").is_dir():
            tmp = self.root / (out + ".tmp")
            convert_to_universal(self.root / tag, tmp)
            shutil.rmtree(self.root / out, ignore_errors=True)
            os.replace(tmp, self.root / out)
        dist.barrier()
        return out

    def load(self, engine: Any, tag: str, universal_tag: str | None) -> dict[str, Any]:
        """Loads DeepSpeed's state (from the universal form when given) and this rank's RNG; returns lvd's state."""
        loaded = universal_tag or tag
        try:
            with weights_only_loads():
                path, _ = engine.load_checkpoint(str(self.root), tag=loaded, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
        except pickle.UnpicklingError as e:
            raise unsafe_checkpoint_error(self.root / loaded) or e
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {universal_tag or tag} in {self.root}")
        state = self.read_state(tag)
        rng = self.root / tag / "rng" / f"rank_{self.rank:05d}.json"
        if state["world_size"] == self.world_size and rng.is_file():
            set_rng_state(json.loads(rng.read_text()))
        return state

    def ema_file(self, tag: str) -> Path:
        return self.root / tag / EMA_FILE


def convert_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on checkpoint `folder`, in a subprocess whose loads are weights-only; writes
    `out` (replaced). A file the weights-only unpickler refuses fails it with UnsafeCheckpoint, naming the file."""
    workers = min(4, os.cpu_count() or 1)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.weights_only", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(folder), "--output_folder", str(out), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        unsafe = unsafe_checkpoint_error(folder)
        if unsafe is not None:
            raise unsafe
        raise RuntimeError(f"ds_to_universal failed on {folder}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
