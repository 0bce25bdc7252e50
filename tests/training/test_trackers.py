"""`logging.report_to`: TensorBoard, wandb and mlflow as diffusers' scripts offer them, none required."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from common.config import ConfigError, validate
from tests.training.train_helpers import stage_tree, synthetic_data
from training.stage_config import TrainConfig
from training.trackers import Trackers


def _tree(tmp_path, report_to):
    tree = stage_tree(tmp_path / "stage", synthetic_data())
    tree["logging"] = {"every": 1, "report_to": report_to}
    return tree


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_a_recipe_error_naming_it(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(ConfigError, match=rf"logging.report_to.*pip install {name}"):
        validate(TrainConfig, _tree(tmp_path, [name]))


def test_report_to_takes_one_name_or_a_list_and_rejects_unknown_ones(tmp_path):
    assert validate(TrainConfig, _tree(tmp_path, "tensorboard")).logging.report_to == ["tensorboard"]
    assert validate(TrainConfig, _tree(tmp_path, [])).logging.report_to == []
    with pytest.raises(ConfigError, match="report_to"):
        validate(TrainConfig, _tree(tmp_path, ["comet"]))


class _Recorder(types.ModuleType):
    """A stand-in package that records the calls lvd makes (the real ones need accounts and servers)."""

    def __init__(self, name):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.calls = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def call(*args, **kwargs):
            self.calls.append((attr, args, kwargs))
            return self

        return call


def test_wandb_and_mlflow_get_scalars_sample_videos_and_contact_sheets(tmp_path, monkeypatch):
    wandb, mlflow = _Recorder("wandb"), _Recorder("mlflow")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = validate(TrainConfig, _tree(tmp_path, ["wandb", "mlflow"]))
    trackers = Trackers(config.logging.report_to, tmp_path, "stage1", config.model_dump(mode="json"), "proj")
    trackers.scalars({"loss": 0.5, "lr": 1e-3}, 10)
    video = tmp_path / "step_10.mp4"
    video.write_bytes(b"mp4")
    sheet = np.zeros((8, 8, 3), np.uint8)
    trackers.sample(video, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), sheet, 10, 8.0)
    trackers.close()

    names = [c[0] for c in wandb.calls]
    assert names[0] == "init" and wandb.calls[0][2]["project"] == "proj" and wandb.calls[0][2]["name"] == "stage1"
    logs = [c for c in wandb.calls if c[0] == "log"]
    assert logs[0][1][0] == {"train/loss": 0.5, "train/lr": 1e-3} and logs[0][2] == {"step": 10}
    assert set(logs[1][1][0]) == {"samples", "samples/contact_sheet"} and logs[1][2] == {"step": 10}
    assert ("Video", (str(video),), {"format": "mp4"}) in wandb.calls and names[-1] == "finish"

    calls = {c[0]: c for c in mlflow.calls}
    assert calls["set_experiment"][1] == ("proj",) and calls["start_run"][2] == {"run_name": "stage1"}
    assert calls["log_params"][1][0]["logging.every"] == 1
    assert calls["log_metrics"][1][0] == {"train_loss": 0.5, "train_lr": 1e-3} and calls["log_metrics"][2] == {"step": 10}
    assert calls["log_artifact"][1] == (str(video),) and calls["log_image"][2]["step"] == 10
    assert mlflow.calls[-1][0] == "end_run"
