"""What a training run reports: one line per log step from rank 0, the same values in metrics.jsonl and
TensorBoard, and a stage summary at the end.

    step 120/1000 | loss 0.4123 | grad 0.91 | lr 1.0e-04 | 38.2 samples/s | data wait 0.8% | encode 3% | corrupt 0 | mem 12.3 GB | ETA 6m12s

`data wait` is the share of wall time spent waiting for the next batch (the loader, not the VAE encode,
which is compute and is reported as `encode`); samples/s counts every rank's samples; `corrupt` is how many
samples the loaders of every rank skipped as corrupt since the last log line (shards/loader.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on a GPU; the process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class IntervalTimes:
    """Wall time, data wait and encode time since the last log step, on this rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.encode = 0.0
        self.samples = 0
        self.corrupt = 0
        self.steps = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class StageSummary:
    """What a stage did, written to OUT/summary.json and printed at the end."""

    name: str
    output: str
    steps: int
    start_step: int
    samples: int
    seconds: float
    samples_per_s: float
    data_wait_fraction: float
    final_loss: float | None
    world_size: int
    trainable_parameters: int
    export: str | None
    checkpoint: str | None
    resumed_from: str | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    tensorboard: str | None = None  # the TensorBoard log folder, when one was written

    def lines(self) -> list[str]:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        return [f"stage {self.name}: steps {self.start_step}->{self.steps} on {self.world_size} rank(s) in "
                f"{format_duration(self.seconds)}, {int(self.samples)} samples ({self.samples_per_s:.1f}/s), data wait "
                f"{self.data_wait_fraction:.1%}, final loss {loss}, {self.trainable_parameters / 1e6:.2f}M trained "
                f"parameters" + (f", resumed from {self.resumed_from}" if self.resumed_from else ""),
                f"  model: {self.export}   checkpoint: {self.checkpoint}"] + \
            ([f"  TensorBoard: tensorboard --logdir {self.tensorboard}"] if self.tensorboard else [])

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


class MetricsLogger:
    """Rank 0's sink: the printed line, OUT/metrics.jsonl, and the trackers of `report_to` (training/trackers.py:
    OUT/tensorboard/, wandb, mlflow)."""

    def __init__(self, out_dir: Path, total_steps: int, report_to: list[str], rank: int, run_name: str = "lvd",
                 config: dict[str, Any] | None = None, project: str = "lvd") -> None:
        self.enabled = rank == 0
        self.out_dir = out_dir
        self.total_steps = total_steps
        self.trackers = None
        self.jsonl = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if report_to:
            from training.trackers import Trackers

            self.trackers = Trackers(report_to, out_dir, run_name, config or {}, project)

    @property
    def tensorboard_dir(self) -> str | None:
        return self.trackers.tensorboard_dir if self.trackers is not None else None

    def log(self, step: int, values: dict[str, Any], eta_s: float | None) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps}", f"loss {values['loss']:.4f}"]
        if values.get("grad_norm") is not None:
            parts.append(f"grad {values['grad_norm']:.3g}")
        parts += [f"lr {values['lr']:.2e}", f"{values['samples_per_s']:.1f} samples/s",
                  f"data wait {values['data_wait']:.1%}", f"encode {values['encode']:.0%}",
                  f"corrupt {values.get('num_corrupt', 0)}",
                  f"mem {values['memory_gb']:.2f} GB"]
        if eta_s is not None:
            parts.append(f"ETA {format_duration(eta_s)}")
        print(" | ".join(parts), flush=True)
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.trackers is not None:
            self.trackers.scalars({k: v for k, v in values.items() if isinstance(v, (int, float))}, step)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """The held-out loss: one line, a record in OUT/eval.jsonl (metrics.jsonl keeps one schema), eval/*
        scalars."""
        if not self.enabled:
            return
        per_sigma = ", ".join(f"{k.removeprefix('eval_loss_sigma_')}: {v:.4f}" for k, v in values.items()
                              if k.startswith("eval_loss_sigma_"))
        print(f"eval step {step}/{self.total_steps} | held-out loss {values['eval_loss']:.4f} | "
              f"{values['eval_samples']} clips | per sigma {per_sigma}", flush=True)
        with open(self.out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        if self.trackers is not None:
            self.trackers.scalars({k.removeprefix("eval_"): v for k, v in values.items()}, step, group="eval")

    def event(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def sample(self, video: Path, frames_TCHW_uint8: torch.Tensor, sheet_HWC_uint8: np.ndarray, step: int,
               fps: float) -> None:
        if self.trackers is not None:
            self.trackers.sample(video, frames_TCHW_uint8, sheet_HWC_uint8, step, fps)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.trackers is not None:
            self.trackers.close()
