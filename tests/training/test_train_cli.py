"""`lvd train`, `lvd precompute` and `lvd bench train` at the command line: bad input fails before anything starts,
with the reason; the benchmark prints its table."""

from __future__ import annotations

import pytest

from jobs.cli import main as lvd
from tests.training.train_helpers import stage_tree, synthetic_data, write_recipe


def test_train_rejects_a_bad_recipe_before_launching(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", stage_tree(tmp_path / "out", synthetic_data(), steps=0))
    assert lvd(["train", str(recipe), "--nproc", "2"]) == 2
    assert "steps (0) must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert lvd(["train", str(recipe), "--set", "steps=2", "--set", "schedule.warmup=3"]) == 2
    assert "schedule.warmup: unknown key; did you mean schedule.warmup_steps?" in capsys.readouterr().err


def test_train_local_launcher_is_one_process(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", stage_tree(tmp_path / "out", synthetic_data()))
    assert lvd(["train", str(recipe), "--launcher", "local", "--nproc", "2"]) == 2
    assert "runs one process" in capsys.readouterr().err


def test_precompute_needs_a_model_and_valid_settings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lvd(["precompute", str(tmp_path / "s"), str(tmp_path / "o")])
    assert "--model" in capsys.readouterr().err
    assert lvd(["precompute", str(tmp_path / "s"), str(tmp_path / "o"), "--model", "m", "--set", "num_frames=0"]) == 2
    assert "num_frames (0)" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_prints_samples_per_second_and_data_wait(capsys):
    assert lvd(["bench", "train", "--steps", "8", "--warmup", "2", "--clips", "8", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "real shards (1 loader workers)" in out and "synthetic in-memory batches" in out
    assert "data wait" in out and "of the in-memory throughput" in out


@pytest.mark.parametrize("query, message", [
    ("motion_score > 1000", "data.shards: the subset is empty: query 'motion_score > 1000' selects no sample of"),
    ("motion_scor > 0.1", "data.shards: unknown column 'motion_scor' in 'motion_scor > 0.1'; did you mean motion_score?"),
])
def test_a_subset_that_selects_nothing_fails_before_the_launcher_starts(tmp_path, capsys, query, message):
    from tests.training.train_helpers import make_shards, shard_data

    shards = make_shards(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", stage_tree(tmp_path / "out", shard_data(shards, query=query)))
    assert lvd(["train", str(recipe), "--nproc", "2"]) == 2  # torchrun would start two ranks
    err = capsys.readouterr().err
    assert message in err and "[rank" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
