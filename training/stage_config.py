"""A training stage's recipe (recipes/train/*.yaml): what data, which model and weights, what trains, how.

A stage recipe is the model recipe (model / objective / conditioning / sampler, as recipes/model/*.yaml)
plus the stage's data (a subset query over the shard manifest, buckets, frames, fps, image/video mix),
its optimisation (DeepSpeed ZeRO, precision, learning rate and schedule, EMA), where it starts from
(`init_from`) and how it checkpoints, logs and exports. SVD's three stages are three such files, each
starting from the previous one's output folder:

    lvd train recipes/train/stage1_image.yaml
    lvd train recipes/train/stage2_video.yaml      # init_from: the stage-1 output
    lvd train recipes/train/stage3_hq.yaml         # init_from: the stage-2 output
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pydantic

from common.config import Config
from shards.config import LoaderConfig
from training.model.config import DiffusionConfig
from training.evaluation import EvalConfig


class SyntheticDataConfig(Config):
    """In-memory batches made once at start-up: a tiny fixed dataset for tests, the data-free side of
    `lvd bench train`. Sample i is a square moving across a textured background (its own colour, speed and
    direction), so there is something to learn and the loss falls."""

    num_samples: int = 8
    """Distinct samples; an epoch is these samples in a seeded order, cut into batches."""
    batch_size: int = 2
    num_frames: int = 4
    height: int = 32
    width: int = 32
    kind: Literal["frames", "latents"] = "frames"
    """frames: uint8 RGB the VAE encodes each step (as decoded shards); latents: random latents of the model's
    latent size (as precomputed shards: no VAE work, the pure training step)."""
    image_ratio: float = 0.0
    """Fraction of batches that are single-frame image batches."""
    epochs: int | None = None
    """Stop after this many epochs (None: endless). With a batch count per epoch that does not divide by the
    number of ranks, ranks run out one batch apart: the case the loop's end-of-data agreement exists for."""
    fps: float = 8.0
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> SyntheticDataConfig:
        for name in ("num_samples", "batch_size", "num_frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic.{name} ({getattr(self, name)}) must be at least 1")
        if self.num_samples < self.batch_size:
            raise ValueError(f"synthetic.num_samples ({self.num_samples}) must be at least batch_size "
                             f"({self.batch_size}) to fill one batch")
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ValueError(f"synthetic.image_ratio ({self.image_ratio}) is a fraction; use a value in [0, 1]")
        return self


class DataConfig(Config):
    """Where batches come from: the shard loader (a subset of the manifest) or synthetic in-memory batches."""

    source: Literal["shards", "synthetic"] = "shards"
    shards: LoaderConfig | None = None
    """The streaming loader: `shards` folder, `query` (the stage's subset), `batch_size` per rank, `num_frames`,
    `fps`, `resolutions` (buckets), `image_ratio` (joint image-video training), `latents` (precomputed or not)."""
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    default_motion_bucket: float = 127.0
    """Motion bucket for clips curation gave none (NaN in the manifest); SVD's default is 127."""
    plan_timeout_s: float = 3600.0
    """How long the other ranks wait for rank 0 to write the stage's plan (OUTPUT/plan) when no launcher wrote it
    before they started (Ray Train on a cluster, a plain `python -m training.run`)."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "shards":
            if self.shards is None:
                raise ValueError("data.source is shards but data.shards is not set; give data.shards.shards (the "
                                 "shard folder) or use data.source=synthetic")
            if self.shards.remainder == "uneven":
                raise ValueError("data.shards.remainder (uneven) gives ranks different batch counts, which would stall "
                                 "the gradient all-reduce; use drop or pad for training")
            if self.shards.output != "tensors":
                raise ValueError("data.shards.output must be tensors for training (raw is for benchmarks)")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.shards.batch_size if self.source == "shards" and self.shards else self.synthetic.batch_size


class OptimizerConfig(Config):
    """AdamW. `fused: false` is torch.optim.AdamW (nothing compiled at start-up); `fused: true` asks DeepSpeed
    for its FusedAdam, which builds a CUDA op on first use (GPU runs that want the speed)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = False

    @pydantic.field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"optimizer.lr ({v}) must be a positive number, e.g. 1e-4")
        return v


class ScheduleConfig(Config):
    """Learning rate: linear warm-up from 0 to optimizer.lr over `warmup_steps`, then `decay` to
    `min_lr_ratio` x lr at the stage's last step."""

    warmup_steps: int = 0
    decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0

    @pydantic.model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps ({self.warmup_steps}) must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio ({self.min_lr_ratio}) is a fraction of lr; use [0, 1]")
        return self


class DeepSpeedConfig(Config):
    """The DeepSpeed engine. Only the trainable part (UNet and the text projection) goes to DeepSpeed; the
    frozen VAE and text tower stay plain modules, outside ZeRO's partitioning and the optimizer."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    """Max global gradient norm (0: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's block activations in the backward pass (less memory, ~30% more compute)."""
    cpu_shm_comm: bool = False
    """On CPU, DeepSpeed builds a shared-memory all-reduce op (`deepspeed_shm_comm`, ~40 s of C++ compile) when
    it starts; training uses torch.distributed's gloo collectives anyway, so it is skipped unless asked."""
    extra: dict[str, Any] = {}
    """Merged into the generated DeepSpeed config, e.g. {zero_optimization: {overlap_comm: true}}."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"deepspeed.gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be >= 1")
        if self.gradient_clipping < 0:
            raise ValueError(f"deepspeed.gradient_clipping ({self.gradient_clipping}) must be >= 0 (0: off)")
        return self


class EMAConfig(Config):
    """Exponential moving average of the trained weights (kept in fp32 on rank 0; exported by default)."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True
    """Use min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated by the init."""
    update_every: int = 1
    """Update every this many steps (with decay^k): under ZeRO-3 an update gathers the partitioned weights."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> EMAConfig:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay ({self.decay}) must be in (0, 1), e.g. 0.9999")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every ({self.update_every}) must be at least 1")
        return self


class CheckpointConfig(Config):
    every: int = 1000
    """Save every this many steps (and at the end). A restart resumes from the newest complete one."""
    keep_last: int = 2
    """Older checkpoints are deleted (0: keep all)."""


class LoggingConfig(Config):
    every: int = 10
    """One metrics line (and the trackers' scalars) every this many steps, from rank 0."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Trackers that get the metrics, sample videos and contact sheets besides OUT/metrics.jsonl, as
    diffusers' training scripts' --report_to: tensorboard (OUT/tensorboard/), wandb, mlflow; [] for none.
    lvd requires none of these packages; naming one that is not installed is an error before training."""
    project: str = "lvd"
    """The wandb project / mlflow experiment the stage's run goes to (the run is named after the stage)."""

    @pydantic.field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @pydantic.field_validator("report_to")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        from training.trackers import check_installed

        check_installed(v)
        return list(dict.fromkeys(v))


class SamplesConfig(Config):
    """Sample videos written during training (OUT/samples/step_N.mp4): what the model makes of a fixed prompt
    and the first frame of a fixed training clip, at every `every` steps."""

    every: int = 0
    """0: no samples during training."""
    prompt: str = ""
    num_steps: int = 10
    seed: int = 0


class ExportConfig(Config):
    ema: bool = True
    """Export the EMA weights (when ema.enabled) rather than the last step's."""


class TrainConfig(DiffusionConfig):
    """One training stage. See the module docstring."""

    name: str = "stage"
    output: str
    """The stage's folder: checkpoints/, model/ (the diffusers-format export), metrics.jsonl, tensorboard/,
    samples/, summary.json, eval.jsonl and eval.json (held-out loss, when `eval` is set). `lvd sample --model
    OUTPUT` and the next stage's `init_from: OUTPUT` read model/."""
    init_from: str | None = None
    """The weights to start from: the previous stage's output folder, an lvd export, or a diffusers-format
    SVD folder (unet/ + vae/; the text tower then comes from model.text.pretrained). None: random init
    (seeded), for the tiny model."""
    seed: int = 0
    steps: int
    """Optimizer steps of this stage."""
    trainable: Literal["all", "temporal", "spatial"] = "all"
    """Which UNet parameters train: all; temporal (only the layers inserted for video, as when turning an image
    model into a video model); spatial (the image layers)."""
    train_text_projection: bool = True
    """Train the Linear that maps text token states to the UNet's width (the text tower itself is frozen)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ema: EMAConfig = EMAConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    samples: SamplesConfig = SamplesConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    """Held-out denoising loss at fixed sigmas and noise seeds (training/evaluation.py): set eval.query or
    eval.subset to the held-out clips; logged as eval_loss (eval.jsonl, TensorBoard's eval/), the last in eval.json."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps < 1:
            raise ValueError(f"steps ({self.steps}) must be at least 1")
        if self.schedule.warmup_steps > self.steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds steps ({self.steps}); "
                             "lower it")
        if self.checkpoint.every < 1 or self.logging.every < 1:
            raise ValueError(f"checkpoint.every ({self.checkpoint.every}) and logging.every ({self.logging.every}) "
                             "must be at least 1")
        if self.eval.enabled and self.data.source != "shards":
            raise ValueError("eval.query / eval.subset select held-out clips of the training shards; they need "
                             "data.source=shards (unset eval.query and eval.subset for synthetic data)")
        m = self.model.pixel_multiple
        sizes = []
        if self.data.source == "shards" and self.data.shards is not None:
            sizes = [tuple(r) for r in self.data.shards.resolutions]
        elif self.data.source == "synthetic":
            sizes = [(self.data.synthetic.height, self.data.synthetic.width)]
        for h, w in sizes:
            if h % m or w % m:
                raise ValueError(f"resolution {h}x{w} is not a multiple of {m} (this model's VAE x UNet "
                                 f"downsampling); use e.g. {max(m, h // m * m)}x{max(m, w // m * m)}")
        return self
