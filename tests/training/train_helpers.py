"""Helpers of the training-loop tests: tiny shards, stage recipes at test size, launching and reading runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def make_shards(root: Path, num_clips: int = 12) -> Path:
    """A fake curation run's kept clips as shards (no curation runs): 48x80 and 80x48 clips of 16 frames at
    8 fps, with captions."""
    from shards.config import ShardWriteConfig
    from curation.testing.fake_runs import fake_run
    from shards.writer import write_shards

    fake_run(root / "run", num_clips=num_clips, num_frames=16, fps=8.0, sizes=[(48, 80), (80, 48)], captions=True)
    write_shards(root / "run", root / "shards", ShardWriteConfig(shard_max_bytes="30KB"))
    return root / "shards"


def shard_data(shards: Path, **loader: Any) -> dict[str, Any]:
    return {"source": "shards", "shards": {
        "shards": str(shards), "batch_size": 1, "num_frames": [4], "fps": 4.0, "resolutions": [[32, 48], [48, 32]],
        "num_workers": 0, "seed": 3, "image_ratio": 0.25, "remainder": "pad", **loader}}


def synthetic_data(**synthetic: Any) -> dict[str, Any]:
    return {"source": "synthetic", "synthetic": {"num_samples": 4, "batch_size": 2, "num_frames": 4, "height": 32,
                                                 "width": 32, **synthetic}}


def stage_tree(output: Path, data: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A stage recipe at test size: the tiny model, fp32 (bf16 on a CPU is slow and not what is tested)."""
    tree: dict[str, Any] = {
        "name": "test", "output": str(output), "steps": 8, "seed": 0, "model": {"preset": "tiny"},
        "objective": {"p_mean": 0.0, "p_std": 1.2}, "data": data, "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.2},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"}, "ema": {"decay": 0.9},
        "checkpoint": {"every": 3, "keep_last": 0}, "logging": {"every": 1, "report_to": []}}
    for key, value in over.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    return tree


def write_recipe(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def losses(output: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss averaged over ranks, global grad norm), from the run's metrics.jsonl (the last record of
    each step: a resumed run appends)."""
    out: dict[int, tuple[float, float]] = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = (d["loss"], d["grad_norm"])
    return out


def unet_weights(output: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def python() -> str:
    return sys.executable
