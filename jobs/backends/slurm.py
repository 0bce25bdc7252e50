"""Submit to Slurm: generate an sbatch script, submit it with `sbatch --parsable`, follow it with
squeue/scontrol/sacct and the job's output file.

What the script runs, by the command's launch (jobs/submit.py):
  ray     a Ray cluster inside the allocation (head on the first node, one worker per other node, each a
          `srun ... ray start --block` step; dashboard on 127.0.0.1), then the lvd command with --address
          HEAD_IP:PORT. Steps are stopped when the script exits. Token auth with a fresh per-job token, in a
          file only the job's user can read (0600, in the job's log folder on the shared filesystem, removed at
          exit); only Ray's steps and the lvd command are told its path (RAY_AUTH_TOKEN_PATH), the token itself
          is in no environment, so the prolog and --env commands never see it.
  torch   `srun` one task per node running torchrun (c10d rendezvous at the first node, id = the job id), or
          the DeepSpeed launcher (deepspeed.launcher.launch per node with the allocation's world info).
  single  the lvd command, once, on the first node.

Every value taken from the user (paths, recipe, --set values, environment) is quoted with shlex.quote; the
lvd command is a bash array of quoted words. #SBATCH lines are read by sbatch, not by a shell, so their
values are restricted to characters that need no quoting at all.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, TextIO

import pydantic

from common.config import Config, ConfigError
from jobs.backends import Backend, JobError, JobState, JobStatus
from jobs.records import JobRecord, lvd_home, utc_now
from jobs.submit import JobSpec

_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.:/%@+,=\-]+")
POLL_S = 2.0

# Slurm job states -> lvd's. Anything else (e.g. a future state) reads as RUNNING while squeue lists it.
_STATES = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING, "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "CANCELLED": JobState.STOPPED,
    "FAILED": JobState.FAILED, "TIMEOUT": JobState.FAILED, "NODE_FAIL": JobState.FAILED, "PREEMPTED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED, "DEADLINE": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED, "REVOKED": JobState.FAILED,
}


class SlurmOptions(Config):
    """`lvd submit --backend slurm` settings; None leaves the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None   # None: whole nodes (--exclusive) for Ray and torch launches
    mem: str | None = None             # per node, e.g. 64G
    time: str | None = None            # e.g. 04:00:00 or 2-00:00:00
    partition: str | None = None
    account: str | None = None
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"  # for training
    log_dir: str | None = None         # the job's output file goes here (default $LVD_HOME/jobs/NAME/)
    prolog: str | None = None          # a file of shell lines run before the job (module load ...; verbatim)
    sbatch_options: list[str] = []    # more #SBATCH lines, e.g. --qos=high

    @pydantic.field_validator("nodes")
    @classmethod
    def _nodes(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"nodes must be at least 1, got {v}")
        return v

    @pydantic.field_validator("gpus_per_node")
    @classmethod
    def _gpus(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"gpus_per_node must be 0 or more, got {v}")
        return v

    @pydantic.field_validator("cpus_per_node")
    @classmethod
    def _cpus(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"cpus_per_node must be at least 1, got {v}")
        return v

    @pydantic.field_validator("mem", "time", "partition", "account")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and not _SBATCH_VALUE.fullmatch(v):
            raise ValueError(f"{v!r} has characters an #SBATCH line cannot hold (spaces, quotes, ...); "
                             "use letters, digits and _.:/%@+,=-")
        return v

    @pydantic.field_validator("sbatch_options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("-") or not _SBATCH_VALUE.fullmatch(opt):
                raise ValueError(f"sbatch option {opt!r} must be one option such as --qos=high "
                                 "(letters, digits and _.:/%@+,=- only)")
        return v


def _q(value: object) -> str:
    return shlex.quote(str(value))


class SlurmScript:
    """The sbatch script for one JobSpec."""

    def __init__(self, spec: JobSpec, options: SlurmOptions, log_dir: Path, python_bin: Path | None = None):
        self.spec = spec
        self.options = options
        self.log_dir = log_dir
        # The environment lvd was submitted from: on a cluster's shared filesystem the nodes see it too.
        self.python_bin = python_bin or Path(sys.executable).parent
        self._check()

    def _check(self) -> None:
        spec, o = self.spec, self.options
        if not _SBATCH_VALUE.fullmatch(str(self.log_dir)):
            raise ConfigError(f"log directory {self.log_dir} has characters an #SBATCH line cannot hold; "
                              "pass --log-dir with a path of letters, digits and _.:/%@+,=- only")
        if spec.launch == "single" and o.nodes > 1:
            raise ConfigError(f"lvd {spec.command} runs on one node; drop --nodes {o.nodes}")
        if spec.launch == "ray" and spec.has_option("--address"):
            raise ConfigError("remove --address from the lvd command: the Slurm job starts Ray inside the "
                              "allocation and passes the address itself")
        if spec.launch == "torch":
            own = [opt for opt in ("--launcher", "--nproc", "--nnodes", "--node-rank", "--master-addr",
                                   "--master-port", "--address") if spec.has_option(opt)]
            if own:
                raise ConfigError(f"remove {', '.join(own)} from the lvd command: the Slurm job starts the ranks "
                                  "itself (torchrun or the DeepSpeed launcher on every node); size it with --nodes "
                                  "and --gpus-per-node")
        if spec.launch == "torch" and o.launcher == "deepspeed" and o.gpus_per_node == 0:
            raise ConfigError("the DeepSpeed launcher places one process per GPU; give --gpus-per-node, "
                              "or use --launcher torchrun for CPU processes")

    @property
    def log_pattern(self) -> str:
        return str(self.log_dir / "slurm-%j.out")

    def header(self) -> list[str]:
        spec, o = self.spec, self.options
        lines = ["#!/bin/bash",
                 f"# lvd job {spec.name}: {spec.display()}",
                 "# written by `lvd submit --backend slurm`; to run it again: sbatch THIS_FILE",
                 f"#SBATCH --job-name={spec.name}",
                 f"#SBATCH --nodes={o.nodes}",
                 "#SBATCH --ntasks-per-node=1"]
        if o.cpus_per_node is not None:
            lines.append(f"#SBATCH --cpus-per-task={o.cpus_per_node}")
        elif spec.launch != "single":
            lines.append("#SBATCH --exclusive")  # Ray and torchrun size themselves to the whole node
        if o.gpus_per_node:
            lines.append(f"#SBATCH --gpus-per-node={o.gpus_per_node}")
        for key in ("mem", "time", "partition", "account"):
            if getattr(o, key) is not None:
                lines.append(f"#SBATCH --{key}={getattr(o, key)}")
        lines.append(f"#SBATCH --output={self.log_pattern}")
        lines += [f"#SBATCH {opt}" for opt in o.sbatch_options]
        return lines

    def environment(self) -> list[str]:
        spec = self.spec
        lines = ["set -euo pipefail", "",
                 f"cd {_q(spec.cwd)}",
                 f"export PATH={_q(self.python_bin)}:\"$PATH\"  # the environment lvd was submitted from",
                 "export PYTHONUNBUFFERED=1"]
        lines += [f"export {key}={_q(value)}" for key, value in spec.env.items()]
        if self.options.prolog:
            path = Path(self.options.prolog)
            try:
                prolog = path.read_text()
            except OSError as e:
                raise ConfigError(f"--prolog {path}: {e.strerror}") from None
            lines += ["", f"# --- prolog from {path} (copied verbatim) ---", prolog.rstrip("\n"), "# --- end of prolog ---"]
        lines += ["",
                  f"lvd_cmd=({' '.join(_q(a) for a in spec.lvd_argv())})",
                  'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
                  'head_node=${nodes[0]}',
                  "# the batch script runs on the first node; skip a loopback answer from /etc/hosts",
                  "head_ip=$(hostname --ip-address | awk '{print $1}')",
                  'case "$head_ip" in 127.*|"") head_ip=$(hostname -I | awk \'{print $1}\') ;; esac',
                  'echo "lvd job $SLURM_JOB_ID on ${#nodes[@]} node(s): ${nodes[*]}; first node $head_node ($head_ip)"']
        return lines

    def _step_resources(self) -> str:
        o = self.options
        cpus = ' --cpus-per-task="$node_cpus"'
        gpus = f" --gpus-per-task={o.gpus_per_node}" if o.gpus_per_node else ""
        return cpus + gpus

    def _node_cpus(self) -> str:
        o = self.options
        return f"node_cpus={o.cpus_per_node}" if o.cpus_per_node else 'node_cpus=${SLURM_CPUS_ON_NODE:-1}'

    def launch_ray(self) -> list[str]:
        o = self.options
        gpus = f" --num-gpus={o.gpus_per_node}" if o.gpus_per_node else " --num-gpus=0"
        steps = self._step_resources()
        return [
            "",
            "# --- a Ray cluster inside the allocation: head here, one worker on every other node ---",
            self._node_cpus(),
            "ray_port=$((20000 + SLURM_JOB_ID % 10000))",
            "dashboard_port=$((30000 + SLURM_JOB_ID % 10000))",
            'ray_tmp="/tmp/lvd-ray-$SLURM_JOB_ID"  # short: Ray\'s socket paths must stay under 107 characters',
            "# a fresh token for this cluster only, in a file only this user can read, on the shared filesystem",
            "# (workers on the other nodes read it); only Ray's steps and the lvd command are given its path",
            f'ray_token={_q(self.log_dir)}/.ray-token-"$SLURM_JOB_ID"',
            "ray_steps=()",
            'stop_ray() { kill "${ray_steps[@]}" 2>/dev/null || true; wait || true; rm -rf "$ray_tmp" "$ray_token"; }',
            "trap stop_ray EXIT",
            f"(umask 077 && mkdir -p {_q(self.log_dir)} && "
            "python -c 'import secrets; print(secrets.token_hex(32), end=\"\")' > \"$ray_token\")",
            'ray_auth=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$ray_token")',
            f'env "${{ray_auth[@]}}" srun --nodes=1 --ntasks=1{steps} -w "$head_node" \\',
            '    ray start --head --block --node-ip-address="$head_ip" --port="$ray_port" \\',
            '    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \\',
            f'    --num-cpus="$node_cpus"{gpus} --temp-dir="$ray_tmp" &',
            "ray_steps+=($!)",
            'env "${ray_auth[@]}" python -m jobs.backends.slurm wait-for-ray "$head_ip:$ray_port" 1 600',
            'for node in "${nodes[@]:1}"; do',
            f'    env "${{ray_auth[@]}}" srun --nodes=1 --ntasks=1{steps} -w "$node" \\',
            '        ray start --block --address="$head_ip:$ray_port" \\',
            f'        --num-cpus="$node_cpus"{gpus} --temp-dir="$ray_tmp" &',
            "    ray_steps+=($!)",
            "done",
            'env "${ray_auth[@]}" python -m jobs.backends.slurm wait-for-ray "$head_ip:$ray_port" "${#nodes[@]}" 600',
            "",
            'env "${ray_auth[@]}" "${lvd_cmd[@]}" --address "$head_ip:$ray_port"',
        ]

    def launch_torch(self) -> list[str]:
        o = self.options
        steps = self._step_resources()
        lines = ["",
                 "# --- one launcher per node; the rendezvous is the first node, keyed by the job id ---",
                 self._node_cpus(),
                 "master_port=$((20000 + SLURM_JOB_ID % 10000))"]
        if o.launcher == "torchrun":
            procs = o.gpus_per_node or 1
            lines += [
                "# torchrun hosts the rendezvous store on the node whose hostname the endpoint names",
                f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1{steps} \\',
                f'    torchrun --nnodes="$SLURM_NNODES" --nproc-per-node={procs} \\',
                '    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$master_port" --rdzv-id="$SLURM_JOB_ID" \\',
                '    --no-python "${lvd_cmd[@]}"',
            ]
        else:
            lines += [
                "master_addr=$head_ip",
                f'world_info=$(python -m jobs.backends.slurm world-info {o.gpus_per_node} "${{nodes[@]}}")',
                "# SLURM_NODEID differs per node, so it is expanded inside each task, not here",
                f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1{steps} \\',
                '    bash -c \'exec python -m deepspeed.launcher.launch --node_rank="$SLURM_NODEID" "$@"\' deepspeed-launch \\',
                '    --world_info="$world_info" --master_addr="$master_addr" --master_port="$master_port" \\',
                '    --no_python --no_local_rank "${lvd_cmd[@]}"',
            ]
        return lines

    def launch_single(self) -> list[str]:
        return ["", '"${lvd_cmd[@]}"']

    def text(self) -> str:
        launch = {"ray": self.launch_ray, "torch": self.launch_torch, "single": self.launch_single}[self.spec.launch]
        return "\n".join(self.header() + [""] + self.environment() + launch()) + "\n"


def _run(cmd: list[str], what: str, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise JobError(f"{cmd[0]} not found on PATH: {what} needs a Slurm client (run lvd on a login node); "
                       "`lvd submit --backend slurm --dry-run` prints the script without it")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise JobError(f"{shlex.join(cmd)} did not answer within {timeout:.0f} s; is slurmctld reachable?") from None


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, options: SlurmOptions | None = None):
        self.options = options or SlurmOptions()

    def log_dir(self, spec: JobSpec) -> Path:
        return Path(self.options.log_dir).expanduser().resolve() if self.options.log_dir else lvd_home() / "jobs" / spec.name

    def script(self, spec: JobSpec) -> SlurmScript:
        return SlurmScript(spec, self.options, self.log_dir(spec))

    def render(self, spec: JobSpec) -> str:
        return self.script(spec).text()

    def submit(self, spec: JobSpec) -> JobRecord:
        script = self.script(spec)
        text = script.text()
        if shutil.which("sbatch") is None:
            _run(["sbatch"], "submitting")  # raises the "not found" error
        script.log_dir.mkdir(parents=True, exist_ok=True)
        path = script.log_dir / f"{spec.name}.sbatch"
        path.write_text(text)
        proc = _run(["sbatch", "--parsable", str(path)], "submitting", cwd=spec.cwd)
        if proc.returncode != 0:
            raise JobError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()} (script: {path})")
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise JobError(f"sbatch answered {proc.stdout.strip()!r}, not a job id (script: {path})")
        recipe = spec.recipe_path
        return JobRecord(name=spec.name, backend="slurm", job_id=job_id, command=list(spec.argv),
                         recipe=str(recipe) if recipe else None, output=spec.output_path, cwd=str(spec.cwd),
                         submitted_at=utc_now(),
                         info={"script": str(path), "log": script.log_pattern.replace("%j", job_id)})

    def status(self, record: JobRecord) -> JobStatus:
        job = record.job_id
        proc = _run(["squeue", "-h", "-j", job, "-o", "%T"], "job status")
        state = proc.stdout.strip().split("\n")[0].strip() if proc.returncode == 0 else ""
        if state:
            return JobStatus(_STATES.get(state, JobState.RUNNING), f"Slurm {state}")
        # Finished jobs: scontrol remembers them for MinJobAge (300 s by default), sacct for as long as
        # accounting keeps them.
        proc = _run(["scontrol", "show", "job", "-o", job], "job status")
        if proc.returncode == 0:
            fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
            if "JobState" in fields:
                raw = fields["JobState"]
                return JobStatus(_STATES.get(raw, JobState.UNKNOWN), f"Slurm {raw}, exit {fields.get('ExitCode', '?')}")
        if shutil.which("sacct"):
            proc = _run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"], "job status")
            line = proc.stdout.strip().split("\n")[0] if proc.returncode == 0 else ""
            if line:
                raw, _, code = line.partition("|")
                raw = raw.split()[0]  # "CANCELLED by 1000" -> CANCELLED
                return JobStatus(_STATES.get(raw, JobState.UNKNOWN), f"Slurm {raw}, exit {code}")
        return JobStatus(JobState.UNKNOWN, f"Slurm no longer knows job {job} (no accounting?); "
                                           f"its output: {record.info.get('log')}")

    def logs(self, record: JobRecord, out: TextIO, follow: bool = False) -> None:
        log = Path(record.info["log"])
        offset = 0
        while True:
            if log.is_file():
                with log.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                out.write(chunk.decode(errors="replace"))
                out.flush()
            if not follow:
                if not log.is_file():
                    print(f"no output yet: {log} does not exist (the job has not started)", file=sys.stderr)
                return
            state = self.status(record).state
            if state.terminal or state is JobState.UNKNOWN:
                time.sleep(0.5)  # the last lines may land after the state changes
                if log.is_file() and log.stat().st_size > offset:
                    continue
                return
            time.sleep(POLL_S)

    def cancel(self, record: JobRecord) -> None:
        proc = _run(["scancel", record.job_id], "cancelling")
        if proc.returncode != 0:
            raise JobError(f"scancel {record.job_id}: {proc.stderr.strip()}")


# --- helpers the generated script calls on the nodes (python -m jobs.backends.slurm ...) ---

def wait_for_ray(address: str, num_nodes: int, timeout_s: float) -> None:
    """Returns once the Ray cluster at address has num_nodes alive nodes; exits 1 after timeout_s."""
    import logging
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:  # the GCS port first: ray.init on a closed port waits a long time before failing
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"no Ray head at {address} after {timeout_s:.0f} s")
            time.sleep(1)
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < num_nodes:
            if time.monotonic() > deadline:
                sys.exit(f"only {alive} of {num_nodes} Ray nodes joined {address} within {timeout_s:.0f} s")
            time.sleep(1)
        print(f"Ray cluster at {address}: {alive} node(s)", flush=True)
    finally:
        ray.shutdown()


def world_info(gpus_per_node: int, nodes: list[str]) -> str:
    """DeepSpeed's --world_info: base64 of {host: [local device ids]}, in node order."""
    import base64
    import json

    info = {node: list(range(gpus_per_node)) for node in nodes}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def _main(argv: list[str]) -> None:
    if argv[:1] == ["wait-for-ray"] and len(argv) == 4:
        wait_for_ray(argv[1], int(argv[2]), float(argv[3]))
    elif argv[:1] == ["world-info"] and len(argv) >= 3:
        print(world_info(int(argv[1]), argv[2:]))
    else:
        sys.exit("usage: python -m jobs.backends.slurm wait-for-ray HOST:PORT NUM_NODES TIMEOUT_S | "
                 "world-info GPUS_PER_NODE NODE...")


if __name__ == "__main__":
    _main(sys.argv[1:])
