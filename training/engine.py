"""DeepSpeed set-up: the process group, the engine's JSON config from a stage recipe, the LR schedule, and a
clean tear-down.

The same code runs under every launcher: one local process, `torchrun` (also what a Slurm job runs), the
DeepSpeed launcher, and Ray Train's TorchTrainer. Each sets RANK / WORLD_SIZE / LOCAL_RANK and a rendezvous
(MASTER_ADDR / MASTER_PORT) or has already initialised torch.distributed (Ray); `init_process_group` accepts
either, and a bare single process gets a world of its own that listens on loopback only.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from training.stage_config import TrainConfig


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool
    """True when this process created the process group (and so destroys it at the end)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_interface() -> str | None:
    """The name of the network interface holding 127.0.0.1 (lo on Linux, lo0 on macOS), if any."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def pick_device(config: TrainConfig, local_rank: int) -> torch.device:
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but no CUDA GPU is visible; set device=cpu (or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(config: TrainConfig) -> DistContext:
    import torch.distributed as dist

    created = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(config, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # torchrun, the DeepSpeed launcher, Slurm via torchrun: env:// rendezvous
            dist.init_process_group(backend=backend)
        else:  # a plain `python -m training.run` (or a test): a world of one, reachable from nowhere
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it is set
            # gloo listens on the address the hostname resolves to (often the network's); this world of one
            # talks only to itself
            loopback = loopback_interface()
            if backend == "gloo" and loopback:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
            # an in-memory store: a TCP store's server would listen on every interface
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    skip_cpu_shm_comm(config)
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, created)


def skip_cpu_shm_comm(config: TrainConfig) -> None:
    """DeepSpeed's comm backend builds its shared-memory CPU all-reduce op (`deepspeed_shm_comm`, a ~40 s C++
    compile) whenever its op table says the op is buildable; it serves DeepSpeed's inference all-reduce only.
    Marking it unavailable in that table (`deepspeed.ops.__compatible_ops__`, which DeepSpeed computes once and
    keeps for edits) makes training use torch.distributed's gloo collectives with no compile."""
    if config.deepspeed.cpu_shm_comm:
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class WarmupDecay:
    """LR multiplier per step: linear warm-up from 0, then constant / linear / cosine decay to min_lr_ratio.
    A class (not a lambda) so the scheduler's state_dict holds its settings and checkpoints restore it."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.decay, self.min_lr_ratio = decay, min_lr_ratio

    def __call__(self, step: int) -> float:
        # LambdaLR calls with the number of steps taken; step k's update uses lr(k) (k = 0 for the first).
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        shape = 1.0 - t if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def schedule_of(config: TrainConfig) -> WarmupDecay:
    s = config.schedule
    return WarmupDecay(s.warmup_steps, config.steps, s.decay, s.min_lr_ratio)


def apply_schedule(scheduler: Any, config: TrainConfig) -> None:
    """A loaded scheduler state carries the schedule's settings of the run that saved it; the recipe wins (a
    stage resumed with more steps decays over the new length), the step count is the checkpoint's."""
    for fn in getattr(scheduler, "lr_lambdas", []):
        if isinstance(fn, WarmupDecay):
            fn.__dict__.update(schedule_of(config).__dict__)


def make_scheduler(config: TrainConfig):
    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(config))

    return build


def deepspeed_config(config: TrainConfig, world_size: int, load_universal: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config of a stage (plus `deepspeed.extra`, merged last)."""
    ds, opt = config.deepspeed, config.optimizer
    micro = config.data.micro_batch_size
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": micro * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            # torch_adam: torch.optim.AdamW, nothing to compile; otherwise DeepSpeed's FusedAdam op is built
            "torch_adam": not opt.fused, "adam_w_mode": True}},
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,  # lvd prints its own line
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if ds.zero_stage == 3:
        # gather the full weights for the export and the EMA ourselves; no 16-bit consolidation at save
        out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return _merge(out, ds.extra)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def mark_universal_checkpointable(module: torch.nn.Module) -> None:
    """ds_to_universal requires the model to declare how its tensors are sliced across model-parallel ranks;
    a data-parallel-only model declares nothing but the format version."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def all_ranks_have(have: bool, device: torch.device) -> bool:
    """True when every rank has a batch for the next micro-step (a one-number MIN all-reduce; every rank must
    call it). The first rank to run out of data stops them all, so none waits forever in the gradient
    all-reduce of a step the others never take."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return have
    flag = torch.tensor([1 if have else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def teardown(engine: Any, ctx: DistContext | None, synchronize: bool = True) -> None:
    """Destroys the engine and, when this process made it, the process group: without this ZeRO-3 can abort
    at interpreter exit, and an in-process second run would find stale state. `synchronize=False` (after an
    error) skips the closing barrier, which ranks that failed elsewhere would never reach."""
    import torch.distributed as dist

    if engine is not None:
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    if ctx is not None and ctx.created_group and dist.is_initialized():
        import deepspeed.comm

        if synchronize:
            dist.barrier()
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups of this world
