"""A resume never runs code from a checkpoint: DeepSpeed's files are read with torch's weights-only unpickler
(its model and optimizer states, the universal form made for another world size and the conversion itself,
zero_to_fp32), and a planted pickle whose unpickling would create a file is refused with an error naming it,
the file never created.

One 1-rank ZeRO-2 stage of 2 steps (checkpoint at step 2, raw weights exported) is trained once per module;
each test works on a copy of its output folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.train_helpers import REPO, rank_env, stage_tree, synthetic_data, unet_weights, write_recipe

pytestmark = pytest.mark.timeout(400)
TAG = "step_00000002"


class CreatesAFile:
    """Unpickling this calls open(path, "w"): the file exists afterwards only if the pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    from jobs.cli import main as lvd

    root = tmp_path_factory.mktemp("stage")
    recipe = write_recipe(root / "recipe.yaml", stage_tree(
        root / "out", synthetic_data(num_samples=2, batch_size=2), steps=2, export={"ema": False},
        checkpoint={"every": 2}, logging={"every": 1, "report_to": []}))
    assert lvd(["train", str(recipe)]) == 0
    return recipe, root / "out"


def _copy(stage, tmp_path: Path) -> tuple[Path, Path]:
    recipe, out = stage
    shutil.copytree(out / "checkpoints", tmp_path / "out" / "checkpoints")
    return recipe, tmp_path / "out"


def _train(capfd, recipe: Path, out: Path, *sets: str) -> tuple[int, str, str]:
    """`lvd train RECIPE --set output=OUT ...` (one process, this one): exit code, stdout, stderr."""
    from jobs.cli import main as lvd

    capfd.readouterr()
    rc = lvd(["train", str(recipe), "--set", f"output={out}", *(a for s in sets for a in ("--set", s))])
    captured = capfd.readouterr()
    return rc, captured.out, captured.err


def _claim_saved_on_two_ranks(out: Path) -> None:
    """The checkpoint says it was saved on 2 ranks, so a 1-rank resume goes through the universal form (made by
    ds_to_universal, then loaded by DeepSpeed's universal loader): the path of a resume on another world size."""
    state_file = out / "checkpoints" / TAG / "lvd_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))


def _plant(path: Path, marker: Path) -> None:
    assert path.is_file(), path
    torch.save({"module": CreatesAFile(marker), "buffer_names": []}, path)


def test_resume_and_universal_resume_load_deepspeed_state_weights_only(stage, tmp_path, capfd):
    recipe, out = _copy(stage, tmp_path)
    rc, stdout, stderr = _train(capfd, recipe, out, "steps=3")
    assert rc == 0, stderr[-3000:]
    assert re.search(rf"resumed from \S+{TAG} at step 2\n", stdout), stdout[-2000:]

    (out / "checkpoints" / "latest").write_text(TAG)
    _claim_saved_on_two_ranks(out)
    shutil.rmtree(out / "model")
    rc, stdout, stderr = _train(capfd, recipe, out, "steps=2")  # nothing left to train: the export is what was loaded
    assert rc == 0, stderr[-3000:]
    assert "universal checkpoint, saved on 2 ranks" in stdout, stdout[-2000:]
    assert (out / "checkpoints" / f"{TAG}_universal" / "zero").is_dir()
    loaded, trained = unet_weights(out), unet_weights(stage[1])
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in loaded)


def test_planted_model_states_pickle_is_refused_naming_the_file(stage, tmp_path, capfd):
    recipe, out = _copy(stage, tmp_path)
    planted = out / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    _plant(planted, marker)
    rc, stdout, stderr = _train(capfd, recipe, out, "steps=3")
    assert not marker.exists()
    assert rc == 2, stderr[-3000:]
    assert f"refusing to load checkpoint file {planted}" in stderr
    assert "Traceback" not in stderr and "it refers to io.open" in stderr
    assert not (out / "checkpoints" / "step_00000003").exists()  # nothing trained on top of it


def test_planted_optimizer_pickle_is_refused_by_the_universal_conversion(stage, tmp_path):
    from training.checkpoint import convert_to_universal
    from training.weights_only import UnsafeCheckpoint

    _, out = _copy(stage, tmp_path)
    planted = out / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    _plant(planted, marker)
    with pytest.raises(UnsafeCheckpoint, match=re.escape(f"refusing to load checkpoint file {planted}")):
        convert_to_universal(out / "checkpoints" / TAG, out / "universal")
    assert not marker.exists()
    assert not (out / "universal").exists()


def test_planted_pickle_in_the_universal_form_is_refused(stage, tmp_path, capfd):
    from training.checkpoint import convert_to_universal

    recipe, out = _copy(stage, tmp_path)
    universal = out / "checkpoints" / f"{TAG}_universal"
    convert_to_universal(out / "checkpoints" / TAG, universal)
    planted = sorted((universal / "zero").glob("*/fp32.pt"))[0]
    marker = tmp_path / "pwned"
    _plant(planted, marker)
    _claim_saved_on_two_ranks(out)
    rc, _, stderr = _train(capfd, recipe, out, "steps=3")
    assert not marker.exists()
    assert rc == 2, stderr[-3000:]
    assert f"refusing to load checkpoint file {planted}" in stderr


def test_zero_to_fp32_export_runs_weights_only(stage, tmp_path):
    """DeepSpeed's zero_to_fp32 under `python -m training.weights_only`: the consolidated fp32 weights are the
    stage's exported ones; a planted file stops it before it runs."""
    from safetensors.torch import load_file

    _, out = _copy(stage, tmp_path)
    cmd = [sys.executable, "-m", "training.weights_only", "deepspeed.utils.zero_to_fp32", str(out / "checkpoints"),
           str(tmp_path / "fp32"), "--tag", TAG, "--safe_serialization"]
    done = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    exported = unet_weights(stage[1])
    assert all(torch.equal(merged["unet." + k], v) for k, v in exported.items())

    marker = tmp_path / "pwned"
    _plant(out / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    done = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Weights only load failed" in done.stderr
    assert not marker.exists()
