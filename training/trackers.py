"""Experiment trackers besides OUT/metrics.jsonl, named by a stage recipe's `logging.report_to` as diffusers' and
accelerate's training scripts name them: tensorboard (OUT/tensorboard/), wandb, mlflow. lvd requires none of
them; a recipe naming one whose package is missing fails before training starts, naming the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """ValueError naming the first tracker whose package is not installed, and the fix."""
    for name in names:
        try:
            found = importlib.util.find_spec(PACKAGE[name]) is not None
        except ValueError:  # a module in sys.modules without a spec (a test double) is installed enough
            found = True
        if not found:
            raise ValueError(f"logging.report_to names {name}, but the {PACKAGE[name]} package is not installed: "
                             f"pip install {PACKAGE[name]}, or leave {name} out of logging.report_to")


class Trackers:
    """Rank 0's trackers: scalars every log step, sample videos and their contact sheets as media."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, config: dict[str, Any], project: str) -> None:
        self.tensorboard = self.wandb = self.mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            # the stage folder is the run's identity: a resumed stage continues the same wandb run
            self.wandb = wandb.init(project=project, name=run_name, dir=str(out_dir), config=config,
                                    id=_run_id(out_dir), resume="allow")
        if "mlflow" in names:
            import mlflow

            mlflow.set_experiment(project)
            self.mlflow = mlflow
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: v for k, v in _flat(config).items() if v is not None})

    @property
    def tensorboard_dir(self) -> str | None:
        return self.tensorboard.log_dir if self.tensorboard is not None else None

    def scalars(self, values: dict[str, float], step: int, group: str = "train") -> None:
        """Scalars under `group` (train, eval): train/loss, eval/loss, ..."""
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{group}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{group}/{k}": v for k, v in values.items()}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"{group}_{k}": v for k, v in values.items()}, step=step)

    def sample(self, video: Path, frames_TCHW_uint8: torch.Tensor, sheet_HWC_uint8: np.ndarray, step: int,
               fps: float) -> None:
        """A sample video (its mp4 and frames) and its contact sheet."""
        if self.tensorboard is not None:
            # TensorBoard encodes videos with moviepy; without it the frames go in as images
            if importlib.util.find_spec("moviepy") is not None:
                self.tensorboard.add_video("samples", frames_TCHW_uint8[None], step, fps=max(1, int(fps)))
            else:
                self.tensorboard.add_images("samples", frames_TCHW_uint8, step)
            self.tensorboard.add_image("samples/contact_sheet", sheet_HWC_uint8, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Video(str(video), format="mp4"),
                            "samples/contact_sheet": wandb.Image(sheet_HWC_uint8)}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(video), artifact_path="samples")
            self.mlflow.log_image(sheet_HWC_uint8, key="samples_contact_sheet", step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _run_id(out_dir: Path) -> str:
    import hashlib

    return hashlib.blake2b(str(out_dir.absolute()).encode(), digest_size=8).hexdigest()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
