"""`lvd bench train`: training throughput and the share of step time spent waiting for data, measured in one run
on real shards (streamed and decoded by the shard loader's workers) and on synthetic batches already in
memory, with the same model, batch shape and number of steps. The goal is data wait < 2%: the loader keeps up
when the shards' throughput is that of the in-memory batches.

Both runs are the real training loop (DeepSpeed, one rank, this process); the first `warmup` steps (loader
workers starting, first allocations) are not counted.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import apply_overrides, validate


@dataclass
class BenchLine:
    name: str
    samples_per_s: float
    data_wait: float
    step_s: float

    def line(self) -> str:
        return (f"  {self.name:<44}{self.samples_per_s:9.2f} samples/s   {self.step_s * 1000:8.1f} ms/step   "
                f"data wait {self.data_wait:6.2%}")


def base_tree(output: Path, steps: int, batch_size: int, num_frames: int, size: tuple[int, int]) -> dict[str, Any]:
    return {"name": "bench", "output": str(output), "steps": steps, "model": {"preset": "tiny"},
            "objective": {"p_mean": 0.0, "p_std": 1.2}, "optimizer": {"lr": 1e-4},
            "deepspeed": {"zero_stage": 1, "precision": "fp32"}, "ema": {"enabled": True, "decay": 0.999},
            "checkpoint": {"every": 10**9}, "logging": {"every": 1, "report_to": []},
            "data": {"source": "synthetic", "synthetic": {"num_samples": 8 * batch_size, "batch_size": batch_size,
                                                          "num_frames": num_frames, "height": size[0],
                                                          "width": size[1]}}}


def measure(tree: dict[str, Any], warmup: int, name: str) -> BenchLine:
    from training.loop import Trainer
    from training.stage_config import TrainConfig

    config = validate(TrainConfig, tree, source="bench recipe")
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's own lines; the bench prints its table
        Trainer(config).run()
    records = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    if not 1 <= warmup <= len(records) - 2:
        raise ValueError(f"warmup ({warmup}) must be at least 1 and leave 2 steps of the {len(records)} run")
    before, counted = records[warmup - 1:-1], records[warmup:]
    durations = [b["time"] - a["time"] for a, b in zip(before, counted)]
    seconds = sum(durations)
    # one rank and one batch shape: every step trains batch_size samples
    samples = config.data.micro_batch_size * len(counted)
    wait = sum(r["data_wait"] * d for r, d in zip(counted, durations)) / max(seconds, 1e-9)
    return BenchLine(name, samples / max(seconds, 1e-9), wait, seconds / len(counted))


def run_bench(steps: int = 30, warmup: int = 5, batch_size: int = 2, num_frames: int = 4,
              size: tuple[int, int] = (32, 48), clips: int = 24, workers: int = 2, latents: bool = False,
              shards: str | None = None, overrides: list[str] | None = None) -> list[str]:
    import torch

    overrides = overrides or []
    lines = [f"lvd bench train: tiny model, batches of {batch_size} x {num_frames} frames at {size[0]}x{size[1]}, 1 rank "
             f"on {'cuda' if torch.cuda.is_available() else 'cpu'}, {steps} steps ({warmup} warm-up steps not counted)"]
    results: list[BenchLine] = []
    with tempfile.TemporaryDirectory(prefix="lvd-bench-train-") as tmp:
        root = Path(tmp)
        if shards is None:
            from shards.config import ShardWriteConfig
            from curation.testing.fake_runs import fake_run
            from shards.writer import write_shards

            # clips of 2 s at 8 fps, at twice the training size (decoding and resizing are real work)
            fake_run(root / "run", num_clips=clips, num_frames=16, fps=8.0,
                     sizes=[(size[0] * 2, size[1] * 2)], dropped_every=0, failed=0)
            write_shards(root / "run", root / "shards", ShardWriteConfig(shard_max_bytes="1MB"))
            shards = str(root / "shards")
        loader = {"shards": shards, "batch_size": batch_size, "num_frames": [num_frames], "fps": 4.0,
                  "resolutions": [list(size)], "num_workers": workers, "prefetch_factor": 4, "remainder": "pad"}
        tree = base_tree(root / "real", steps, batch_size, num_frames, size)
        tree["data"] = {"source": "shards", "shards": loader}
        results.append(measure(apply_overrides(tree, overrides), warmup, f"real shards ({workers} loader workers)"))
        if latents:
            from training.precompute import PrecomputeConfig, precompute

            precompute(PrecomputeConfig(shards=shards, output=str(root / "latents"), model=str(root / "real"),
                                        num_frames=num_frames, fps=4.0, resolutions=[size], batch_size=4))
            tree = base_tree(root / "lat", steps, batch_size, num_frames, size)
            tree["data"] = {"source": "shards", "shards": {**loader, "shards": str(root / "latents")}}
            results.append(measure(apply_overrides(tree, overrides), warmup, "precomputed latents + text shards"))
        tree = base_tree(root / "synthetic", steps, batch_size, num_frames, size)
        results.append(measure(apply_overrides(tree, overrides), warmup, "synthetic in-memory batches"))
    lines += [r.line() for r in results]
    real, synthetic = results[0], results[-1]
    verdict = "met" if real.data_wait < 0.02 else "NOT met"
    lines.append(f"  real shards reach {real.samples_per_s / max(synthetic.samples_per_s, 1e-9):.0%} of the in-memory "
                 f"throughput; data wait {real.data_wait:.2%} (goal < 2%: {verdict})")
    return lines
