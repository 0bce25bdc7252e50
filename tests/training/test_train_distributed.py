"""The training loop on several processes: 2 ranks under torchrun (CPU, gloo), 2 "nodes" on loopback giving the
very same numbers, a kill -9 mid-run that resumes to the uninterrupted run's losses and weights, a resume on
another number of ranks through DeepSpeed's universal checkpoint, ranks with unequal data that stop together
instead of deadlocking, and the same numbers from the DeepSpeed launcher and from Ray Train workers (slow).

The reference run (2 ranks through `lvd train --nproc 2`) is made once per module; it reads real shards (a
fake curation run, written by the shard writer) with the streaming loader, ZeRO-2, 8 steps, a checkpoint
every 3 steps and a metrics line every step."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from tests.training.train_helpers import (REPO, losses, make_shards, python, rank_env, run, shard_data, stage_tree,
                                          synthetic_data, unet_weights, write_recipe)
from training.launch import Rendezvous, torchrun_command

pytestmark = pytest.mark.timeout(600)
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("train_shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted 2-rank run, launched the way a user does: `lvd train RECIPE --nproc 2` (torchrun)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root / "recipe.yaml", stage_tree(root / "out", shard_data(shards)))
    done = run([python(), "-m", "jobs.cli", "train", str(recipe), "--nproc", "2"])
    assert "2 rank(s)" in done.stdout
    return recipe, root / "out"


def test_two_ranks_train_and_checkpoint(reference):
    _, out = reference
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v[0])) and v[1] > 0 for v in got.values())
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    for step in (3, 6, 8):  # every 3 steps and at the end, each with both ranks' RNG states
        assert sorted(p.name for p in (out / "checkpoints" / f"step_{step:08d}" / "rng").iterdir()) == \
            ["rank_00000.json", "rank_00001.json"]
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "plan" / "plan.json").read_text())["num_samples"] > 0  # written once, before the ranks


def test_two_nodes_on_loopback_match_two_processes(reference, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) meeting on 127.0.0.1: the same world of 2 ranks, so the
    same losses, gradient norms and final weights, bit for bit."""
    recipe, ref_out = reference
    out = tmp_path / "out"
    from training.engine import free_port

    port = free_port()
    procs = [subprocess.Popen(torchrun_command(recipe, [f"output={out}"], 1, Rendezvous(2, r, "127.0.0.1", port)),
                              cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert losses(out) == losses(ref_out)
    a, b = unet_weights(out), unet_weights(ref_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kill_run_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent and its ranks at once (torchrun starts each rank in a session of its own, so
    they are found as its children), like a node lost or a job killed by the scheduler."""
    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    for p in family:
        os.kill(p.pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=60)


def test_kill_9_mid_run_then_restart_resumes_to_the_uninterrupted_losses(reference, tmp_path):
    recipe, ref_out = reference
    out = tmp_path / "out"
    cmd = torchrun_command(recipe, [f"output={out}"], 2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, saved = [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        saved = saved or "step_00000003 saved" in line
        if saved and line.startswith("step 4/"):  # mid-run: step 4 done, its checkpoint (6) not yet written
            _kill_run_tree(proc)
            break
    assert saved, "".join(seen)[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not (out / "model").exists()

    done = run(cmd)
    assert re.search(r"resumed from \S+step_00000003 at step 3\n", done.stdout), done.stdout[-3000:]
    got, want = losses(out), losses(ref_out)
    for step in range(4, STEPS + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    a, b = unet_weights(out), unet_weights(ref_out)  # the EMA export: the EMA came back exactly too
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ranks_with_unequal_data_stop_together(tmp_path):
    """3 batches for 2 ranks and one epoch: rank 0 has 2, rank 1 has 1. The ranks agree before each step that
    all have a batch, so both stop after step 1 (no rank waits forever in the gradient all-reduce). The
    agreement itself is tested in the default suite by tests/training/test_data.py, without DeepSpeed."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", stage_tree(
        out, synthetic_data(num_samples=6, batch_size=2, epochs=1), steps=50, checkpoint={"every": 100}))
    done = run(torchrun_command(recipe, [], 2), timeout=400)
    assert "ran out of data before step 2" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["samples"] == 4
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"  # what was learned is kept


@pytest.mark.slow
def test_resume_on_one_rank_through_a_universal_checkpoint(reference, tmp_path):
    """The 2-rank ZeRO-2 checkpoint of step 3 resumed by 1 rank: ds_to_universal converts it, the weights load
    exactly (checked against DeepSpeed's own fp32 consolidation of the checkpoint), and training continues at
    the schedule position and data position where the 2-rank run was."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    recipe, ref_out = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("step_00000003")
    # steps=3: nothing left to train, so the export is exactly what was loaded (raw weights, not the EMA)
    done = run([python(), "-m", "training.run", str(recipe), "--set", f"output={out}", "--set", "steps=3",
                "--set", "export.ema=false"])
    assert "universal checkpoint, saved on 2 ranks" in done.stdout
    assert (out / "checkpoints" / "step_00000003_universal" / "zero").is_dir()
    saved = get_fp32_state_dict_from_zero_checkpoint(str(ref_out / "checkpoints"), tag="step_00000003")
    loaded = unet_weights(out)
    assert all(torch.equal(loaded[k], saved["unet." + k]) for k in loaded)

    shutil.rmtree(out / "model")
    done = run([python(), "-m", "training.run", str(recipe), "--set", f"output={out}"])
    got, want = losses(out), losses(ref_out)
    assert sorted(s for s in got if s > 3) == list(range(4, STEPS + 1))
    lr = {json.loads(l)["step"]: json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()}
    ref_lr = {json.loads(l)["step"]: json.loads(l)["lr"] for l in (ref_out / "metrics.jsonl").read_text().splitlines()}
    assert all(lr[s] == pytest.approx(ref_lr[s]) for s in range(4, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(got[s][0])) for s in range(4, STEPS + 1))
    assert got[4] != want[4]  # one rank sees one batch per step where two saw two: a different step


@pytest.mark.slow
def test_ray_train_workers_match_torchrun_and_restore_from_ray_storage(reference, tmp_path, monkeypatch):
    """The same Trainer on 2 Ray Train workers (TorchTrainer, gloo): the reference's numbers. Then the stage
    folder's checkpoints are lost and the run started again: the worker takes Ray's last reported checkpoint
    (ray.train.get_checkpoint(), copied from Ray's storage), resumes from it, and exports the same weights."""
    import ray

    from common.config import load_recipe
    from training.launch import run_ray
    from training.stage_config import TrainConfig

    recipe, ref_out = reference
    out = tmp_path / "out"
    config = load_recipe(TrainConfig, recipe, [f"output={out}"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's workers inherit it
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1"}})
    try:
        result = run_ray(config, num_workers=2)
        assert result.error is None
        assert losses(out) == losses(ref_out)
        assert (out / "ray").is_dir() and result.checkpoint is not None
        shutil.rmtree(out / "checkpoints")
        shutil.rmtree(out / "model")
        result = run_ray(config, num_workers=2)
        assert result.error is None
    finally:
        ray.shutdown()
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    a, b = unet_weights(out), unet_weights(ref_out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_same_training(reference, tmp_path):
    """`deepspeed --num_accelerators 2 --module training.run` (what a DeepSpeed/Slurm job runs): the same numbers."""
    from training.launch import deepspeed_command

    recipe, ref_out = reference
    out = tmp_path / "out"
    run(deepspeed_command(recipe, [f"output={out}"], 2))
    assert losses(out) == losses(ref_out)
