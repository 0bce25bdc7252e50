"""Starting a stage under an existing launcher (never a home-made one): in this process, under torchrun or the
DeepSpeed launcher (as subprocesses with list arguments), or on Ray Train's TorchTrainer. All of them run
`training.loop.Trainer` in every rank; only who starts the ranks and sets up the rendezvous differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.local_ray import local_ray
from common.verbosity import ray_logging_level
from training.stage_config import TrainConfig


@dataclass
class Rendezvous:
    """Where the ranks of a multi-node torchrun job meet (the head node's address, a free port on it)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


def check_data(config: TrainConfig, world_size: int = 1) -> None:
    """Writes the stage's plan (OUTPUT/plan: subset, buckets, each epoch's batches; training/data.stage_plan)
    once, before any launcher starts, or finds the one there: missing shards, a query naming a score no sample
    has, or one that selects nothing is one line here instead of a traceback from every rank, and the ranks
    only read their slices of it."""
    if config.data.source != "shards":
        return
    from common.config import ConfigError
    from training.data import PlanError, stage_plan

    try:
        stage_plan(config, 0, world_size, waited_for=False)  # (no rank has started)
    except PlanError as e:
        raise ConfigError(f"data.shards: {e}") from None


def rank_env(threads: int = 1) -> dict[str, str]:
    """The environment of the rank processes: one math thread each unless the caller set OMP_NUM_THREADS
    (ranks sharing a CPU would otherwise oversubscribe it)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _run_args(recipe: str | Path, overrides: list[str]) -> list[str]:
    args = ["-m", "training.run", str(recipe)]
    for o in overrides:
        args += ["--set", o]
    return args


def torchrun_command(recipe: str | Path, overrides: list[str], nproc: int, rdzv: Rendezvous | None = None) -> list[str]:
    rdzv = rdzv or Rendezvous()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if rdzv.nnodes == 1 and rdzv.master_port is None:
        cmd += ["--standalone"]
    else:
        from training.engine import free_port

        cmd += ["--nnodes", str(rdzv.nnodes), "--node_rank", str(rdzv.node_rank), "--master_addr", rdzv.master_addr,
                "--master_port", str(rdzv.master_port or free_port())]
    return cmd + _run_args(recipe, overrides)


def deepspeed_command(recipe: str | Path, overrides: list[str], nproc: int, master_port: int | None = None) -> list[str]:
    """The DeepSpeed launcher on this node (`--num_accelerators` is how it counts processes on a CPU too)."""
    from training.engine import free_port

    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_accelerators", str(nproc), "--master_port", str(master_port or free_port()),
           "--module", "training.run", str(recipe)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_subprocess(cmd: list[str]) -> int:
    return subprocess.run(cmd, env=rank_env()).returncode


def run_local(config: TrainConfig):
    """One rank, in this process."""
    from training.loop import Trainer

    return Trainer(config).run()


# ---- Ray Train

def _restore_ray_checkpoint(config: TrainConfig) -> None:
    """Ray Train hands a restarted run the last checkpoint it reported (`ray.train.get_checkpoint()`; V2 has
    no resume_from_checkpoint argument). When the stage's own folder has no checkpoint (another machine, a
    wiped scratch disk), rank 0 copies that one in, so the Trainer resumes from it as from any other."""
    import ray.train
    import torch.distributed as dist

    from training.checkpoint import LATEST

    root = Path(config.output) / "checkpoints"
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and dist.get_rank() == 0 and not (root / LATEST).is_file():
        tag = Path(checkpoint.path).name
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, root / tag, dirs_exist_ok=True)
        (root / LATEST).write_text(tag)
    dist.barrier()


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs: the same Trainer, reporting checkpoints to Ray's storage."""
    import ray.train
    import torch.distributed as dist

    from common.verbosity import apply

    apply()
    config = TrainConfig.model_validate(loop_config["config"])
    _restore_ray_checkpoint(config)
    rank = dist.get_rank()

    def report(step: int, folder: Path, metrics: dict[str, Any]) -> None:
        # Every worker must call report the same number of times (it is a barrier); only rank 0 hands over the
        # folder, which holds every rank's files on the shared output storage. It blocks ~2 s, so only at
        # checkpoint steps.
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder.name)

    from training.loop import Trainer

    summary = Trainer(config, on_checkpoint=report).run()
    ray.train.report({"step": summary.steps, "final_loss": summary.final_loss, "done": True})


def run_ray(config: TrainConfig, num_workers: int, address: str | None = None, use_gpu: bool | None = None,
            storage_path: str | None = None, max_failures: int = 0,
            resources_per_worker: dict[str, float] | None = None):
    """Runs the stage on `num_workers` Ray Train workers (a local Ray when `address` is None). The output
    folder must be storage every worker sees (as under torchrun); Ray also keeps the reported checkpoints in
    `storage_path` (default OUTPUT/ray) and restarts failed workers up to `max_failures` times.
    `resources_per_worker`: Ray resources of each worker (default: Ray Train's, 1 CPU and 1 GPU with use_gpu)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import torch

    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    with ExitStack() as started:  # shuts down the Ray this call started
        if not ray.is_initialized():
            # Ray Train's print patch would log every metrics line a second time through its logger.
            runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
            level = ray_logging_level()
            if address:
                ray.init(address=address, logging_level=level, runtime_env=runtime_env)
                started.callback(ray.shutdown)
            else:
                started.enter_context(local_ray(num_cpus=max(num_workers + 1, os.cpu_count() or 1),
                                                include_dashboard=False, logging_level=level,
                                                runtime_env=runtime_env))
        output = Path(config.output).resolve()
        config = config.model_copy(update={"output": str(output)})
        trainer = TorchTrainer(
            ray_train_loop, train_loop_config={"config": config.model_dump(mode="json")},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                         resources_per_worker=resources_per_worker),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(name=config.name, storage_path=storage_path or str(output / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        return trainer.fit()
