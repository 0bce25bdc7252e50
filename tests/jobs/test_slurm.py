"""The Slurm backend: the generated sbatch scripts (structure, quoting, what they execute, checked by running
them against recording stand-ins for srun/scontrol/...), the sbatch/squeue/scancel flow, and, where Slurm is
installed (Debian's slurm-wlm) and we are root, real submissions to a single-node Slurm started by the test."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from jobs.backends import JobState
from jobs.backends.slurm import SlurmBackend, SlurmOptions, SlurmScript, world_info
from jobs.cli import main
from jobs.records import JobStore
from jobs.submit import JobSpec, prepare
from tests.jobs.ray_cluster import free_port
from tests.jobs.stubs import calls, make_stubs, stub_env

HOSTILE = "/data/out dir/$(touch pwned)/it's \"quoted\" `x`\nline2"
REPO = Path(__file__).resolve().parents[2]
FAKE_JOB_ID = "987654321"  # the script's Ray temp dir is /tmp/lvd-ray-$SLURM_JOB_ID: a number no real job has


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "lvd_home"))
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "recipe.yaml").write_text(yaml.safe_dump({"inputs": ["/data/raw"], "output": "/data/runs/cur1"}))
    monkeypatch.chdir(proj)
    return proj


def _train_spec() -> JobSpec:
    return prepare(["train", str(REPO / "recipes" / "train" / "stage2_video.yaml"), "--set", "steps=2000"])


def _run_script(text: str, tmp_path: Path, nodes: list[str], cpus: int = 16) -> list[list[str]]:
    """Runs a generated script with stand-ins for the cluster tools; returns the commands it executed."""
    return [c["cmd"] for c in _run_script_calls(text, tmp_path, nodes, cpus)]


def _run_script_calls(text: str, tmp_path: Path, nodes: list[str], cpus: int = 16) -> list[dict]:
    """Runs a generated script with stand-ins for the cluster tools; returns what each call recorded."""
    stubs = make_stubs(tmp_path / "stubs", ["srun", "scontrol", "hostname", "python", "lvd"])
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    log = tmp_path / "calls.jsonl"
    env = stub_env(stubs, log, {
        "scontrol show hostnames": ("\n".join(nodes) + "\n", 0),
        "hostname --ip-address": ("127.0.1.1\n", 0),        # what Debian's /etc/hosts answers
        "hostname -I": ("10.0.0.1 10.0.0.2\n", 0),
        "python -c": ("t0ken\n", 0),
        "python -m jobs.backends.slurm world-info": ("V09STEQ=\n", 0),
    })
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    env.update(SLURM_JOB_ID=FAKE_JOB_ID, SLURM_JOB_NODELIST="n[1-3]", SLURM_NNODES=str(len(nodes)),
               SLURM_CPUS_ON_NODE=str(cpus))
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return calls(log)


def _script(spec: JobSpec, tmp_path: Path, **options) -> str:
    return SlurmScript(spec, SlurmOptions(**options), tmp_path / "logs", python_bin=tmp_path / "stubs").text()


def test_curation_script_starts_ray_in_the_allocation_then_the_pipeline(project, tmp_path):
    spec = prepare(["curate", "recipe.yaml", "--set", f"output={HOSTILE}", "--no-progress"],
                   env={"HF_TOKEN_NOTE": "a b $HOME"})
    text = _script(spec, tmp_path, nodes=3, gpus_per_node=2, cpus_per_node=16, time="04:00:00", partition="gpu")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [f"#SBATCH --job-name={spec.name}", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --cpus-per-task=16", "#SBATCH --gpus-per-node=2", "#SBATCH --time=04:00:00",
                      "#SBATCH --partition=gpu", f"#SBATCH --output={tmp_path / 'logs' / 'slurm-%j.out'}"]

    cmds = _run_script(text, tmp_path, ["n1", "n2", "n3"])
    srun = [c for c in cmds if c[0] == "srun"]
    head = [c for c in srun if "--head" in c]
    workers = [c for c in srun if "--address=10.0.0.1:" + str(20000 + int(FAKE_JOB_ID) % 10000) in c]
    assert len(head) == 1 and "-w" in head[0] and head[0][head[0].index("-w") + 1] == "n1"
    assert {"--dashboard-host=127.0.0.1", "--num-cpus=16", "--num-gpus=2", "--block",
            f"--temp-dir=/tmp/lvd-ray-{FAKE_JOB_ID}", "--node-ip-address=10.0.0.1"} <= set(head[0])
    assert sorted(c[c.index("-w") + 1] for c in workers) == ["n2", "n3"]
    assert all("--gpus-per-task=2" in c and "--cpus-per-task=16" in c for c in head + workers)
    waits = [c for c in cmds if c[:3] == ["python", "-m", "jobs.backends.slurm"]]
    assert [w[-2] for w in waits] == ["1", "3"]  # the head first, then all three nodes
    lvd = [c for c in cmds if c[0] == "lvd"]
    gcs = f"10.0.0.1:{20000 + int(FAKE_JOB_ID) % 10000}"
    assert lvd == [["lvd", "curate", "recipe.yaml", "--set", f"output={HOSTILE}", "--no-progress", "--address", gcs]]
    assert cmds.index(lvd[0]) > cmds.index(waits[-1])
    assert not list(tmp_path.rglob("pwned")) and not (Path.cwd() / "pwned").exists()


def test_the_ray_token_is_a_private_file_given_only_to_rays_steps_and_the_lvd_command(project, tmp_path):
    prolog = tmp_path / "prolog.sh"
    prolog.write_text("scontrol show config\n")  # stands for `module load ...`: must not see the token
    spec = prepare(["curate", "recipe.yaml"], env={"NOTE": "x"})
    text = _script(spec, tmp_path, nodes=3, prolog=str(prolog))
    assert "RAY_AUTH_TOKEN=" not in text  # the token itself is in no environment, only the file's path
    records = _run_script_calls(text, tmp_path, ["n1", "n2", "n3"])
    token = tmp_path / "logs" / f".ray-token-{FAKE_JOB_ID}"
    given = [r for r in records if r["env"]]
    assert sorted(r["cmd"][0] for r in given) == ["lvd", "python", "python", "srun", "srun", "srun"]
    assert all(r["cmd"][0] != "srun" or "ray" in r["cmd"] for r in given)  # the Ray steps, nothing else
    for r in given:
        assert r["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, r
        assert r["token_file"] == {"mode": "0o600", "text": "t0ken\n"}, r  # made by `python -c` (stubbed)
    others = [r["cmd"][:2] for r in records if not r["env"]]
    assert ["scontrol", "show"] in others and ["python", "-c"] in others and ["hostname", "--ip-address"] in others
    assert not token.exists()  # removed when the job script exits


def test_script_environment_is_quoted_and_exported(project, tmp_path):
    spec = prepare(["curate", "recipe.yaml"], env={"ODD": "a b $HOME `x` 'q'"})
    text = _script(spec, tmp_path)
    probe = tmp_path / "probe.sh"
    env_lines = [line for line in text.splitlines() if line.startswith(("export ODD=", "cd "))]
    probe.write_text("\n".join(env_lines) + '\nprintf "%s|%s" "$ODD" "$PWD"\n')
    out = subprocess.run(["bash", str(probe)], capture_output=True, text=True, env={"HOME": "/nowhere"}).stdout
    assert out == f"a b $HOME `x` 'q'|{project}"


def test_training_script_runs_torchrun_on_every_node(project, tmp_path):
    spec = _train_spec()
    text = _script(spec, tmp_path, nodes=2, gpus_per_node=8)
    assert "#SBATCH --exclusive" in text and "ray start" not in text
    cmds = _run_script(text, tmp_path, ["n1", "n2"])
    (srun,) = [c for c in cmds if c[0] == "srun"]
    port = 20000 + int(FAKE_JOB_ID) % 10000
    i = srun.index("torchrun")
    assert srun[1:i] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--gpus-per-task=8"]
    assert srun[i:i + 7] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=n1:{port}", f"--rdzv-id={FAKE_JOB_ID}", "--no-python"]
    assert srun[i + 7:] == ["lvd", *spec.argv]


def test_training_script_with_the_deepspeed_launcher(project, tmp_path):
    spec = _train_spec()
    text = _script(spec, tmp_path, nodes=2, gpus_per_node=4, launcher="deepspeed")
    cmds = _run_script(text, tmp_path, ["n1", "n2"])
    assert ["python", "-m", "jobs.backends.slurm", "world-info", "4", "n1", "n2"] in cmds
    (srun,) = [c for c in cmds if c[0] == "srun"]
    i = srun.index("bash")
    port = 20000 + int(FAKE_JOB_ID) % 10000
    launch_args = srun[i + 3:]
    assert launch_args == ["deepspeed-launch", "--world_info=V09STEQ=", "--master_addr=10.0.0.1",
                           f"--master_port={port}", "--no_python", "--no_local_rank", "lvd", *spec.argv]
    # the node rank is expanded on each node, inside the task
    stubs = tmp_path / "stubs"
    log = tmp_path / "task.jsonl"
    env = {**stub_env(stubs, log, {}), "SLURM_NODEID": "1"}
    subprocess.run(srun[i:i + 3] + launch_args, env=env, check=True)
    (task,) = [c["cmd"] for c in calls(log)]
    assert task[:4] == ["python", "-m", "deepspeed.launcher.launch", "--node_rank=1"]
    assert task[4:] == launch_args[1:]


def test_world_info_is_what_the_deepspeed_launcher_decodes():
    info = json.loads(base64.urlsafe_b64decode(world_info(2, ["gpu-a", "gpu-b"])))
    assert info == {"gpu-a": [0, 1], "gpu-b": [0, 1]}


def test_a_single_process_command_runs_once_on_the_first_node(project, tmp_path):
    spec = prepare(["sample", "--random-init", "--out", "/data/s.mp4", "--prompt", "a 'square'; rm -rf /"])
    text = _script(spec, tmp_path, gpus_per_node=1)
    assert "--exclusive" not in text and "srun" not in text
    cmds = _run_script(text, tmp_path, ["n1"])
    assert [c for c in cmds if c[0] == "lvd"] == [["lvd", *spec.argv]]


@pytest.mark.parametrize("options, message", [
    ({"partition": "gpu\n#SBATCH --uid=0"}, "#SBATCH line cannot hold"),
    ({"account": "a b"}, "#SBATCH line cannot hold"),
    ({"sbatch_options": ["--qos=high --wrap=x"]}, "must be one option"),
    ({"nodes": 0}, "at least 1"),
])
def test_values_an_sbatch_line_cannot_hold_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**options)


def test_scripts_refuse_what_would_fail_on_the_cluster(project, tmp_path):
    with pytest.raises(ConfigError, match="runs on one node"):
        _script(prepare(["sample", "--random-init", "--out", "/x.mp4"]), tmp_path, nodes=2)
    with pytest.raises(ConfigError, match="remove --address"):
        _script(prepare(["curate", "recipe.yaml", "--address", "auto"]), tmp_path)
    with pytest.raises(ConfigError, match="one process per GPU"):
        _script(_train_spec(), tmp_path, launcher="deepspeed")
    with pytest.raises(ConfigError, match="remove --launcher, --nproc"):
        _script(prepare(["train", str(REPO / "recipes/train/tiny_stage1.yaml"), "--launcher", "torchrun",
                         "--nproc", "2"]), tmp_path)
    with pytest.raises(ConfigError, match="log directory"):
        SlurmScript(prepare(["curate", "recipe.yaml"]), SlurmOptions(), tmp_path / "a b")


def test_missing_sbatch_is_a_clear_error_and_nothing_is_recorded(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["submit", "--backend", "slurm", "--", "curate", "recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert JobStore().all() == []


def test_submit_status_logs_cancel_through_the_slurm_commands(project, tmp_path, monkeypatch, capsys):
    stubs = make_stubs(tmp_path / "bin", ["sbatch", "squeue", "scontrol", "scancel"])
    log = tmp_path / "calls.jsonl"
    answers = {"sbatch --parsable": ("4242;clusterA\n", 0), "squeue -h -j 4242": ("RUNNING\n", 0)}
    for key, value in stub_env(stubs, log, answers, os.environ["PATH"]).items():
        monkeypatch.setenv(key, value)
    assert main(["submit", "--backend", "slurm", "--log-dir", str(tmp_path / "logs"), "--",
                 "curate", "recipe.yaml"]) == 0
    record = JobStore().find("4242")
    script = Path(record.info["script"])
    assert calls(log)[0]["cmd"] == ["sbatch", "--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash") and record.info["log"] == str(tmp_path / "logs" / "slurm-4242.out")
    assert record.output == "/data/runs/cur1" and record.recipe == str(project / "recipe.yaml")

    capsys.readouterr()
    assert main(["jobs", "status", "4242"]) == 0
    assert "RUNNING (Slurm RUNNING)" in capsys.readouterr().out
    Path(record.info["log"]).write_text("line one\nfunnel\n")
    assert main(["jobs", "logs", "4242"]) == 0
    assert capsys.readouterr().out == "line one\nfunnel\n"
    assert main(["jobs", "cancel", "4242"]) == 0
    assert calls(log)[-1]["cmd"] == ["scancel", "4242"]

    # finished: squeue forgets the job, scontrol still knows it
    monkeypatch.setenv("STUB_ANSWERS", json.dumps({"squeue": ("", 0),
                                                   "scontrol show job": ("JobId=4242 JobState=CANCELLED ExitCode=0:15\n", 0)}))
    assert SlurmBackend().status(JobStore().find("4242")).state is JobState.STOPPED


# --- a real Slurm (single node), when slurm-wlm is installed and we may start its daemons ---

def _slurm_available() -> str | None:
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel") if not shutil.which(t)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd with a private config (own ports, state and spool dirs, auth/none) in tmp."""
    reason = _slurm_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=lvdtest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/none", "CredType=cred/none", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([d, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True) for d in ("slurmctld", "slurmd")]
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield conf
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env)
            time.sleep(2)
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.wait(timeout=30)


@pytest.fixture
def real_slurm(slurm, project, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm))
    return project


def _write_videos(folder: Path) -> Path:
    from curation.testing.synthetic import hard_cuts, moving_square, write_video

    folder.mkdir()
    write_video(folder / "cut.mp4", hard_cuts([30], 60, speed=2), 24)
    write_video(folder / "square.mp4", moving_square(48, speed=3), 24)
    return folder


@pytest.mark.slow  # about a minute on 2 busy cores: a Ray head and the pipeline inside the allocation
def test_real_slurm_curation_with_ray_inside_the_allocation(real_slurm, tmp_path, capsys):
    from curation.ledger import Ledger

    videos = _write_videos(tmp_path / "videos")
    (real_slurm / "recipe.yaml").write_text(yaml.safe_dump({
        "inputs": [str(videos)], "decode": {"key_frame_max_side": 320},
        "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0}, "text": {"enabled": False}}))
    out = tmp_path / "curated"
    assert main(["submit", "--backend", "slurm", "--", "curate", "recipe.yaml", "--set", f"output={out}",
                 "--no-progress"]) == 0
    record = JobStore().all()[0]
    assert main(["jobs", "logs", record.job_id, "--follow"]) == 0
    logs = capsys.readouterr().out
    assert "Ray cluster at" in logs and "funnel" in logs
    assert main(["jobs", "status", record.name, "--wait", "--timeout", "60"]) == 0, logs
    videos_df, _ = Ledger(out).read()
    assert sorted(videos_df["status"]) == ["ok", "ok"]
    # the Ray processes of the allocation went with it
    assert subprocess.run(["pgrep", "-f", f"lvd-ray-{record.job_id}"], capture_output=True).stdout == b""


def test_real_slurm_cancel(real_slurm, tmp_path, capsys):
    out = tmp_path / "never.mp4"
    assert main(["submit", "--backend", "slurm", "--", "sample", "--random-init", "--steps", "100000",
                 "--out", str(out)]) == 0
    record = JobStore().all()[0]
    backend = SlurmBackend()
    deadline = time.monotonic() + 60
    while backend.status(record).state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert main(["jobs", "cancel", record.name]) == 0
    deadline = time.monotonic() + 60
    while (state := backend.status(record).state) is JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert state is JobState.STOPPED
    assert not out.exists()


@pytest.mark.slow  # about a minute: torchrun starting a tiny training stage
def test_real_slurm_training_with_torchrun(real_slurm, tmp_path, capsys):
    out = tmp_path / "stage1"
    assert main(["submit", "--backend", "slurm", "--cpus-per-node", str(os.cpu_count()), "--env", "HF_HUB_OFFLINE=1",
                 "--", "train", str(REPO / "recipes" / "train" / "tiny_stage1.yaml"), "--set", "data.source=synthetic",
                 "--set", "steps=2", "--set", f"output={out}"]) == 0
    record = JobStore().all()[0]
    assert main(["jobs", "status", record.name, "--wait", "--timeout", "300"]) == 0, \
        Path(record.info["log"]).read_text()[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert "torchrun" in Path(record.info["script"]).read_text()
