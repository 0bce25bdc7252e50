"""Bad recipes and paths are refused before any work, in one line naming the problem and the fix: scores no
stage produces, missing inputs, an output inside the inputs or on a file, no inputs, a recipe given to the
wrong command (a training subset that selects nothing: tests/training/test_train_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.config import ConfigError
from curation.inputs import check_paths
from jobs.cli import main as lvd

REPO = Path(__file__).resolve().parents[2]
CURATE = str(REPO / "recipes" / "curation" / "cpu_fast.yaml")


def _refused(capsys, argv: list[str]) -> str:
    assert lvd(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


@pytest.fixture
def videos(tmp_path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"not decoded by these tests")
    return folder


@pytest.mark.parametrize("rule, message", [
    ("thresholds.motion_scor.min=0.1", "thresholds.motion_scor: no enabled stage produces a score named 'motion_scor'; "
                                       "did you mean motion_score?"),
    ("thresholds.aesthetic.min=4", "thresholds.aesthetic: aesthetic is scored by the clip stage, which is not enabled"),
    ("text.only_if.text_aera.max=0.1", "text.only_if.text_aera: no enabled stage produces a score named 'text_aera'"),
    ("text.only_if.text_area.max=0.1", "text.only_if.text_area: text_area is scored by the text stage, which does not "
                                       "run before this one"),
    ("text.num_actors=0", "text.num_actors: num_actors (0) must be at least 1; to skip the stage set enabled: false"),
    ("decode.num_workers=0", "decode.num_workers: num_workers (0) must be at least 1; leave it unset (null)"),
    ("ray.num_cpus=0", "ray.num_cpus: num_cpus (0) must be at least 1; leave it unset (null) to use every core"),
])
def test_curate_refuses_rules_on_scores_no_stage_produces(tmp_path, videos, capsys, rule, message):
    out = tmp_path / "run"
    err = _refused(capsys, ["curate", CURATE, "--no-progress", "--set", f"inputs=[{videos}]", "--set", f"output={out}",
                            "--set", rule])
    assert message in err
    assert not out.exists()  # nothing was written, let alone decoded


def test_submit_dry_run_shares_the_score_check(tmp_path, videos, capsys, monkeypatch):
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "home"))
    err = _refused(capsys, ["submit", "--backend", "slurm", "--dry-run", "--", "curate", CURATE,
                            "--set", f"inputs=[{videos}]", "--set", f"output={tmp_path / 'run'}",
                            "--set", "thresholds.motion_scor.min=0.1"])
    assert "did you mean motion_score?" in err


def test_a_missing_input_is_an_error_unless_recorded(tmp_path, videos, capsys):
    missing = tmp_path / "nope.mp4"
    out = tmp_path / "run"
    err = _refused(capsys, ["curate", CURATE, "--no-progress", "--set", f"inputs=[{videos}, {missing}]",
                            "--set", f"output={out}"])
    assert err == (f"lvd curate: input {missing} does not exist (nothing was decoded); fix the path, or set "
                   "inputs_missing: record to record missing inputs in the ledger and go on")
    assert not out.exists()
    check_paths([str(videos), str(missing)], str(out), missing="record")  # recorded later, by the decode actor
    absent = f"@{tmp_path / 'list.txt'}"
    with pytest.raises(ConfigError, match=re.escape(f"input {absent} does not exist")):
        check_paths([str(videos), absent], str(out))
    # entries of a list file are not stat'ed here (there may be millions): the ledger records them
    listed = tmp_path / "list.txt"
    listed.write_text(f"{missing}\n")
    check_paths([f"@{listed}"], str(out))


@pytest.mark.parametrize("case", ["inside", "glob", "same", "file", "none"])
def test_output_paths_that_would_hurt_are_refused(tmp_path, videos, capsys, case):
    out = {"inside": videos / "run", "glob": videos / "run", "same": videos, "file": videos / "a.mp4",
           "none": tmp_path / "run"}[case]
    inputs = {"glob": f"{tmp_path}/**/*.mp4", "none": ""}.get(case, str(videos))
    err = _refused(capsys, ["curate", CURATE, "--no-progress", "--set", f"inputs=[{inputs}]", "--set", f"output={out}"])
    expected = {
        "file": f"lvd curate: output {out} is an existing file, not a folder; choose a new or existing folder path",
        "none": "lvd curate: no inputs: set inputs in the recipe or pass --set inputs=[path/to/videos]",
    }.get(case, f"lvd curate: output {out} is inside input folder {inputs}: a re-run would curate its own clips; "
                "put the output outside the inputs")
    assert err.startswith(expected) and "\n" not in err
    assert (videos / "a.mp4").read_bytes() == b"not decoded by these tests" and not (videos / "run").exists()


def test_a_recipe_given_to_the_wrong_command_says_which_command_it_is_for(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "home"))
    err = _refused(capsys, ["submit", "--backend", "slurm", "--dry-run", "--", "train", CURATE])
    assert err.startswith(f"lvd submit: recipe {CURATE} is for `lvd curate` ") and "\n" not in err
    err = _refused(capsys, ["train", CURATE])
    assert err == (f"lvd train: recipe {CURATE} is for `lvd curate` (its keys inputs, decode, cuts, motion are lvd "
                   f"curate's settings); run `lvd curate {CURATE}`, or give this command a recipe such as "
                   "recipes/train/tiny_stage1.yaml")
    train = str(REPO / "recipes" / "train" / "tiny_stage1.yaml")
    err = _refused(capsys, ["curate", train])
    assert err.startswith(f"lvd curate: recipe {train} is for `lvd train` ") and "\n" not in err
    # one misspelt key is still a did-you-mean, not "another command's recipe"
    err = _refused(capsys, ["curate", CURATE, "--set", "decod.short_side=64"])
    assert "decod: unknown key; did you mean decode?" in err


def test_inputs_missing_record_lists_the_missing_input_in_the_ledger_and_goes_on(tmp_path, capsys):
    from curation.ledger import Ledger

    missing = tmp_path / "nope.mp4"
    out = tmp_path / "run"
    assert lvd(["curate", CURATE, "--no-progress", "--set", f"inputs=[{missing}]", "--set", f"output={out}",
                "--set", "inputs_missing=record", "--set", "ray.num_cpus=1"]) == 0
    videos, _ = Ledger(out).read()
    assert videos[["source", "status", "reason"]].values.tolist() == [[str(missing), "skipped", "not_found: no such file"]]


def test_a_glob_or_url_that_matches_nothing_is_an_error_once_listed_before_any_decode(tmp_path, videos, capsys):
    """Globs and URLs are matched by the listing tasks (a pattern can walk a large tree), not on the driver."""
    from curation.ledger import Ledger

    out = tmp_path / "run"
    pattern, url = f"{videos}/**/*.webm", f"local://{tmp_path}/nowhere/"
    err = _refused(capsys, ["curate", CURATE, "--no-progress", "--set", f"inputs=[{videos}, '{pattern}', '{url}']",
                            "--set", f"output={out}", "--set", "ray.num_cpus=1"])
    assert err == (f"lvd curate: inputs {pattern}, {url} do not exist (nothing was decoded); fix the path, or set "
                   "inputs_missing: record to record missing inputs in the ledger and go on")
    assert not Ledger(out).has_rows()


def test_on_a_cluster_inputs_are_checked_where_they_are_seen_after_listing(tmp_path, videos):
    from curation.inputs import Item, deferred, list_task, unmatched

    missing, pattern = str(tmp_path / "nope.mp4"), f"{videos}/*.webm"
    inputs = [str(videos), missing, pattern, f"{videos}/*.mp4"]
    check_paths(inputs, str(tmp_path / "run"), local=False)  # the driver may not see the cluster's paths
    assert deferred(inputs, local=True) == [pattern, f"{videos}/*.mp4"]
    listed = tmp_path / "run" / "inputs"
    listed.mkdir(parents=True)
    list_task([Item("name", n) for n in inputs], [".mp4"], str(listed), 4)  # as the listing tasks do
    assert unmatched(str(listed), deferred(inputs, local=False)) == [missing, pattern]
