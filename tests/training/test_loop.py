"""The training loop in one process (a world of one): it learns a tiny fixed dataset, writes what a stage writes,
exports a model `lvd sample` loads, and trains only what the stage says (here under ZeRO-3 with gradient
checkpointing)."""

from __future__ import annotations

import json

import pytest
import torch

from common.config import validate
from tests.training.train_helpers import stage_tree, synthetic_data
from training.stage_config import TrainConfig

pytestmark = pytest.mark.timeout(400)


def _eval_loss(model, config: TrainConfig) -> float:
    """The diffusion loss of the whole dataset under fixed draws (sigmas, noise, dropouts), averaged over 8
    draws: the same number before and after training, unlike the noisy per-step training loss."""
    from training.data import SyntheticBatches
    from training.model.network import TrainBatch

    data = SyntheticBatches(config.data.synthetic)
    batch = next(iter(data))
    with torch.no_grad():
        latents = model.encode_frames(batch["frames_BTCHW"].float() / 127.5 - 1.0)
        text = model.encode_text(batch["caption"])
        train = TrainBatch(latents, text, batch["fps_B"], batch["motion_bucket_B"], batch["is_image_B"])
        losses = [model.training_loss(train, config.objective, config.conditioning,
                                      torch.Generator().manual_seed(100 + k)).loss.item() for k in range(8)]
    return sum(losses) / len(losses)


def test_loss_falls_on_a_tiny_fixed_dataset_and_the_export_samples(tmp_path, capsys):
    from jobs.cli import main as lvd
    from training.model.export import load_pretrained
    from training.loop import Trainer, load_initial_model

    out = tmp_path / "stage"
    config = validate(TrainConfig, stage_tree(
        out, synthetic_data(num_samples=2, batch_size=2), steps=40, deepspeed={"zero_stage": 1},
        optimizer={"lr": 3e-3}, schedule={"warmup_steps": 4, "decay": "constant"}, export={"ema": False},
        checkpoint={"every": 20, "keep_last": 1}, logging={"every": 10, "report_to": "tensorboard"},
        samples={"every": 20, "prompt": "a red square moves right", "num_steps": 3}))
    before = _eval_loss(load_initial_model(config), config)
    summary = Trainer(config).run()
    after = _eval_loss(load_pretrained(out), config)
    print(f"eval loss {before:.3f} -> {after:.3f}; training losses {summary.losses}")
    assert after < 0.7 * before  # measured 0.50 -> 0.28 at 40 steps (the high-sigma draws keep a floor)

    assert summary.steps == 40 and summary.samples == 80 and summary.world_size == 1
    assert [s for s, _ in summary.losses] == [10, 20, 30, 40]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "lr", "samples_per_s", "data_wait", "memory_gb"} <= set(lines[0])
    assert json.loads((out / "summary.json").read_text())["export"] == str(out / "model")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "samples").glob("*.mp4")) == ["step_00000020.mp4", "step_00000040.mp4"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000040"]  # keep_last: 1
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_00000020'} removed (checkpoint.keep_last: 1)" in printed
    assert f"  TensorBoard: tensorboard --logdir {out / 'tensorboard'}" in printed.splitlines()
    # the sample videos and their contact sheets are TensorBoard media, next to the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples/contact_sheet")] == [20, 40]
    assert "samples" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]
    assert sorted(p.name for p in (out / "samples").glob("*_sheet.png")) == ["step_00000020_sheet.png",
                                                                             "step_00000040_sheet.png"]

    assert lvd(["sample", "--model", str(out), "--prompt", "a red square", "--steps", "3",
                "--out", str(tmp_path / "s.mp4")]) == 0
    assert (tmp_path / "s.mp4").stat().st_size > 0


def test_temporal_only_stage_under_zero3_changes_only_temporal_layers(tmp_path):
    """trainable: temporal (turning an image model into a video model): after training, every spatial UNet
    weight and the text projection are bit-identical to the start, every trained tensor has moved. ZeRO-3
    partitions the weights, gradient checkpointing recomputes activations, two micro-batches accumulate per
    step, the EMA gathers the partitioned weights: all on the path."""
    from training.model.export import load_pretrained
    from training.loop import Trainer, load_initial_model
    from training.model.network import is_temporal

    out = tmp_path / "stage"
    config = validate(TrainConfig, stage_tree(
        out, synthetic_data(num_samples=2, batch_size=2), steps=2, trainable="temporal",
        train_text_projection=False,
        deepspeed={"zero_stage": 3, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
        ema={"enabled": True, "decay": 0.5, "warmup": False}, export={"ema": True}))
    start = load_initial_model(config)
    summary = Trainer(config).run()
    assert summary.steps == 2 and summary.samples == 2 * 2 * 2  # steps x micro-batches x batch size
    end = load_pretrained(out)
    init_unet, end_unet = start.unet.state_dict(), end.unet.state_dict()
    temporal = [k for k in init_unet if is_temporal(k)]
    assert temporal and len(temporal) < len(init_unet)
    moved = {k for k, v in init_unet.items() if not torch.equal(v, end_unet[k])}
    assert moved == set(temporal)
    assert torch.equal(start.text_encoder.proj.weight, end.text_encoder.proj.weight)
