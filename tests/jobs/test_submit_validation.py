"""`lvd submit` fails early and clearly: a bad recipe before any cluster is contacted, an unreachable
address, flags of another backend, outputs a cluster cannot keep. And how the Ray token is found."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.backends.ray_jobs import auth_token
from jobs.cli import main
from jobs.records import JobStore
from jobs.submit import SUBMITTABLE, prepare
from tests.jobs.ray_cluster import free_port


@pytest.fixture
def project(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "lvd_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "recipe.yaml").write_text(yaml.safe_dump({"inputs": ["/data/raw"], "output": "/data/runs/cur1"}))
    monkeypatch.chdir(proj)
    return proj


def _nothing_recorded() -> bool:
    return JobStore().all() == []


def test_a_bad_recipe_fails_before_the_cluster_is_contacted(project, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: reaching it would fail differently
    rc = main(["submit", "--backend", "ray", "--address", dead, "--",
               "curate", "recipe.yaml", "--set", "cuts.clip_min_s=20", "--set", "decode.short_sied=64"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "decode.short_sied: unknown key; did you mean decode.short_side?" in err and "clip_min_s" in err
    assert "cannot reach" not in err
    assert _nothing_recorded()


def test_a_command_that_does_not_parse_is_not_submitted(project, capsys):
    rc = main(["submit", "--backend", "slurm", "--dry-run", "--", "curate", "recipe.yaml", "--no-such-flag"])
    assert rc == 2
    assert "does not parse" in capsys.readouterr().err


def test_an_unreachable_address_is_named_with_what_to_check(project, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    rc = main(["submit", "--backend", "ray", "--address", dead, "--", "curate", "recipe.yaml"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach the Ray job server at {dead} (connection refused)" in err and "8265" in err
    assert _nothing_recorded()


@pytest.mark.parametrize("address, message", [
    ("ray://head:10001", "Ray Client address"),
    (None, "needs --address"),
])
def test_ray_addresses_that_cannot_take_jobs(project, capsys, address, message):
    rc = main(["submit", "--backend", "ray", *(["--address", address] if address else []), "--dry-run", "--",
               "curate", "recipe.yaml"])
    assert rc == 2 and message in capsys.readouterr().err


def test_flags_of_another_backend_are_errors_not_ignored(project, capsys):
    rc = main(["submit", "--backend", "ray", "--address", "http://h:8265", "--nodes", "4", "--dry-run", "--",
               "curate", "recipe.yaml"])
    assert rc == 2
    assert "--nodes applies to --backend kuberay / slurm, not ray" in capsys.readouterr().err


def test_a_relative_output_is_refused_for_a_ray_cluster(project, capsys):
    rc = main(["submit", "--backend", "ray", "--address", "http://h:8265", "--dry-run", "--",
               "curate", "recipe.yaml", "--set", "output=runs/x"])
    err = capsys.readouterr().err
    assert rc == 2 and "output 'runs/x' is relative" in err and "/shared/" in err


def test_the_ray_request_carries_the_working_dir_and_a_quoted_entry_point(project, capsys):
    odd = "/data/out dir/$(touch pwned)"
    rc = main(["submit", "--backend", "ray", "--address", "127.0.0.1:8265", "--exclude", "big/", "--dry-run",
               "--entrypoint-num-gpus", "1", "--env", "HF_HUB_OFFLINE=1", "--",
               "curate", "recipe.yaml", "--set", f"output={odd}"])
    assert rc == 0
    request = json.loads(capsys.readouterr().out)
    assert request["address"] == "http://127.0.0.1:8265"
    assert shlex.split(request["entrypoint"]) == ["lvd", "curate", "recipe.yaml", "--set", f"output={odd}",
                                                  "--address", "auto"]
    env = request["runtime_env"]
    assert env["working_dir"] == str(project)
    assert {".git", ".venv", "big/"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert request["entrypoint_num_gpus"] == 1.0
    assert request["submission_id"].startswith("lvd-curate-")
    assert not (project / "pwned").exists() and _nothing_recorded()


def test_the_output_folder_inside_the_working_dir_is_not_uploaded(project):
    from jobs.backends.ray_jobs import RayJobsBackend, RayJobsOptions

    spec = prepare(["curate", "recipe.yaml", "--set", f"output={project / 'runs' / 'cur1'}"])
    request = RayJobsBackend(RayJobsOptions(address="http://h:8265")).request(spec)
    assert "/runs/cur1" in request["runtime_env"]["excludes"]


def test_a_model_job_is_validated_against_the_model_recipe(project, capsys):
    rc = main(["submit", "--backend", "slurm", "--dry-run", "--", "sample", "--random-init", "--out", "/x/a.mp4",
               "--set", "sampler.num_stepz=3"])
    assert rc == 2 and "sampler.num_stepz: unknown key; did you mean sampler.num_steps?" in capsys.readouterr().err
    rc = main(["submit", "--backend", "slurm", "--dry-run", "--", "sample", "--out", "/x/a.mp4"])
    assert rc == 2 and "exactly one of --model DIR or --random-init" in capsys.readouterr().err


def test_only_lvd_pipeline_commands_can_be_submitted(project, capsys):
    assert main(["submit", "--backend", "slurm", "--dry-run", "--", "jobs", "list"]) == 2
    assert "lvd jobs cannot be submitted" in capsys.readouterr().err
    assert main(["submit", "--backend", "slurm", "--dry-run"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def test_training_and_precompute_settings_are_validated(project, capsys):
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "train" / "tiny_stage1.yaml")
    assert main(["submit", "--backend", "slurm", "--dry-run", "--", "train", recipe, "--set", "steps=-1"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["submit", "--backend", "slurm", "--dry-run", "--", "train", recipe]) == 0
    assert "torchrun" in capsys.readouterr().out
    assert main(["submit", "--backend", "slurm", "--dry-run", "--", "precompute", "/s/in", "/s/out", "--model", "/m",
                 "--set", "num_framez=14"]) == 2
    assert "num_framez: unknown key" in capsys.readouterr().err


def test_every_submittable_command_has_a_launch_and_training_uses_torch():
    assert SUBMITTABLE["curate"].launch == "ray"
    assert SUBMITTABLE["train"].launch == "torch"
    assert {s.launch for s in SUBMITTABLE.values()} <= {"ray", "torch", "single"}


def test_token_for_a_local_cluster_comes_from_the_default_file(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("local-token\n")

    assert auth_token("http://127.0.0.1:8265")[0] == "local-token"
    assert auth_token("http://localhost:8265")[0] == "local-token"
    # the default file is not sent to another machine unless the user says it belongs to it
    assert auth_token("http://head.example:8265")[0] is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert auth_token("http://head.example:8265")[0] == "local-token"
    # explicit tokens win, in Ray's order
    (tmp_path / "remote_token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "remote_token"))
    assert auth_token("http://head.example:8265") == ("from-path", f"RAY_AUTH_TOKEN_PATH={tmp_path / 'remote_token'}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token("http://head.example:8265")[0] == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token("http://127.0.0.1:8265")[0] is None


def test_a_token_sent_over_plain_http_to_another_machine_gets_one_warning(monkeypatch, capsys):
    from jobs.backends.ray_jobs import auth_headers

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    for address in ("https://head.example:8443", "http://127.0.0.1:8265", "http://[::1]:8265", "http://localhost:8265"):
        assert auth_headers(address) == {"Authorization": "Bearer s3cret"}
    assert capsys.readouterr().err == ""
    for _ in range(2):
        assert auth_headers("http://10.1.2.3:8265") == {"Authorization": "Bearer s3cret"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: sending the Ray auth token (RAY_AUTH_TOKEN) to "
                                                   "http://10.1.2.3:8265 over plain http")
    assert "https://" in err and "s3cret" not in err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert auth_headers("http://10.9.9.9:8265") == {} and capsys.readouterr().err == ""  # no token, nothing sent


def test_a_job_name_must_suit_every_backend(project, capsys):
    assert main(["submit", "--backend", "slurm", "--dry-run", "--name", "Bad Name", "--",
                 "curate", "recipe.yaml"]) == 2
    assert "job name 'Bad Name'" in capsys.readouterr().err
    assert main(["submit", "--backend", "slurm", "--dry-run", "--name", "cur-run1", "--",
                 "curate", "recipe.yaml"]) == 0
    assert "#SBATCH --job-name=cur-run1" in capsys.readouterr().out


def test_recipe_relative_paths_resolve_from_the_submit_directory(project):
    spec = prepare(["--", "lvd", "curate", "recipe.yaml"])
    assert spec.recipe_path == project / "recipe.yaml" and spec.command == "curate"
    assert spec.output_path == "/data/runs/cur1" and Path(spec.cwd) == project
