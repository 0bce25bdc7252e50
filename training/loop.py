"""The training loop of one stage: DeepSpeed engine, batches, EMA, metrics, samples, checkpoints, export.

    summary = Trainer(load_recipe(TrainConfig, "recipes/train/tiny_stage1.yaml")).run()

Run it in every process of the job (training/run.py is the entry point launchers call). It resumes from
OUT/checkpoints/latest when there is one, on the same or another number of ranks.

Exactness of a resume: the model, optimizer, scheduler and EMA come back from the checkpoint; the loader
continues from its saved (epoch, consumed) position; and every random draw of a step (noise levels, noise,
instruction and caption dropout) comes from a generator seeded by (seed, step, micro-batch, rank), not from
a running generator, so the steps after a resume draw what the uninterrupted run drew.

Every rank runs the same number of steps: before each micro-batch the ranks agree (a one-number all-reduce)
that all of them have a batch; the first rank to run out stops them all, instead of leaving the others
waiting forever in the gradient all-reduce.

Letters: B batch, T frames, C latent channels, H x W latent cells.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import CheckpointStore
from training.data import BatchSource, make_batch_source
from training.ema import EMA
from training.engine import (DistContext, all_ranks_have, apply_schedule, deepspeed_config, init_process_group,
                             make_scheduler, mark_universal_checkpointable, teardown)
from training.metrics import IntervalTimes, MetricsLogger, StageSummary, memory_gb
from training.model.network import LatentVideoDiffusion
from training.stage_config import TrainConfig
from training.train_step import (DenoiserTrainModule, FrozenEncoders, StepInputs, count_parameters,
                                 select_trainable, step_seed)

CheckpointHook = Callable[[int, Path, dict[str, Any]], None]
"""(step, checkpoint folder, metrics) -> None, called on every rank after each checkpoint (Ray Train reports)."""


def load_initial_model(config: TrainConfig) -> LatentVideoDiffusion:
    """`init_from` (a previous stage's output, an export, an SVD folder), or a seeded random model."""
    if config.init_from is None:
        torch.manual_seed(config.seed)
        return LatentVideoDiffusion.build(config.model)
    from training.model.export import load_pretrained

    return load_pretrained(config.init_from, config=config.model)


class Trainer:
    """One stage on this process's rank. See the module docstring."""

    def __init__(self, config: TrainConfig, batches: BatchSource | None = None,
                 on_checkpoint: CheckpointHook | None = None) -> None:
        self.config = config
        self.batches = batches
        self.on_checkpoint = on_checkpoint
        self.out = Path(config.output)
        self.engine: Any = None

    def run(self) -> StageSummary:
        ctx = init_process_group(self.config)
        ok = False
        try:
            summary = self._run(ctx)
            ok = True
            return summary
        finally:
            # after a failure, no barrier: the other ranks may never reach it, and this rank must exit for the
            # launcher to notice and stop the job
            teardown(self.engine, ctx, synchronize=ok)
            self.engine = None

    # ---- set-up

    def _run(self, ctx: DistContext) -> StageSummary:
        import deepspeed
        import torch.distributed as dist

        c = self.config
        self.ctx = ctx
        if ctx.rank == 0:
            from common.runinfo import write_run_info

            write_run_info(self.out, c, "train", {"world_size": ctx.world_size, "device": str(ctx.device)})
        dist.barrier()

        model = load_initial_model(c)
        frozen_dtype = torch.bfloat16 if (c.deepspeed.precision == "bf16" and ctx.device.type == "cuda") else torch.float32
        for frozen in (model.vae, model.text_encoder.tower):
            frozen.to(ctx.device)
            if frozen_dtype != torch.float32:
                frozen.to(frozen_dtype)
        self.model = model
        self.encoders = FrozenEncoders(model, ctx.device, c.data.default_motion_bucket)
        module = DenoiserTrainModule(model, c.objective, c.conditioning)
        params = select_trainable(module, c.trainable, c.train_text_projection)
        if c.deepspeed.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        mark_universal_checkpointable(module)

        store = CheckpointStore(self.out / "checkpoints", ctx.rank, ctx.world_size)
        tag = store.latest()
        universal_tag = None
        if tag is not None and store.needs_universal(tag, c.deepspeed.zero_stage):
            universal_tag = store.make_universal(tag)

        engine, _, _, scheduler = deepspeed.initialize(
            model=module, model_parameters=params,
            config=deepspeed_config(c, ctx.world_size, load_universal=universal_tag is not None),
            lr_scheduler=make_scheduler(c))
        self.engine, self.scheduler, self.module = engine, scheduler, module
        zero3 = c.deepspeed.zero_stage == 3
        trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
        ema = EMA(c.ema, trained, ctx.rank, zero3) if c.ema.enabled else None

        batches = self.batches or make_batch_source(c, ctx.rank, ctx.world_size, model.config.latent_channels,
                                                    model.config.vae.downsample)
        start_step, samples_seen = 0, 0
        log = MetricsLogger(self.out, c.steps, c.logging.report_to, ctx.rank, run_name=c.name,
                            config=c.model_dump(mode="json"), project=c.logging.project)
        if tag is not None:
            state = store.load(engine, tag, universal_tag)
            apply_schedule(scheduler, c)
            start_step, samples_seen = int(state["step"]), int(state["samples_seen"])
            batches.load_state_dict(state["data"])
            if ema is not None:
                ema.load(store.ema_file(tag))
            how = f" (universal checkpoint, saved on {state['world_size']} ranks)" if universal_tag else ""
            log.event(f"resumed from {store.root / tag} at step {start_step}{how}")
        num_trained = count_parameters(params)
        log.event(f"stage {c.name}: {num_trained / 1e6:.2f}M trained parameters ({c.trainable}), ZeRO "
                  f"{c.deepspeed.zero_stage}, {c.deepspeed.precision}, {ctx.world_size} rank(s) on {ctx.device.type}, "
                  f"steps {start_step}->{c.steps}")
        self.heldout = None
        if c.eval.enabled:
            from training.evaluation import HeldOutEval

            assert c.data.shards is not None  # TrainConfig checks it
            self.heldout = HeldOutEval(c.eval, c.data.shards, self.encoders, module, ctx.rank, ctx.world_size,
                                       ctx.device)
        try:
            return self._train(batches, store, ema, log, start_step, samples_seen, num_trained,
                               tag)
        finally:
            log.close()

    # ---- the loop

    def _train(self, batches: BatchSource, store: CheckpointStore, ema: EMA | None, log: MetricsLogger,
               start_step: int, samples_seen: int, num_trained: int, resumed_from: str | None) -> StageSummary:
        c, ctx, engine = self.config, self.ctx, self.engine
        gas = c.deepspeed.gradient_accumulation_steps
        it = iter(batches)
        times = IntervalTimes()
        wall0 = time.perf_counter()
        total_wait = 0.0
        losses: list[tuple[int, float]] = []
        last_loss: float | None = None
        last_ckpt: str | None = None
        step = start_step
        sample_first: StepInputs | None = None
        saved_at = start_step if resumed_from else -1
        samples_before, local_samples = samples_seen, 0
        lr = engine.get_lr()[0]
        while step < c.steps:
            stop = False
            loss_acc = torch.zeros((), device=ctx.device)
            for micro in range(gas):
                t0 = time.perf_counter()
                batch = next(it, None)
                waited = time.perf_counter() - t0
                times.data_wait += waited
                total_wait += waited
                if not all_ranks_have(batch is not None, ctx.device):
                    stop = True
                    break
                t1 = time.perf_counter()
                inputs = self.encoders(batch)
                times.encode += time.perf_counter() - t1
                if sample_first is None:
                    sample_first = inputs
                gen = torch.Generator(ctx.device).manual_seed(step_seed(c.seed, step + 1, micro, ctx.rank))
                lr = engine.get_lr()[0]
                loss = engine(*inputs.tensors(), generator=gen)
                engine.backward(loss)
                engine.step()
                loss_acc += loss.detach().float()
                times.samples += inputs.batch_size
                times.corrupt += int(batch.get("num_corrupt", 0))
                local_samples += inputs.batch_size
            if stop:
                log.event(f"a rank ran out of data before step {step + 1}: every rank stops at step {step}")
                break
            step += 1
            times.steps += 1
            times.loss_sum += float(loss_acc)
            times.loss_count += gas
            if ema is not None:
                ema.update(step)
            if step % c.logging.every == 0 or step == c.steps:
                values = self._reduce_interval(times, lr)
                last_loss = values["loss"]
                losses.append((step, last_loss))
                log.log(step, values, eta_s=times.elapsed / max(1, times.steps) * (c.steps - step))
                times.reset()
            if c.eval.every and step % c.eval.every == 0 and step != c.steps:
                self._evaluate(step, log)
            if c.samples.every and step % c.samples.every == 0 and sample_first is not None:
                self._sample(step, sample_first, log)
            if step % c.checkpoint.every == 0 or step == c.steps:
                samples_seen = samples_before + int(self._sum_over_ranks(local_samples))
                last_ckpt = self._save(store, step, samples_seen, batches, ema, log)
                saved_at = step
        if times.steps:  # steps since the last log line (the data ran out between log steps)
            values = self._reduce_interval(times, lr)
            last_loss = values["loss"]
            losses.append((step, last_loss))
            log.log(step, values, eta_s=None)
        samples_seen = samples_before + int(self._sum_over_ranks(local_samples))
        if saved_at != step and step > start_step:  # stopped early (data ran out): keep what was learned
            last_ckpt = self._save(store, step, samples_seen, batches, ema, log)
        # also when a resumed run had nothing left to train but was stopped before its evaluation
        if self.heldout is not None and (step > start_step or not (self.out / "eval.json").is_file()):
            self._evaluate(step, log, final=True)
        export = self._export(ema)
        seconds = time.perf_counter() - wall0
        summary = StageSummary(
            name=c.name, output=str(self.out), steps=step, start_step=start_step, samples=samples_seen,
            seconds=seconds, samples_per_s=(samples_seen - samples_before) / max(seconds, 1e-9),
            data_wait_fraction=self._mean_over_ranks(total_wait / max(seconds, 1e-9)), final_loss=last_loss,
            world_size=ctx.world_size, trainable_parameters=num_trained, export=str(export) if export else None,
            checkpoint=last_ckpt, resumed_from=resumed_from, losses=losses,
            tensorboard=log.tensorboard_dir)
        if ctx.rank == 0:
            summary.write(self.out / "summary.json")
            for line in summary.lines():
                print(line, flush=True)
        return summary

    def _reduce_interval(self, times: IntervalTimes, lr: float) -> dict[str, Any]:
        """Every rank's numbers since the last log step, summed over ranks (a collective at log steps)."""
        import torch.distributed as dist

        elapsed = max(times.elapsed, 1e-9)
        vec = torch.tensor([times.loss_sum, times.loss_count, times.samples, times.data_wait / elapsed,
                            times.encode / elapsed, times.corrupt], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(vec)
        loss_sum, count, samples, wait, encode, corrupt = vec.tolist()
        w = self.ctx.world_size
        grad = self.engine.get_global_grad_norm()
        return {"loss": loss_sum / max(count, 1), "grad_norm": float(grad) if grad is not None else None, "lr": lr,
                "samples_per_s": samples / elapsed, "data_wait": wait / w, "encode": encode / w,
                "num_corrupt": int(corrupt), "memory_gb": memory_gb(self.ctx.device)}

    def _sum_over_ranks(self, x: float) -> float:
        import torch.distributed as dist

        if self.ctx.world_size == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t)
        return float(t.item())

    def _mean_over_ranks(self, x: float) -> float:
        return self._sum_over_ranks(x) / self.ctx.world_size

    def _evaluate(self, step: int, log: MetricsLogger, final: bool = False) -> None:
        """The held-out loss (every rank takes part); rank 0 logs it, and at the end writes OUT/eval.json."""
        from training.evaluation import write_eval

        assert self.heldout is not None
        values = self.heldout.run()
        log.log_eval(step, values)
        if final and self.ctx.rank == 0:
            write_eval(self.out / "eval.json", step, values, self.config.eval)

    # ---- checkpoints, samples, export

    def _save(self, store: CheckpointStore, step: int, samples_seen: int, batches: BatchSource, ema: EMA | None,
              log: MetricsLogger) -> str:
        c = self.config
        state = {"samples_seen": samples_seen, "data": batches.state_dict(), "zero_stage": c.deepspeed.zero_stage,
                 "stage": c.name, "time": time.time()}
        t0 = time.perf_counter()
        tag = store.save(self.engine, step, state, ema, c.checkpoint.keep_last)
        log.event(f"checkpoint {store.root / tag} saved in {time.perf_counter() - t0:.1f}s")
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, store.root / tag, {"step": step, "samples_seen": samples_seen})
        return tag

    @torch.no_grad()
    def _sample(self, step: int, first: StepInputs, log: MetricsLogger) -> None:
        """A sample video from the fixed prompt and the first frame of the first clip this rank trained on.
        Every rank runs it (under ZeRO-3 the forward gathers weights collectively); rank 0 writes it."""
        import numpy as np
        from PIL import Image

        from training.sample.media import to_uint8, write_contact_sheet, write_mp4
        from training.model.sampler import sample_long

        c, model = self.config, self.model
        self.module.eval()
        try:
            dev = self.ctx.device
            tower = model.text_encoder
            tokens = tower.tokenizer([c.samples.prompt]).to(dev)
            _, states = tower.tower(tokens)
            text = self.module.project_text(states.float(), torch.tensor([bool(c.samples.prompt)], device=dev))
            t = first.num_frames if first.num_frames > 1 else model.config.unet.num_frames
            latent_hw = tuple(first.latents_BTCHW.shape[-2:])
            sampler = c.sampler.model_copy(update={"num_steps": c.samples.num_steps})
            gen = torch.Generator(dev).manual_seed(c.samples.seed)
            clips = sample_long(model.denoise, text.float(), first.latents_BTCHW[:1, 0], None, t, 1, latent_hw, sampler,
                                model.config.latent_channels, model.scaling_factor, gen)
            frames = model.decode_latents(clips[0].to(model.vae.dtype))[0]
        finally:
            self.module.train()
        if self.ctx.rank == 0:
            pixels = to_uint8(frames)
            path = write_mp4(self.out / "samples" / f"step_{step:08d}.mp4", pixels, fps=sampler.fps)
            sheet = write_contact_sheet(path.with_name(path.stem + "_sheet.png"), pixels, columns=len(pixels),
                                        title=[f"step {step} | prompt: {c.samples.prompt or '(none)'}",
                                               f"seed {c.samples.seed} | {sampler.num_steps} steps"])
            log.sample(path, torch.from_numpy(pixels).permute(0, 3, 1, 2), np.asarray(Image.open(sheet).convert("RGB")),
                       step, sampler.fps)
            log.event(f"sample video {path}, contact sheet {sheet.name}")

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The trained module's full weights on rank 0 (ZeRO-3: gathered), None elsewhere."""
        if self.config.deepspeed.zero_stage == 3:
            import deepspeed

            out: dict[str, torch.Tensor] = {}
            for name, p in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.ctx.rank == 0:
                        out[name] = p.data.detach().float().cpu().clone()
            return out if self.ctx.rank == 0 else None
        if self.ctx.rank != 0:
            return None
        return {n: p.detach().float().cpu().clone() for n, p in self.module.named_parameters()}

    def _export(self, ema: EMA | None) -> Path | None:
        """OUT/model: the diffusers-format export (EMA weights when configured), loadable by `lvd sample`."""
        import torch.distributed as dist

        from training.model.export import save_pretrained

        state = self._full_state()
        out = None
        if self.ctx.rank == 0:
            assert state is not None
            if ema is not None and self.config.export.ema:
                state.update({k: v.cpu() for k, v in ema.averaged().items()})
            fresh = LatentVideoDiffusion.build(self.model.config, load_text_weights=False)
            fresh.unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
            fresh.text_encoder.proj.load_state_dict(
                {k.removeprefix("text_proj."): v for k, v in state.items() if k.startswith("text_proj.")})
            fresh.vae.load_state_dict({k: v.float().cpu() for k, v in self.model.vae.state_dict().items()})
            fresh.text_encoder.tower.load_state_dict(
                {k: v.float().cpu() for k, v in self.model.text_encoder.tower.state_dict().items()})
            out = save_pretrained(fresh, self.out / "model")
        dist.barrier()
        return out
