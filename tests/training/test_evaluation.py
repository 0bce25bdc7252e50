"""The held-out loss: fixed per clip and sigma (not per batch), and it tells a trained model from an untrained one."""

from __future__ import annotations

import pytest
import torch

from tests.training.conftest import build_tiny
from tests.training.train_helpers import make_shards, shard_data


def heldout_loss(shards, model, batch_size: int, seed: int = 0, sigmas=(0.2, 1.0, 5.0)) -> dict[str, float]:
    from shards.config import LoaderConfig
    from training.model.conditioning import ConditioningConfig
    from training.model.edm import ObjectiveConfig
    from training.evaluation import EvalConfig, HeldOutEval
    from training.train_step import DenoiserTrainModule, FrozenEncoders

    loader = LoaderConfig(**shard_data(shards, batch_size=4)["shards"])
    config = EvalConfig(query="true", sigmas=list(sigmas), seed=seed, batch_size=batch_size)
    module = DenoiserTrainModule(model, ObjectiveConfig(), ConditioningConfig())
    encoders = FrozenEncoders(model, torch.device("cpu"), 127.0)
    return HeldOutEval(config, loader, encoders, module, rank=0, world_size=1, device=torch.device("cpu")).run()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("eval"), num_clips=9)


def test_heldout_loss_is_a_function_of_the_clips_not_of_batching(shards):
    model = build_tiny()
    one = heldout_loss(shards, model, batch_size=1)
    three = heldout_loss(shards, model, batch_size=3)
    assert one["eval_samples"] == three["eval_samples"] == 7  # 9 clips, of which fake_run drops 2 (every 4th)
    for key in ("eval_loss", "eval_loss_sigma_0.2", "eval_loss_sigma_1", "eval_loss_sigma_5"):
        assert one[key] == pytest.approx(three[key], rel=1e-4), key
    assert one["eval_loss"] == pytest.approx((one["eval_loss_sigma_0.2"] + one["eval_loss_sigma_1"]
                                              + one["eval_loss_sigma_5"]) / 3)
    other_noise = heldout_loss(shards, model, batch_size=3, seed=1)
    assert other_noise["eval_loss"] != pytest.approx(one["eval_loss"], rel=1e-6)


def test_heldout_loss_differs_between_models(shards):
    a = heldout_loss(shards, build_tiny(seed=0), batch_size=3)["eval_loss"]
    b = heldout_loss(shards, build_tiny(seed=1), batch_size=3)["eval_loss"]
    assert a != pytest.approx(b, rel=1e-3)


def test_eval_needs_shards():
    from common.config import ConfigError, validate
    from training.stage_config import TrainConfig
    from tests.training.train_helpers import stage_tree, synthetic_data

    tree = stage_tree("/tmp/unused", synthetic_data(), eval={"query": "true"})
    with pytest.raises(ConfigError, match="need data.source=shards"):
        validate(TrainConfig, tree)
    tree = stage_tree("/tmp/unused", synthetic_data(), eval={"sigmas": [0.0, 1.0]})
    with pytest.raises(ConfigError, match="positive noise levels"):
        validate(TrainConfig, tree)


@pytest.mark.slow  # two ranks under torchrun and ZeRO-3: 30 s on two idle cores, minutes on busy ones
def test_heldout_loss_is_the_same_on_two_ranks_under_zero3(tmp_path):
    """Ranks split the held-out clips unevenly (3 clips, 2 ranks: one rank repeats a batch it does not count)
    and ZeRO-3 gathers weights in every forward: the loss is the one rank's. lr ~0: both runs keep the init."""
    import json

    from common.config import validate
    from tests.training.train_helpers import python, run, stage_tree, write_recipe
    from training.loop import Trainer
    from training.stage_config import TrainConfig

    shards = make_shards(tmp_path, num_clips=12)
    result = {}
    for n in (1, 2):
        tree = stage_tree(tmp_path / f"out{n}", shard_data(shards, batch_size=1, image_ratio=0.0), steps=2,
                          eval={"query": "clip_index == 0", "sigmas": [0.5, 2.0], "batch_size": 1, "every": 1},
                          optimizer={"lr": 1e-12}, schedule={"warmup_steps": 0}, ema={"enabled": False},
                          deepspeed={"zero_stage": 3})
        if n == 1:
            Trainer(validate(TrainConfig, tree)).run()
        else:
            run([python(), "-m", "jobs.cli", "train", str(write_recipe(tmp_path / "r.yaml", tree)), "--nproc", "2"])
        result[n] = json.loads((tmp_path / f"out{n}" / "eval.json").read_text())
        records = (tmp_path / f"out{n}" / "eval.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in records] == [1, 2]  # every step, the last once
    assert result[1]["eval_samples"] == result[2]["eval_samples"] == 3
    assert result[2]["eval_loss"] == pytest.approx(result[1]["eval_loss"], rel=1e-5)


def test_a_run_stopped_before_its_final_evaluation_evaluates_on_rerun_without_training(shards, tmp_path):
    """A stage killed after its last checkpoint but before eval.json (what `lvd calibrate` waits for): the
    re-run trains no step and writes the evaluation."""
    import json

    from common.config import validate
    from tests.training.train_helpers import stage_tree
    from training.loop import Trainer
    from training.stage_config import TrainConfig

    out = tmp_path / "stage"
    tree = stage_tree(out, shard_data(shards, batch_size=2, image_ratio=0.0), steps=2,
                      eval={"query": "clip_index == 0", "sigmas": [1.0]}, checkpoint={"every": 2})
    Trainer(validate(TrainConfig, tree)).run()
    first = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()
    metrics_before = (out / "metrics.jsonl").read_text()
    summary = Trainer(validate(TrainConfig, tree)).run()
    assert summary.start_step == summary.steps == 2
    assert (out / "metrics.jsonl").read_text() == metrics_before  # no step trained
    again = json.loads((out / "eval.json").read_text())
    assert again["step"] == 2 and again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
