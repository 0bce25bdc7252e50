"""Precomputing latents and text states into shards, so training skips decoding and encoding.

    lvd precompute SHARDS OUT --model runs/svd/stage1_image --set num_frames=14 --set fps=7 --set workers=8

One task per source shard (a Ray task when workers > 0 or on a cluster) reads that shard, decodes each selected
sample's clip as the training loader would (the first `num_frames` frames at `fps`, resized and centre-cropped
to the nearest resolution bucket), encodes the batch with the model's VAE (the mean of its posterior, scaled:
what the diffusion trains on) and one of each clip's captions (drawn by weight, seeded) with the frozen text
tower (token states before the trainable projection), and writes the shard's samples with `latents.safetensors`
and `text.safetensors` added into one new shard (temporary name, then renamed) with its manifest file. Nothing
else is re-encoded, nothing is written per sample, and no shard bytes pass through the driver, which only
plans (which rows of which shard) and writes the index at the end. A re-run skips the shards already finished.
The training loader (latents: auto) then reads latents where they exist and decodes the rest; training
accepts both in one run.

The latents belong to the VAE that made them: precompute with the VAE of the model being trained (the
stage's init_from), and again if that VAE ever changes.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from common.config import Config
from common.local_ray import ray_connected


class PrecomputeConfig(Config):
    shards: str
    """The source shard folder (or fsspec URL)."""
    output: str
    """The new shard folder: the same samples with latents.safetensors and text.safetensors added."""
    model: str
    """A diffusers-format folder (an lvd export, a stage's output, an SVD folder) whose VAE and text tower encode."""
    query: str | None = None
    """Which samples get latents (all others are copied as they are). None: all (or `keep` on all-usable shards)."""
    num_frames: int = 14
    fps: float = 7.0
    resolutions: list[tuple[int, int]] = [(320, 576), (576, 320), (448, 448)]
    text: bool = True
    """Also precompute the text tower's token states of one caption per clip."""
    batch_size: int = 8
    workers: int = 0
    """Ray tasks encoding in parallel (one source shard each); 0: encode in this process (no Ray)."""
    num_gpus: float = 0.0
    """GPUs per Ray task."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check(self) -> PrecomputeConfig:
        if self.num_frames < 1 or self.fps <= 0 or self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"num_frames ({self.num_frames}), fps ({self.fps}) and batch_size ({self.batch_size}) must "
                             f"be positive and workers ({self.workers}) >= 0")
        return self

    def loader_config(self):
        from shards.config import LoaderConfig

        # One pass over the subset, in order, every sample exactly once (uneven: a rank may have a short batch).
        # A corrupt sample does not stop the run: it is copied (or skipped with its reason) like any other.
        return LoaderConfig(shards=self.shards, query=self.query, batch_size=self.batch_size,
                            num_frames=[self.num_frames], fps=self.fps, resolutions=self.resolutions,
                            clip_start="start", shuffle=False, epochs=1, remainder="uneven", latents="ignore",
                            image_ratio=0.0, num_workers=0, seed=self.seed, max_corrupt_fraction=1.0)


log = logging.getLogger("lvd.precompute")
# one output shard per source shard, however much the latents add
ONE_SHARD = 1 << 62


@dataclass
class ShardResult:
    """What one shard's task sends back (small): its output shard's row, how many samples it encoded, what
    it skipped."""

    shard_rows: list[dict[str, Any]]
    num_encoded: int
    skipped: list


@dataclass
class PrecomputeSummary:
    output: str
    num_encoded: int
    num_samples: int
    seconds: float
    num_skipped: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.num_encoded} of {self.num_samples} samples got precomputed latents in {self.seconds:.1f}s "
               f"(by this run); shards with them in {self.output}"]
        if self.num_skipped:
            out.append(f"{self.num_skipped} samples skipped (corrupt or refused; listed in info.json)")
        return out


def _device(config: PrecomputeConfig):
    import torch

    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


_ENCODERS: dict[tuple, Any] = {}


def _encoders(config: PrecomputeConfig):
    """The model's VAE and text tower, loaded once per worker process (Ray reuses its workers across tasks)."""
    from training.model.export import load_pretrained

    dev = _device(config)
    key = (config.model, str(dev), config.text)
    if key not in _ENCODERS:
        model = load_pretrained(config.model, allow_random_text=not config.text)
        del model.unet  # only the VAE and the text tower work here
        model.vae.to(dev).eval()
        model.text_encoder.to(dev).eval()
        _ENCODERS.clear()
        _ENCODERS[key] = model
    return _ENCODERS[key], dev


def encode_batch(config: PrecomputeConfig, batch: dict[str, Any]) -> dict[str, dict[str, bytes]]:
    """{key: {"latents.safetensors": ..., "text.safetensors": ...}} for one loader batch of decoded clips."""
    import torch
    from safetensors.torch import save

    model, dev = _encoders(config)
    with torch.no_grad():
        frames = batch["frames_BTCHW"].to(dev).float() / 127.5 - 1.0
        latents = model.encode_frames(frames).float().cpu()
        states = None
        if config.text:
            tower = model.text_encoder
            _, states = tower.tower(tower.tokenizer(list(batch["caption"])).to(dev))
            states = states.float().cpu()
    out = {}
    for i, key in enumerate(batch["key"]):
        files = {"latents.safetensors": save({"latents": latents[i].contiguous()})}
        if states is not None and batch["caption"][i]:
            files["text.safetensors"] = save({"text": states[i].contiguous()})
        out[key] = files
    return out


def precompute_shard(config: PrecomputeConfig, group: int, shard: str, rows: np.ndarray):
    """One task: source shard `shard` -> output shard of group `group` with latents (and text states) added to
    the samples at `rows` (of this shard's manifest file), the others copied as they are. Returns the writer's
    ShardResult; a shard an earlier run finished is returned as it is, without reading anything."""
    from shards.config import ShardWriteConfig
    from shards.loader import ShardLoader
    from shards.manifest import RESERVED, Manifest, manifest_schema
    from shards.plan import without_refused
    from shards.reader import SampleReader
    from shards.writer import PreparedSample, ShardWriter, Skipped, read_source_sample, resume_group

    out = Path(config.output)
    resume = resume_group(out, group)
    if resume.shard_rows:
        return ShardResult(resume.shard_rows, 0, [])
    source = Manifest.load(config.shards)
    one = Manifest(source.root, source.shards[source.shards["shard"] == shard].reset_index(drop=True), source.info)
    table = one.table
    ledger_cols = [c for c in table.column_names if c not in RESERVED]
    schema = manifest_schema(table.select(ledger_cols).schema)
    writer = ShardWriter(out, ShardWriteConfig(shard_max_bytes=ONE_SHARD), schema, group=group)
    reader = SampleReader(source.root)
    pending = {str(rec["key"]): rec for rec in table.to_pylist()}  # this shard's samples, not yet written
    skipped: list[Skipped] = []

    def copy(key: str, extra: dict[str, bytes]) -> None:
        rec = pending.pop(key, None)
        if rec is None:  # a sample the loader substituted for a corrupt batch: written already
            return
        members = read_source_sample(reader, rec)
        if isinstance(members, Skipped):
            skipped.append(members)
            return
        writer.add(PreparedSample(key, {**members, **extra}, {c: rec.get(c) for c in ledger_cols}))

    num_encoded = 0
    rows, _ = without_refused(one, np.asarray(rows, np.int64))
    if len(rows):
        try:
            loader = ShardLoader(config.loader_config(), rank=0, world_size=1, manifest=one, rows=rows)
        except ValueError as e:  # e.g. no clip of this shard is long enough for num_frames: all are copied
            log.warning("%s: nothing to encode: %s", shard, e)
            loader = []
        for batch in loader:
            if batch["kind"] != "video":
                continue
            for key, files in encode_batch(config, batch).items():
                if key in pending:
                    num_encoded += 1
                copy(key, files)
    for key in list(pending):  # not selected, not in a bucket, or corrupt
        copy(key, {})
    writer.close()
    reader.close()
    return ShardResult(writer.shard_rows, num_encoded, skipped)


def precompute(config: PrecomputeConfig, address: str | None = None) -> PrecomputeSummary:
    from curation.tasks import imap_tasks
    from shards.config import ShardWriteConfig
    from shards.manifest import FORMAT, INFO, Manifest
    from shards.plan import subset_rows
    from shards.writer import prepare_out_dir, write_index

    start = time.perf_counter()
    source = Manifest.load(config.shards)
    rows = subset_rows(source, config.loader_config())  # ascending
    # rows -> (source shard, rows of its manifest file): the plan is all the driver holds
    starts = source.part_starts
    cuts = np.searchsorted(rows, starts)
    out = Path(config.output)
    doc = {"format": FORMAT, "source_shards": source.root, "source_fingerprint": source.fingerprint(),
           "precompute": config.model_dump(mode="json", exclude={"shards", "output", "workers", "num_gpus", "device"})}
    prepare_out_dir(out, doc)
    (out / INFO).unlink(missing_ok=True)  # incomplete until this run has finished
    calls = [(config, g, shard, rows[cuts[g] : cuts[g + 1]] - starts[g]) for g, shard in enumerate(source.shards["shard"])]
    # Ray tasks with workers > 0 (a local Ray of that many CPUs) or on the cluster at `address`
    with ray_connected(address, num_cpus=config.workers) if config.workers or address else nullcontext():
        results = list(imap_tasks(precompute_shard, calls, num_gpus=config.num_gpus))
    skipped = [s for r in results for s in r.skipped]
    info = {"source_shards": source.root, "source_fingerprint": source.fingerprint(),
            "selection": source.selection, "source_run": source.info.get("source_run"), "query": config.query,
            "writer": ShardWriteConfig(shard_max_bytes=ONE_SHARD).model_dump(exclude={"workers", "selection"}),
            "num_skipped": len(skipped), "skipped": [{"key": s.key, "reason": s.reason} for s in skipped]}
    manifest = write_index(out, [row for r in results for row in r.shard_rows], info)
    return PrecomputeSummary(str(config.output), sum(r.num_encoded for r in results), manifest.num_samples,
                             time.perf_counter() - start, len(skipped))
