"""The training plan written once (`lvd train` into OUTPUT/plan, `lvd shards plan`), and each rank's slice of it
read back in bounded memory (ShardLoader(config, plan=DIR) reads batches this way).

The plan is the loader's (shards/plan.py: the same subset, buckets, batches and dealing to ranks), computed on
one machine and written as parquet, each file under a temporary name and renamed, plan.json last:

    plan.json                   format, source (the manifest's fingerprint and the planning settings: a plan is
                                reused only for the same), the loader settings, fingerprint, buckets, batches
                                per epoch, score columns, embedding shapes
    subset.parquet              one row per subset position: position, row (in the manifest), key, video_bucket,
                                image_bucket
    epoch-00000.parquet ...     one row per sample of each planned batch, in batch order: batch, slot, bucket,
                                position, and the manifest columns a reader needs (key, shard, byte range,
                                crc32, members, width, height, duration_s, captions, scores, ...), in row
                                groups of ROW_GROUP rows

A rank keeps only its own batches of an epoch file: it reads the file one row group at a time (those whose
batch range holds none of its batches, e.g. before a resumed position, are skipped by their footer
statistics) and filters it, so its memory is one row group and one batch, whatever the size of the dataset.
(Its reads still cover the epoch file's row groups, as batches are dealt round-robin to ranks.) Its batches
are those of `SubsetPlanner.rank_stream`: rank r of W gets batches c + r, c + r + W, ... of the epoch (c: batches
consumed when the pass starts), data-loader
worker k of K every K-th of them, so resume and a change of world size behave exactly as the in-process plan.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.config import LoaderConfig
from shards.manifest import Manifest, join
from shards.plan import SubsetPlanner
from shards.source import EMBEDDING_COLUMNS, embedding_shape_column

FORMAT = "lvd-plan/1"
ROW_GROUP = 65_536
# Manifest columns copied into the epoch files (those the shards have; and every score and embedding shape),
# so that a rank reads nothing else.
READ_COLUMNS = ("key", "shard", "offset", "size_bytes", "crc32", "members", "width", "height", "duration_s",
                "fps", "motion_bucket", "captions", "latents_shape", "text_shape")


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:05d}.parquet"


@dataclass
class PlanSummary:
    out: str
    num_samples: int
    batches: list[int]
    fingerprint: str

    def lines(self) -> list[str]:
        return [f"plan {self.fingerprint}: {self.num_samples} samples, {len(self.batches)} epochs of "
                f"{', '.join(map(str, self.batches[:5]))}{', ...' if len(self.batches) > 5 else ''} batches in {self.out}"]


# LoaderConfig fields that do not change the plan (how it is read, not what it holds)
NOT_PLANNED = ("epochs", "num_workers", "prefetch_factor", "pin_memory", "read_json", "verify_samples",
               "max_corrupt_fraction")


def plan_source(manifest: Manifest, config: LoaderConfig) -> str:
    """What a plan is made from: the manifest's samples and the settings that shape the plan. A plan folder whose
    plan.json has another source was made for other data or settings."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in NOT_PLANNED}
    doc = json.dumps({"manifest": manifest.fingerprint(), "config": settings}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def write_plan(manifest: Manifest, config: LoaderConfig, out: str | Path,
               epochs: int | Callable[[int], int]) -> PlanSummary:
    """Builds the plan of `config` over `manifest` once and writes it to `out` (see the module docstring).
    `epochs`: a count, or a function of the batches per epoch that gives it. Every file is written under a
    temporary name and renamed; plan.json last, so its presence means the plan is complete."""
    planner = SubsetPlanner.build(manifest, config)
    if callable(epochs):
        epochs = epochs(len(planner.plan(0)))
    if epochs < 1:
        raise ValueError(f"epochs ({epochs}) must be at least 1: the plan is written epoch by epoch")
    names = manifest.schema.names
    columns = list(dict.fromkeys([*(c for c in READ_COLUMNS if c in names), *manifest.score_columns,
                                  *(embedding_shape_column(c) for c in EMBEDDING_COLUMNS if embedding_shape_column(c) in names)]))
    samples = manifest.take(planner.rows, columns)
    embeddings: dict[str, list[int]] = {}
    if config.read_embeddings and config.output == "tensors":
        from shards.loader import embedding_shapes

        shape_columns = [c for c in columns if c in {embedding_shape_column(e) for e in EMBEDDING_COLUMNS}]
        embeddings = {k: list(v) for k, v in
                      embedding_shapes(samples.select(shape_columns).to_pandas(), manifest.root).items()}
    fs, path = fsspec.core.url_to_fs(str(out))
    fs.makedirs(path, exist_ok=True)
    if fs.exists(join(path, "plan.json")):
        fs.rm(join(path, "plan.json"))  # the folder holds no complete plan until this one is
    subset = pa.table({"position": np.arange(len(planner.rows)), "row": planner.rows, "key": samples.column("key"),
                       "video_bucket": planner.video_bucket, "image_bucket": planner.image_bucket})
    _write_table(fs, subset, join(path, "subset.parquet"))
    batches = []
    for epoch in range(epochs):
        plan = planner.plan(epoch)
        sizes = np.diff(plan.offsets)
        batch = np.repeat(np.arange(len(plan), dtype=np.int64), sizes)
        table = pa.table({"batch": batch, "slot": (np.arange(len(batch)) - plan.offsets[batch]).astype(np.int32),
                          "bucket": plan.bucket_ids[batch].astype(np.int32), "position": plan.items})
        for name in columns:
            table = table.append_column(name, samples.column(name).take(pa.array(plan.items)))
        _write_table(fs, table, join(path, epoch_file(epoch)))
        batches.append(len(plan))
        planner._cache = None  # one epoch's plan in memory at a time
    doc = {"format": FORMAT, "shards": manifest.root, "source": plan_source(manifest, config),
           "fingerprint": planner.fingerprint, "num_samples": len(planner.rows), "num_refused": planner.num_refused,
           "batches": batches, "remainder": config.remainder,
           "buckets": [[b.kind, list(b.shape)] for b in planner.buckets], "excluded": planner.excluded,
           "score_columns": manifest.score_columns, "embedding_shapes": embeddings,
           "config": config.model_dump(mode="json")}
    tmp = join(path, f".plan.json.{uuid.uuid4().hex}")
    with fs.open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    fs.mv(tmp, join(path, "plan.json"))
    return PlanSummary(str(out), len(planner.rows), batches, planner.fingerprint)


def _write_table(fs, table: pa.Table, dest: str) -> None:
    tmp = join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.{uuid.uuid4().hex}")
    pq.write_table(table, tmp, filesystem=fs, row_group_size=ROW_GROUP)
    fs.mv(tmp, dest)


def read_plan_doc(plan_dir: str | Path) -> dict | None:
    """plan.json of a complete plan in `plan_dir`, or None."""
    fs, path = fsspec.core.url_to_fs(str(plan_dir))
    try:
        with fs.open(join(path, "plan.json"), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@dataclass
class PlannedBatch:
    epoch: int
    batch_index: int
    bucket: int
    samples: pa.Table            # the batch's rows of the epoch file, in slot order
    state_after: tuple[int, int] | None


class RankSlice:
    """One rank's (and optionally one data-loader worker's) batches of a written plan."""

    def __init__(self, plan_dir: str, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"worker ({worker}) must be in [0, num_workers ({num_workers}))")
        self.fs, self.path = fsspec.core.url_to_fs(str(plan_dir))
        doc_path = join(self.path, "plan.json")
        if not self.fs.exists(doc_path):
            raise FileNotFoundError(f"no plan.json in {plan_dir}; write the plan with `lvd shards plan SHARDS {plan_dir}`")
        with self.fs.open(doc_path, "r") as f:
            self.doc = json.load(f)
        if self.doc.get("format") != FORMAT:
            raise ValueError(f"{plan_dir} holds a plan of format {self.doc.get('format')!r}, this lvd reads {FORMAT!r}; "
                             "write it again with `lvd shards plan`")
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers

    @property
    def fingerprint(self) -> str:
        return str(self.doc["fingerprint"])

    def batch_indices(self, epoch: int, consumed: int) -> list[tuple[int, tuple[int, int]]]:
        """(batch index, state after) of this rank's batches from `consumed` to the end of `epoch`, as
        SubsetPlanner.rank_stream deals them."""
        m, w = self.doc["batches"][epoch], self.world_size
        left = m - consumed
        count = 0 if left <= 0 else left // w if self.doc["remainder"] == "drop" else -(-left // w)
        if count == 0 and consumed == 0:
            raise ValueError(f"epoch {epoch} makes {m} batches, fewer than the {w} ranks, so remainder=drop "
                             "leaves none: lower batch_size, use fewer ranks, or set remainder=pad")
        out = []
        for i in range(count):
            j = consumed + self.rank + i * w
            if j >= m:
                if self.doc["remainder"] == "uneven":
                    break
                j %= m
            out.append((j, (epoch, consumed + (i + 1) * w) if i < count - 1 else (epoch + 1, 0)))
        return [b for k, b in enumerate(out) if k % self.num_workers == self.worker]

    def batches(self, epoch: int, consumed: int = 0, columns: list[str] | None = None) -> Iterator[PlannedBatch]:
        """This rank's batches of `epoch` from state (epoch, consumed), reading one row group at a time."""
        yield from self.read(epoch, self.batch_indices(epoch, consumed), columns)

    def read(self, epoch: int, wanted: list[tuple[int, tuple[int, int] | None]],
             columns: list[str] | None = None) -> Iterator[PlannedBatch]:
        """The batches `wanted` ((batch index, state after), in dealing order) of `epoch`'s file."""
        # pad wraps the last step around to the epoch's first batches: those are read in a second pass
        cut = next((k for k in range(1, len(wanted)) if wanted[k][0] <= wanted[k - 1][0]), len(wanted))
        ascending, wrapped = wanted[:cut], wanted[cut:]
        for part in (ascending, wrapped):
            if part:
                yield from self._read(epoch, part, columns)

    @property
    def num_epochs(self) -> int:
        """Epochs the plan holds."""
        return len(self.doc["batches"])

    def epoch_batches(self, epoch: int) -> int:
        """Batches of `epoch` over all ranks."""
        return int(self.doc["batches"][epoch])

    def _read(self, epoch: int, wanted: list[tuple[int, tuple[int, int] | None]],
              columns: list[str] | None) -> Iterator[PlannedBatch]:
        index = np.array([j for j, _ in wanted], np.int64)
        after = dict(wanted)
        with self.fs.open(join(self.path, epoch_file(epoch)), "rb") as f:
            pf = pq.ParquetFile(f)
            col = pf.schema_arrow.get_field_index("batch")
            names = (None if columns is None else  # (columns the manifest had none of are not in the file)
                     [c for c in dict.fromkeys(["batch", "bucket", *columns]) if c in pf.schema_arrow.names])
            carry: pa.Table | None = None
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(col).statistics
                lo, hi = int(stats.min), int(stats.max)
                k = np.searchsorted(index, lo)
                if k == len(index) or index[k] > hi:  # none of this rank's batches in the row group
                    continue
                table = pf.read_row_group(g, columns=names)
                batch = table.column("batch").to_numpy()
                mine = np.isin(batch, index[k : np.searchsorted(index, hi, side="right")])
                table = table.filter(pa.array(mine))
                if carry is not None:
                    table = pa.concat_tables([carry, table])
                    carry = None
                batch = table.column("batch").to_numpy()
                if len(batch) == 0:
                    continue
                bounds = np.flatnonzero(np.diff(batch)) + 1
                starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(batch)]])
                last_complete = batch[-1] < hi or g == pf.num_row_groups - 1
                for s, e in zip(starts, ends):
                    if e == len(batch) and not last_complete:
                        carry = table.slice(s)  # the batch goes on in the next row group
                        break
                    j = int(batch[s])
                    piece = table.slice(s, e - s)
                    yield PlannedBatch(epoch, j, int(piece.column("bucket")[0].as_py()), piece, after[j])
            if carry is not None and carry.num_rows:
                j = int(carry.column("batch")[0].as_py())
                yield PlannedBatch(epoch, j, int(carry.column("bucket")[0].as_py()), carry, after[j])


FAILED = "failed.json"
# how far behind the waiting rank's clock rank 0's may be (another node)
CLOCK_SLACK_S = 60.0


def ensure_plan(manifest: Manifest, config: LoaderConfig, out: str | Path, epochs: Callable[[int], int],
                keep: bool = False) -> dict:
    """The plan of `config` over `manifest` in `out`: the one there when it was made from the same manifest and
    settings and holds enough epochs (`epochs`: of the batches per epoch), else written anew. `keep`: a run
    resumes from this plan, so a plan made from other data or settings is an error, not replaced (the
    checkpoint's position means something only in the plan it was taken in). Returns plan.json's content."""
    source = plan_source(manifest, config)
    doc = read_plan_doc(out)
    if doc is not None and doc.get("format") == FORMAT and doc.get("source") == source:
        if len(doc["batches"]) >= epochs(doc["batches"][0]):
            return doc
    elif doc is not None and keep:
        raise ValueError(f"the plan in {out} was made from other shards or data settings than this run's, and the "
                         "run resumes from a checkpoint taken in it: resume with the run's original shards and "
                         "data settings, or train into a new output folder")
    fs, path = fsspec.core.url_to_fs(str(out))
    if fs.exists(join(path, FAILED)):
        fs.rm(join(path, FAILED))
    # never fewer epochs than the plan had (a run on more ranks may have needed them); a longer plan keeps every
    # epoch the shorter one had: each epoch is a function of the seed and its number
    had = len(doc["batches"]) if doc is not None and doc.get("source") == source else 0
    write_plan(manifest, config, out, lambda m: max(epochs(m), had))
    return read_plan_doc(out)


def plan_failed(manifest: Manifest, config: LoaderConfig, out: str | Path, message: str) -> None:
    """Tells the ranks waiting for the plan in `out` (wait_for_plan) that it will not come, and why."""
    fs, path = fsspec.core.url_to_fs(str(out))
    fs.makedirs(path, exist_ok=True)
    with fs.open(join(path, FAILED), "w") as f:
        json.dump({"source": plan_source(manifest, config), "time": time.time(), "message": message}, f)


def wait_for_plan(manifest: Manifest, config: LoaderConfig, out: str | Path, epochs: Callable[[int], int],
                  timeout_s: float, poll_s: float = 1.0) -> dict:
    """Waits until `out` holds the plan of `config` over `manifest` with enough epochs (another process writes
    it: ensure_plan), and returns plan.json's content. A failure marker of this plan written since the wait
    began (an older one is a past attempt's), or `timeout_s`, end the wait with an error."""
    source = plan_source(manifest, config)
    fs, path = fsspec.core.url_to_fs(str(out))
    began, deadline = time.time() - CLOCK_SLACK_S, time.monotonic() + timeout_s
    while True:
        doc = read_plan_doc(out)
        if doc is not None and doc.get("source") == source and len(doc["batches"]) >= epochs(doc["batches"][0]):
            return doc
        try:
            with fs.open(join(path, FAILED), "r") as f:
                failed = json.load(f)
            if failed.get("source") == source and failed.get("time", 0) >= began:
                raise ValueError(f"rank 0 could not write the plan in {out}: {failed.get('message')}")
        except (FileNotFoundError, json.JSONDecodeError):  # (none, or one being written)
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no plan for this run in {out} after {timeout_s:g} s (rank 0 writes it): check rank "
                               "0's log, or raise data.plan_timeout_s for a subset that takes longer to plan")
        time.sleep(poll_s)
