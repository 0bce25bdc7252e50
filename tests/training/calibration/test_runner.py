"""`lvd calibrate` end to end on synthetic shards where one score marks corrupted clips: the clips with the
lowest motion_score are pure noise. Dropping that score's bottom half must beat dropping half at random; a
calibration stopped after its first arm retrains nothing finished when run again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.training.train_helpers import shard_data, stage_tree, write_recipe

NUM_CLIPS, NUM_NOISE = 36, 12


def noisy_shards(root: Path) -> tuple[Path, set[str]]:
    """A fake curation run's clips as shards; the NUM_NOISE clips of lowest motion_score are re-encoded as
    uniform noise. Returns the shard folder and the noise clips' keys."""
    from curation.testing.synthetic import write_video
    from shards.config import ShardWriteConfig
    from curation.testing.fake_runs import fake_run
    from shards.writer import write_shards

    clips = fake_run(root / "run", num_clips=NUM_CLIPS, num_frames=8, fps=8.0, sizes=[(32, 48)], captions=True,
                     dropped_every=0, failed=0)
    noise = clips.nsmallest(NUM_NOISE, "motion_score")
    rng = np.random.default_rng(0)
    for path in noise["clip_path"]:
        write_video(path, [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(8)], fps=8.0, gop=8)
    write_shards(root / "run", root / "shards", ShardWriteConfig(shard_max_bytes="200KB"))
    return root / "shards", set(noise["clip_id"])


def calibration_recipe(root: Path, shards: Path, clip: bool = False) -> Path:
    """The recipe; `clip`: with the optional metrics (CLIP similarity, FVD) on tiny random stand-ins."""
    proxy = stage_tree(root / "unused", shard_data(shards, batch_size=2, image_ratio=0.0, resolutions=[[32, 48]],
                                                    num_frames=[4]), steps=20)
    proxy.update(checkpoint={"every": 10, "keep_last": 1}, logging={"every": 10, "report_to": []})
    write_recipe(root / "proxy.yaml", proxy)
    tree = {"name": "test", "output": str(root / "calibration"), "shards": str(shards), "query": "true",
            "scores": {"motion_score": {"direction": "bottom"}}, "fractions": [50],
            # held out: clean clips, what the model should be good at
            "heldout": {"num_samples": 6, "query": "motion_score >= pct(motion_score, 50)", "sigmas": [0.2, 1.0, 5.0]},
            "train": str(root / "proxy.yaml")}
    if clip:  # the tiny random CLIP stand-in exercises the metric's code path
        from curation.testing.tiny_clip import write_tiny_open_clip

        tree["clip"] = {"checkpoint": str(write_tiny_open_clip(root / "clip")), "prompts": ["a square", "noise"],
                        "num_frames": 2, "size": [32, 48], "num_steps": 2}
        # and the tiny random VideoMAE stand-in, FVD's
        from tests.training.calibration.test_fvd import write_tiny_videomae

        tree["fvd"] = {"checkpoint": str(write_tiny_videomae(root / "videomae")), "num_frames": 4, "size": [32, 48],
                       "num_steps": 2}
    return write_recipe(root / "calibrate.yaml", tree)


def test_calibration_ranks_the_corrupting_score_above_random_and_resumes(tmp_path, capsys):
    from jobs.cli import main

    shards, noise = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards, clip=True)
    out = tmp_path / "calibration"

    # a calibration stopped after its first arm (as a kill after it finished would leave it)
    assert main(["calibrate", str(recipe), "--max-arms", "1"]) == 0
    first = out / "arms" / "baseline"
    assert (first / "done.json").is_file()
    assert not (out / "arms" / "random-50" / "done.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in [first / "done.json", first / "train" / "eval.json",
                                                 *(first / "train" / "model").rglob("*")]}
    partial = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in partial["arms"] if r["finished"]] == ["baseline"]

    assert main(["calibrate", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "1 arm(s) already finished, not retrained" in printed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished arm was not retrained

    # every arm's held-out set is the same clean clips, none of them in any arm's training subset
    import pandas as pd

    heldout = set(pd.read_parquet(out / "heldout.parquet")["key"])
    assert len(heldout) == 6 and not heldout & noise
    subsets = {a: set(pd.read_parquet(out / "arms" / a / "subset.parquet")["key"])
               for a in ("baseline", "motion_score-bottom-50", "random-50")}
    assert all(not s & heldout for s in subsets.values())
    assert not subsets["motion_score-bottom-50"] & noise  # the filter removes every noise clip ...
    assert len(subsets["random-50"]) == len(subsets["motion_score-bottom-50"])  # ... the control as many at random
    assert subsets["random-50"] & noise

    result = json.loads((out / "results.json").read_text())
    loss = {r["arm"]: r["eval_loss"] for r in result["arms"]}
    assert loss["motion_score-bottom-50"] < loss["random-50"], loss
    assert loss["motion_score-bottom-50"] < loss["baseline"], loss
    assert result["suggested_thresholds"] == {"motion_score": {"drop_bottom_pct": 50.0}}

    # the suggestion is a curation thresholds block: it validates as `lvd curate --rethreshold` reads it
    from common.config import load_recipe
    from curation.config import CurationConfig

    block = yaml.safe_load((out / "thresholds.yaml").read_text())
    overrides = [f"thresholds.{s}.{k}={v}" for s, rule in block["thresholds"].items() for k, v in rule.items()]
    curation = load_recipe(CurationConfig, Path(__file__).parents[3] / "recipes/curation/demo.yaml",
                           ["output=/tmp/x", *overrides])
    assert curation.thresholds["motion_score"].drop_bottom_pct == 50.0
    assert "--rethreshold --set thresholds.motion_score.drop_bottom_pct=50" in (out / "thresholds.yaml").read_text()
    # the second metric ran on every arm, and is what the arm's exported model gives again
    from training.calibration.clip_similarity import ClipSimilarityConfig, clip_similarity
    from training.model.sampler import SamplerConfig

    assert result["metrics"]["clip_similarity"].startswith("ran") and result["metrics"]["fvd"].startswith("ran")
    fvds = {r["arm"]: r["fvd"] for r in result["arms"]}
    assert all(np.isfinite(v) and v >= -1e-6 for v in fvds.values()) and len(set(fvds.values())) == len(fvds), fvds
    assert "| fvd |" in (out / "results.md").read_text() and "<th>fvd</th>" in (out / "report.html").read_text()
    sims = {r["arm"]: r["clip_similarity"] for r in result["arms"]}
    assert all(-1.0 <= v <= 1.0 for v in sims.values()), sims
    again = clip_similarity(first / "train" / "model", ClipSimilarityConfig(**yaml.safe_load(recipe.read_text())["clip"]),
                            SamplerConfig())
    assert again == pytest.approx(sims["baseline"], abs=1e-6)
    page = (out / "report.html").read_text()
    assert "say nothing about real quality" in page and page.count("<svg") == 1
    assert "motion_score-bottom-50" in (out / "results.md").read_text()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[3] / "recipes/calibrate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_arm_of_the_repo_recipes_is_a_valid_stage(recipe):
    """A calibration recipe names a proxy stage recipe and overrides; every arm's resolved stage validates."""
    from common.config import load_recipe
    from training.calibration.arms import Arm
    from training.calibration.config import CalibrateConfig
    from training.calibration.runner import arm_config, proxy_tree

    repo = Path(__file__).parents[3]
    config = load_recipe(CalibrateConfig, recipe)
    config = config.model_copy(update={"train": str(repo / config.train)})
    stage = arm_config(config, Arm("baseline", "baseline", None, None, 0.0, 1, "all"), proxy_tree(config))
    assert stage.data.shards.subset.endswith("arms/baseline/subset.parquet")
    assert stage.eval.subset.endswith("heldout.parquet") and stage.eval.sigmas == config.heldout.sigmas
    assert stage.init_from is None  # every arm starts from the same seeded random model


def test_a_score_the_shards_lack_is_refused_before_training(tmp_path):
    from jobs.cli import main

    shards, _ = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards)
    tree = yaml.safe_load(recipe.read_text())
    tree["scores"] = {"sharpness": {"direction": "bottom"}}
    write_recipe(recipe, tree)
    assert main(["calibrate", str(recipe)]) == 2
    assert not (tmp_path / "calibration" / "arms").exists()


@pytest.mark.slow
def test_arms_run_as_ray_tasks(tmp_path):
    """--address: one Ray task per arm (here a Ray started for the test and stopped after it)."""
    import ray

    from jobs.cli import main

    shards, _ = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        assert main(["calibrate", str(recipe), "--address", "auto"]) == 0
    finally:
        ray.shutdown()
    result = json.loads((tmp_path / "calibration" / "results.json").read_text())
    assert all(r["finished"] and r["eval_loss"] > 0 for r in result["arms"])


@pytest.mark.slow
def test_arms_run_as_ray_train_worker_groups(tmp_path):
    """runner.num_workers=2 with --address: each arm is a Ray Train group of 2 ranks (its summary says so)."""
    import ray

    from jobs.cli import main

    shards, _ = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        assert main(["calibrate", str(recipe), "--address", "auto", "--set", "runner.num_workers=2"]) == 0
    finally:
        ray.shutdown()
    out = tmp_path / "calibration"
    result = json.loads((out / "results.json").read_text())
    assert all(r["finished"] and r["eval_loss"] > 0 for r in result["arms"])
    for r in result["arms"]:
        assert json.loads((out / "arms" / r["arm"] / "train" / "summary.json").read_text())["world_size"] == 2


def test_worker_groups_without_a_cluster_are_refused(tmp_path, capsys):
    from jobs.cli import main

    shards, _ = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards)
    assert main(["calibrate", str(recipe), "--set", "runner.num_workers=2"]) == 2
    assert "runner.num_workers=2 runs each arm as a Ray Train worker group: give --address" in capsys.readouterr().err
    assert not (tmp_path / "calibration").exists()  # refused before planning


def test_resuming_with_another_proxy_recipe_is_refused(tmp_path, capsys):
    """Finished arms only compare with arms of the same proxy, held-out set and shards."""
    from jobs.cli import main

    shards, _ = noisy_shards(tmp_path)
    recipe = calibration_recipe(tmp_path, shards)
    assert main(["calibrate", str(recipe), "--max-arms", "0"]) == 0  # plans, trains nothing
    assert (tmp_path / "calibration" / "arms" / "random-50" / "subset.parquet").is_file()
    assert main(["calibrate", str(recipe), "--max-arms", "0", "--set", "train_set=[steps=30]"]) == 2
    assert "holds a calibration with another proxy" in capsys.readouterr().err
    # no fvd section: the outputs say the metric did not run
    result = json.loads((tmp_path / "calibration" / "results.json").read_text())
    assert result["metrics"]["fvd"].startswith("not run: no VideoMAE feature extractor configured")


def test_a_curation_run_as_the_source_is_written_as_shards_once(tmp_path, capsys):
    """run: PATH instead of shards: calibrate writes the run's usable clips into OUTPUT/shards (as
    `lvd shards write --all-usable`), plans its arms on them, and a re-run rewrites nothing."""
    import pandas as pd

    from jobs.cli import main
    from shards.manifest import Manifest
    from curation.testing.fake_runs import fake_run

    clips = fake_run(tmp_path / "run", num_clips=NUM_CLIPS, num_frames=8, fps=8.0, sizes=[(32, 48)], captions=True,
                     dropped_every=3, failed=2)
    recipe = calibration_recipe(tmp_path, tmp_path / "unused-shards")
    args = ["calibrate", str(recipe), "--max-arms", "0", "--set", "shards=null", "--set", f"run={tmp_path / 'run'}",
            "--set", "shards_set=[shard_max_bytes=200KB]"]
    assert main(args) == 0
    assert "0 written by this run" not in capsys.readouterr().out
    shards = tmp_path / "calibration" / "shards"
    manifest = Manifest.load(str(shards))
    # every usable clip, the ones the run's thresholds drop too, and not the failed ones
    assert manifest.num_samples == NUM_CLIPS and (~clips["keep"]).sum() > 2
    subset = set(pd.read_parquet(tmp_path / "calibration" / "arms" / "baseline" / "subset.parquet")["key"])
    assert subset <= set(manifest.scan(["key"]).to_pandas()["key"]) and len(subset) == NUM_CLIPS - 6
    assert main(args) == 0
    assert f"{NUM_CLIPS} samples in" in (out := capsys.readouterr().out) and "0 written by this run" in out


@pytest.mark.parametrize("sources", [{}, {"run": "somewhere"}], ids=["neither", "both"])
def test_shards_and_run_are_exclusive(tmp_path, capsys, sources):
    from jobs.cli import main

    recipe = calibration_recipe(tmp_path, tmp_path / "shards")
    tree = yaml.safe_load(recipe.read_text())
    if not sources:
        del tree["shards"]
    tree.update(sources)
    write_recipe(recipe, tree)
    assert main(["calibrate", str(recipe)]) == 2
    assert "name exactly one of shards (a shard folder) and run" in capsys.readouterr().err
    assert not (tmp_path / "calibration").exists()
