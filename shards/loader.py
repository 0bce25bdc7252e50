"""The streaming loader for training: planned batches (shards/plan.py), read by ranged reads (shards/reader.py),
decoded in torch DataLoader workers, with a state that resumes exactly.

With `plan=DIR` (a plan written once, shards/plan_file.py; what training ranks use) a rank reads only its own
batches' rows of the plan, never the manifest; without it the loader plans the subset itself from the
manifest (one process: precompute's tasks, benchmarks, notebooks).

    loader = ShardLoader(LoaderConfig(shards="s3://bucket/shards", query="aesthetic >= 5", batch_size=8))
    for batch in loader:                 # endless unless config.epochs is set
        ...
        ckpt["data"] = loader.state_dict()
    loader.load_state_dict(ckpt["data"])  # the next batch is the one the uninterrupted run would have produced

A batch (output="tensors") is a dict:
    kind            "video" | "image" | "latents"   (one kind and one shape per batch)
    key             list of B sample keys (clip ids)
    frames_BTCHW    uint8 RGB, video (T = the bucket's frame count) and image batches (T = 1)
    latents_BTCHW   float, latents batches (precomputed, as stored)
    text_BLD        float, when every sample of the batch has precomputed text embeddings
    clip_embedding  float32 B x K x D, when read_embeddings: the curation ledger's per-clip CLIP embeddings
                    (K key frames: first, middle, last), as stored in emb.safetensors; zeros where absent
    clip_embedding_mask  bool B: which samples have one (when read_embeddings)
    caption         list of B strings (one caption drawn per sample by its weight; "" when none)
    fps_B           float: the rate frames were sampled at (0 for image batches)
    motion_bucket_B float: the manifest's motion_bucket (NaN where absent)
    is_image_B      bool
    scores          {score column: float B tensor} for every score in the manifest
    meta            list of B dicts: the sample json (every ledger column of the clip), when read_json
    epoch, batch_index, worker, num_read, num_corrupt, num_repeated, state
                    bookkeeping (state is what state_dict() returns after it; see below for the counts)
(output="raw": kind, key, files = per sample {extension: bytes-like}, num_bytes, and the bookkeeping.)

Letters: B batch, T frames, C channels, H x W pixels, L text tokens, D text (or embedding) width, K key frames.

Only the members a batch needs are read (the manifest knows where each lies): a latents batch never reads
the mp4, an image batch reads one jpg. Big tensors are written straight into the batch's memory (a reused
shared-memory slot in a DataLoader worker, copied out once in the training process).
Corrupt samples (a truncated shard, undecodable media, a member whose crc32 differs from the manifest's) are
skipped with a warning and counted (num_corrupt of the batch's num_read planned samples): the batch comes out
smaller, never padded with copies of its good samples. Only when every sample of a batch is corrupt do the
next good samples of its bucket in the plan take their place, so that every rank still yields the same number
of batches (num_repeated says how many; they are read twice that epoch; a resumed run does the same). Once
more than max_corrupt_fraction of the samples read were corrupt, the loader stops with CorruptDataError.
Samples with names the writer could not have written (shards/names.py) are left out of the plan
(num_refused).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.config import LoaderConfig
from shards.decode import decode_image, decode_window
from shards.manifest import Manifest, member_ranges
from shards.plan import IMAGE, LATENTS, VIDEO, Bucket, SubsetPlanner
from shards.reader import SampleReader, coalesce
from shards.source import EMBEDDING_COLUMNS, EMBEDDING_FILE, embedding_shape_column
from shards.tario import SampleFormatError, crc32, parse_sample

log = logging.getLogger("lvd.shards")
STATE_FORMAT = 1
# Manifest columns the loader reads for each subset sample (besides scores, captions and embedding shapes).
SAMPLE_COLUMNS = ("key", "shard", "offset", "size_bytes", "crc32", "members", "width", "height", "duration_s")
MEMBER_FILES = ("mp4", "json", "first.jpg", "last.jpg", "latents.safetensors", "text.safetensors", EMBEDDING_FILE)
# max_corrupt_fraction is of at least this many samples: one bad sample among the first few read is no reason
# to stop a run
MIN_READ_FOR_FRACTION = 100
# batches of a written plan looked up at a time for substitutes of a batch whose every sample is corrupt
FOLLOWING_CHUNK = 1024


class CorruptDataError(RuntimeError):
    """More of the samples read were corrupt than LoaderConfig.max_corrupt_fraction allows."""


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    # SampleFormatError, DecodeError and JSONDecodeError are ValueErrors; KeyError: a member is missing.
    return (ValueError, KeyError, OSError, SafetensorError)


# What a bad sample can raise while being read or decoded; anything else is a bug and propagates.
CORRUPT = _corrupt_errors()


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): given, or from torch.distributed. Loud where a silent default would duplicate
    data: several processes with no split is an error, not every rank reading the same samples."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        r, w = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise ValueError(f"rank/world_size ({rank}/{world_size}) disagree with torch.distributed ({r}/{w}); "
                             "pass none to use the process group's")
        return r, w
    if rank is None and world_size is None:
        env = int(os.environ.get("WORLD_SIZE", "1"))
        if env > 1:
            raise ValueError(f"WORLD_SIZE={env} but torch.distributed is not initialised and no rank/world_size was "
                             "given: every rank would read the same samples. Initialise the process group first "
                             "or pass rank= and world_size=")
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"pass both rank and world_size (got rank={rank}, world_size={world_size})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
    return rank, world_size


class Samples:
    """Flat arrays of some samples' manifest columns: a whole subset, or the rows of one planned batch.
    Flat arrays, not a dict per sample: forked workers share them without copying millions of objects."""

    def __init__(self, table: pa.Table, score_columns: list[str]) -> None:
        members = table.column("members").combine_chunks()
        frame = table.drop(["members"]).to_pandas()
        self.keys = frame["key"].to_numpy(dtype=object)
        self.shard_names, self.shard_of = np.unique(frame["shard"].to_numpy(dtype=object).astype(str),
                                                    return_inverse=True)
        self.offset = frame["offset"].to_numpy(dtype=np.int64)
        self.size = frame["size_bytes"].to_numpy(dtype=np.int64)
        self.crc = frame["crc32"].to_numpy(dtype=np.int64)
        self.members = {ext: member_ranges(members, ext) for ext in MEMBER_FILES}
        self.width = frame["width"].to_numpy(dtype=np.int64)
        self.height = frame["height"].to_numpy(dtype=np.int64)
        self.duration = frame["duration_s"].to_numpy(dtype=float, na_value=np.nan)
        self.motion_bucket = (frame["motion_bucket"].to_numpy(dtype=float, na_value=np.nan)
                              if "motion_bucket" in frame else np.full(len(frame), np.nan))
        self.scores = {c: frame[c].to_numpy(dtype=float, na_value=np.nan) for c in score_columns}
        self.captions = frame["captions"].to_numpy(dtype=object) if "captions" in frame else None

    def shard(self, pos: int) -> str:
        return str(self.shard_names[self.shard_of[pos]])


def sample_columns(names: list[str], score_columns: list[str]) -> list[str]:
    """The manifest columns a batch is made from, of those the shards have."""
    return list(dict.fromkeys(c for c in (*SAMPLE_COLUMNS, "motion_bucket", "captions", *score_columns,
                                          *(embedding_shape_column(c) for c in EMBEDDING_COLUMNS)) if c in names))


# A batch to make: (bucket id, the samples it comes from, positions of its samples in them)
Planned = tuple[int, Samples, np.ndarray]


class SubsetBatches:
    """Batches planned in this process over the manifest's subset (SubsetPlanner): for one-process users
    (precompute's task for one shard, benchmarks, tests); training ranks read a written plan (PlanBatches)."""

    def __init__(self, manifest: Manifest, config: LoaderConfig, rows: np.ndarray | None = None) -> None:
        self.planner = SubsetPlanner.build(manifest, config, rows)
        self.root, self.config = manifest.root, config
        self.score_columns = manifest.score_columns
        self.buckets = self.planner.buckets
        self.fingerprint, self.num_refused = self.planner.fingerprint, self.planner.num_refused
        table = manifest.take(self.planner.rows, sample_columns(manifest.schema.names, self.score_columns))
        self.samples = Samples(table, self.score_columns)
        shapes = [c for c in (embedding_shape_column(e) for e in EMBEDDING_COLUMNS) if c in table.column_names]
        self.embedding_shapes = (embedding_shapes(table.select(shapes).to_pandas(), manifest.root)
                                 if config.read_embeddings and config.output == "tensors" else {})

    def epoch_batches(self, epoch: int) -> int:
        return len(self.planner.plan(epoch))

    def batches_for_rank(self, epoch: int, consumed: int, world_size: int) -> int:
        return self.planner.batches_for_rank(epoch, consumed, world_size)

    def stream(self, start: tuple[int, int], rank: int, world_size: int, worker: int,
               num_workers: int) -> Iterator[tuple[int, int, tuple[int, int], Planned]]:
        """(epoch, batch index, state after, the batch) of this worker's share of the rank's stream."""
        for k, step in enumerate(self.planner.rank_stream(start, rank, world_size)):
            if k % num_workers == worker:
                bucket, items = self.planner.plan(step.epoch).batch(step.batch_index)
                yield step.epoch, step.batch_index, step.state_after, (bucket, self.samples, items)

    def following(self, epoch: int, j: int) -> Iterator[Planned]:
        """The epoch's batches after j, wrapping around (where substitutes for a corrupt batch come from)."""
        plan = self.planner.plan(epoch)
        for k in range(1, len(plan) + 1):
            bucket, items = plan.batch((j + k) % len(plan))
            yield bucket, self.samples, items


class PlanBatches:
    """A rank's batches of a plan written once (shards/plan_file.py): it reads its own batches' rows of each
    epoch file, never the manifest."""

    def __init__(self, plan_dir: str, config: LoaderConfig, rank: int, world_size: int) -> None:
        from shards.plan_file import RankSlice

        self.slice = RankSlice(plan_dir, rank, world_size)
        doc = self.slice.doc
        differ = planned_settings_differ(doc["config"], config)
        if differ:
            raise ValueError(f"the plan in {plan_dir} was made with other settings ({', '.join(differ)}) than this "
                             "loader's; write it again with these settings, or load with the plan's")
        self.root, self.config = config.shards, config  # (this machine's path to the shards the plan was made of)
        self.score_columns = list(doc["score_columns"])
        self.buckets = [Bucket(kind, tuple(shape)) for kind, shape in doc["buckets"]]
        self.fingerprint, self.num_refused = str(doc["fingerprint"]), int(doc.get("num_refused", 0))
        self.embedding_shapes = ({k: tuple(v) for k, v in doc["embedding_shapes"].items()}
                                 if config.read_embeddings and config.output == "tensors" else {})

    def epoch_batches(self, epoch: int) -> int:
        self._check_epoch(epoch)
        return self.slice.epoch_batches(epoch)

    def batches_for_rank(self, epoch: int, consumed: int, world_size: int) -> int:
        left = self.epoch_batches(epoch) - consumed
        if left <= 0:
            return 0
        return left // world_size if self.config.remainder == "drop" else -(-left // world_size)

    def _check_epoch(self, epoch: int) -> None:
        if epoch >= self.slice.num_epochs:
            raise ValueError(f"the plan in {self.slice.path} holds {self.slice.num_epochs} epochs and the run needs "
                             f"epoch {epoch}: start the run again (`lvd train` extends the plan), or set "
                             "data.shards.epochs")

    def _planned(self, batch) -> Planned:
        return batch.bucket, Samples(batch.samples, self.score_columns), np.arange(batch.samples.num_rows)

    def stream(self, start: tuple[int, int], rank: int, world_size: int, worker: int,
               num_workers: int) -> Iterator[tuple[int, int, tuple[int, int], Planned]]:
        epoch, consumed, k = start[0], start[1], 0
        while self.config.epochs is None or epoch < self.config.epochs:
            self._check_epoch(epoch)
            dealt = self.slice.batch_indices(epoch, consumed)
            # workers take every K-th batch of the rank's stream, counted across epochs, as DataLoader returns them
            mine = [b for i, b in enumerate(dealt) if (k + i) % num_workers == worker]
            k += len(dealt)
            for batch in self.slice.read(epoch, mine, self._columns()):
                yield epoch, batch.batch_index, batch.state_after, self._planned(batch)
            epoch, consumed = epoch + 1, 0

    def following(self, epoch: int, j: int) -> Iterator[Planned]:
        m = self.epoch_batches(epoch)
        for first in range(1, m + 1, FOLLOWING_CHUNK):  # (read a chunk at a time: usually the first suffices)
            wanted = [((j + k) % m, None) for k in range(first, min(first + FOLLOWING_CHUNK, m + 1))]
            for batch in self.slice.read(epoch, wanted, self._columns()):
                yield self._planned(batch)

    def _columns(self) -> list[str]:
        return ["bucket", *SAMPLE_COLUMNS, "motion_bucket", "captions", *self.score_columns]


def planned_settings_differ(planned: dict[str, Any], config: LoaderConfig) -> list[str]:
    """The settings that shape a plan in which `config` differs from those a plan was made with."""
    from shards.plan_file import NOT_PLANNED

    mine = config.model_dump(mode="json")
    return [k for k in mine if k not in NOT_PLANNED and k != "shards" and planned.get(k) != mine[k]]


class BatchMaker:
    """Turns a planned batch into a batch dict: reads, decodes, substitutes bad samples.
    Decoded frames and loaded tensors are written straight into the batch's rows (no per-sample tensors,
    no torch ops: torch's CPU kernels contend for cores with the training process)."""

    def __init__(self, batches: SubsetBatches | PlanBatches, config: LoaderConfig) -> None:
        self.config = config
        self.batches = batches
        self.buckets = batches.buckets
        self.embedding_shapes = batches.embedding_shapes
        self.reader = SampleReader(batches.root)

    def make(self, epoch: int, j: int, planned: Planned) -> dict[str, Any]:
        bucket_id, samples, items = planned
        bucket = self.buckets[bucket_id]
        rng = np.random.default_rng([self.config.seed, epoch, j, 0x5A])
        draws = rng.random((len(items), 3))  # per slot: window start, stored frame, caption
        out = _BatchRows(len(items), _worker_slots(self.config))
        if self.config.output == "raw":  # one allocation for the whole batch's bytes
            out.reserve_arena(int(samples.size[items].sum()))
        good: list[tuple[Samples, int, Any]] = []
        for slot, pos in enumerate(items):
            sample = self._try_load(samples, int(pos), bucket, draws[slot], out, len(good))
            if sample is not None:
                good.append((samples, int(pos), sample))
        num_corrupt, num_repeated = len(items) - len(good), 0
        if not good:
            good = self._substitutes(epoch, j, bucket_id, bucket, draws, out, len(items))
            num_repeated = len(good)
        batch = self._collate(bucket, good, draws, out)
        batch.update(epoch=epoch, batch_index=j, num_read=len(items), num_corrupt=num_corrupt,
                     num_repeated=num_repeated)
        if out.slots is not None:
            batch["_in_slot"] = out.names()
        return batch

    def _try_load(self, s: Samples, pos: int, bucket: Bucket, draw: np.ndarray, out: "_BatchRows",
                  row: int) -> Any | None:
        try:
            if self.config.output == "raw":
                return self._read_whole(s, pos, out)
            return self._decode(s, pos, bucket, draw, out, row)
        except CORRUPT as e:
            log.warning("skipping corrupt sample %s (%s @ %d): %s", s.keys[pos], s.shard(pos), s.offset[pos], e)
            return None

    def _read_whole(self, s: Samples, pos: int, out: "_BatchRows") -> dict[str, Any]:
        """Every member, as views of the batch's byte arena (bytes when crossing to another process)."""
        shard = s.shard(pos)
        data = self.reader.read_bytes(shard, int(s.offset[pos]), int(s.size[pos]), out.arena(int(s.size[pos])))
        if self.config.verify_samples and crc32(data) != s.crc[pos]:
            raise SampleFormatError(f"crc32 mismatch in {shard} at offset {s.offset[pos]}")
        members = parse_sample(data, str(s.keys[pos]))
        if get_worker_info() is not None:
            return {ext: bytes(v) for ext, v in members.items()}
        return members

    def _read_members(self, s: Samples, pos: int, wanted: tuple[str, ...],
                      optional: tuple[str, ...]) -> dict[str, memoryview]:
        """Only the members a batch needs (the latents and not the mp4, one frame jpg, ...), in as few reads as
        their placement allows. Views of the reader's buffer: valid until its next read."""
        names, ranges = [], []
        for ext in wanted + optional:
            off, size, _ = (a[pos] for a in s.members[ext])
            if off < 0:
                if ext in wanted:
                    raise KeyError(f"sample {s.keys[pos]} has no {ext}")
                continue
            names.append(ext)
            ranges.append((int(s.offset[pos] + off), int(size)))
        spans = coalesce(ranges)
        views = self.reader.read_spans(s.shard(pos), [(o, n) for o, n, _ in spans])
        members: dict[str, memoryview] = {}
        for (s_off, _, inside), view in zip(spans, views):
            for i in inside:
                o, n = ranges[i]
                members[names[i]] = view[o - s_off : o - s_off + n]
        if self.config.verify_samples:
            for ext, data in members.items():
                if crc32(data) != s.members[ext][2][pos]:
                    raise SampleFormatError(f"crc32 mismatch in member {ext}")
        return members

    def _decode(self, s: Samples, pos: int, bucket: Bucket, draw: np.ndarray, out: "_BatchRows",
                row: int) -> dict[str, Any]:
        """Writes the sample's frames or latents (and text) into row `row` of `out`; returns its json."""
        optional = ("json", "text.safetensors") if self.config.read_json else ("text.safetensors",)
        if self.embedding_shapes:
            optional += (EMBEDDING_FILE,)
        which = self.config.image_frame  # image batches: which stored frame
        if which == "first_or_last":
            which = "first" if draw[1] < 0.5 else "last"
        if bucket.kind == LATENTS:
            wanted = ("latents.safetensors",)
        elif bucket.kind == VIDEO or s.members[f"{which}.jpg"][0][pos] < 0:
            wanted = ("mp4",)  # (an image from shards without frame jpgs comes from the video)
        else:
            wanted = (f"{which}.jpg",)
        members = self._read_members(s, pos, wanted, optional)
        meta = json.loads(bytes(members["json"])) if "json" in members else {}
        text = members.get("text.safetensors")
        text_view = tensor_view(text, "text") if text is not None else None  # parsed first: a bad one is caught here
        embeddings = self._embedding_views(members.get(EMBEDDING_FILE))  # (also parsed first)
        if bucket.kind == LATENTS:
            dtype, shape, data = tensor_view(members["latents.safetensors"], "latents")
            if tuple(shape) != bucket.shape:
                raise ValueError(f"latents of shape {shape}, the manifest says {bucket.shape}")
            out.put("latents", row, dtype, shape, np.frombuffer(data, np.uint8))
        else:
            _, h, w = bucket.shape
            display = (int(s.width[pos]), int(s.height[pos]))
            if bucket.kind == VIDEO:
                t = bucket.shape[0]
                start = 0.0
                if self.config.clip_start == "random":
                    start = float(draw[0] * max(0.0, s.duration[pos] - t / self.config.fps))
                frames = decode_window(members["mp4"], start, t, self.config.fps, (h, w), display)
            elif wanted == ("mp4",):
                at = 0.0 if which == "first" else max(0.0, s.duration[pos] - 1e-3)
                frames = decode_window(members["mp4"], at, 1, 1.0, (h, w), display)
            else:
                frames = decode_image(members[wanted[0]], (h, w))[None]
            shape = (frames.shape[0], 3, h, w)  # T x C x H x W
            out.put("frames", row, "U8", shape, frames.transpose(0, 3, 1, 2))
        out.put_optional("text", row, text_view)
        for column, shape in self.embedding_shapes.items():
            out.put_masked(column, row, "F32", shape, embeddings.get(column))
        return meta

    def _embedding_views(self, data: memoryview | None) -> dict[str, memoryview]:
        """{column: raw float32 bytes} of the embeddings in a sample's emb.safetensors, each checked against
        the subset's K x D (a member that does not parse or does not match is a corrupt sample)."""
        if data is None or not self.embedding_shapes:
            return {}
        views = tensor_views(data, EMBEDDING_FILE)
        out = {}
        for column, shape in self.embedding_shapes.items():
            if column not in views:
                continue
            dtype, got, raw = views[column]
            if dtype != "F32" or tuple(got) != shape:
                raise ValueError(f"{EMBEDDING_FILE}: {column} of {dtype} {got}, the manifest says F32 {list(shape)}")
            out[column] = raw
        return out

    def _substitutes(self, epoch: int, j: int, bucket_id: int, bucket: Bucket, draws: np.ndarray,
                     out: "_BatchRows", size: int) -> list:
        """Every sample of batch j is corrupt: the next good samples of its bucket in the plan take their place
        (deterministic, so a resumed run does the same), so that the rank still yields a batch."""
        good: list = []
        for other_bucket, samples, items in self.batches.following(epoch, j):
            if other_bucket != bucket_id:
                continue
            for slot, pos in enumerate(items):
                if len(good) == size:
                    break
                sample = self._try_load(samples, int(pos), bucket, draws[slot % len(draws)], out, len(good))
                if sample is not None:
                    good.append((samples, int(pos), sample))
            if len(good) == size:
                break
        if not good:
            raise CorruptDataError(f"every sample of bucket {bucket} is corrupt; run `lvd shards verify "
                                   f"{self.reader.root}`")
        log.warning("every sample of batch %d of epoch %d is corrupt: %d samples of later batches of its bucket take "
                    "their place (read twice this epoch)", j, epoch, len(good))
        return good

    def _collate(self, bucket: Bucket, good: list[tuple[Samples, int, Any]], draws: np.ndarray,
                 out: "_BatchRows") -> dict[str, Any]:
        batch: dict[str, Any] = {"kind": bucket.kind, "key": [str(s.keys[p]) for s, p, _ in good]}
        if self.config.output == "raw":
            batch["files"] = [sample for _, _, sample in good]
            batch["num_bytes"] = int(sum(s.size[p] for s, p, _ in good))
            return batch
        b = len(good)  # the good samples fill the batch's first b rows
        if bucket.kind == LATENTS:
            batch["latents_BTCHW"] = out.tensor("latents", b)
        else:
            batch["frames_BTCHW"] = out.tensor("frames", b)
        if out.has("text"):
            batch["text_BLD"] = out.tensor("text", b)
        for column in self.embedding_shapes:
            batch[column] = out.tensor(column, b)
            batch[f"{column}_mask"] = out.mask(column)[:b].copy()
        batch["caption"] = [_caption(s, p, draws[k % len(draws), 2]) for k, (s, p, _) in enumerate(good)]
        # small per-sample values travel as numpy (pickled inline): a torch tensor from a worker would get a
        # shared-memory segment and a file descriptor of its own; _small_to_torch makes them tensors at the end
        batch["fps_B"] = np.full(b, 0.0 if bucket.kind == IMAGE else self.config.fps, np.float32)
        batch["motion_bucket_B"] = np.array([s.motion_bucket[p] for s, p, _ in good], np.float32)
        batch["is_image_B"] = np.full(b, bucket.kind == IMAGE)
        batch["scores"] = {c: np.array([s.scores[c][p] for s, p, _ in good], np.float32)
                           for c in self.batches.score_columns}
        if self.config.read_json:
            batch["meta"] = [sample for _, _, sample in good]
        return batch


def _caption(s: Samples, pos: int, u: float) -> str:
    caps = s.captions[pos] if s.captions is not None else None
    if caps is None or len(caps) == 0:
        return ""
    weights = np.array([max(0.0, float(c.get("weight") or 0.0)) for c in caps])
    if weights.sum() <= 0:
        weights = np.ones(len(caps))
    k = int(np.searchsorted(np.cumsum(weights) / weights.sum(), u, side="right"))
    return str(caps[min(k, len(caps) - 1)].get("text") or "")


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _safetensors_header(data: memoryview, label: str) -> tuple[int, dict[str, Any]]:
    n = int.from_bytes(data[:8], "little")
    if not 0 < n < len(data):
        raise ValueError(f"{label}: bad header length {n}")
    header = json.loads(bytes(data[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError(f"{label}: the header is not a JSON object")
    return n, {k: v for k, v in header.items() if k != "__metadata__"}


def _entry_view(data: memoryview, n: int, entry: dict[str, Any], label: str) -> tuple[str, list[int], memoryview]:
    dtype, shape = entry["dtype"], [int(v) for v in entry["shape"]]
    begin, end = (8 + n + int(v) for v in entry["data_offsets"])
    if dtype not in _DTYPES or end > len(data):
        raise ValueError(f"{label}: dtype {dtype} or data range {begin}..{end} not readable")
    nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise ValueError(f"{label}: {end - begin} data bytes for shape {shape} {dtype}")
    return dtype, shape, data[begin:end]


def tensor_view(data: memoryview, name: str) -> tuple[str, list[int], memoryview]:
    """(dtype, shape, raw bytes) of the tensor `name` (or the only one) in a safetensors file, without a copy."""
    label = f"{name}.safetensors"
    n, tensors = _safetensors_header(data, label)
    entry = tensors.get(name) or (next(iter(tensors.values())) if len(tensors) == 1 else None)
    if entry is None:
        raise KeyError(f"{label} holds {sorted(tensors)}, none named {name!r}")
    return _entry_view(data, n, entry, label)


def tensor_views(data: memoryview, label: str) -> dict[str, tuple[str, list[int], memoryview]]:
    """{name: (dtype, shape, raw bytes)} of every tensor in a safetensors file, without a copy."""
    n, tensors = _safetensors_header(data, label)
    return {name: _entry_view(data, n, entry, label) for name, entry in tensors.items()}


def embedding_shapes(frame, root: str) -> dict[str, tuple[int, ...]]:
    """{embedding column: K x D} over the subset (the manifest's `<column>_shape`), for read_embeddings: one
    shape per column, so that every batch has the same B x K x D; columns no sample has are left out."""
    shapes: dict[str, tuple[int, ...]] = {}
    for column in EMBEDDING_COLUMNS:
        name = embedding_shape_column(column)
        if name not in frame:
            continue
        found = {tuple(int(d) for d in s) for s in frame[name].to_numpy(dtype=object) if s is not None}
        if len(found) > 1:
            raise ValueError(f"read_embeddings: {column} has shapes {sorted(found)} across the subset of {root} "
                             "(clips embedded by different CLIP models); narrow the query to one model, "
                             "e.g. clip_model == '...', or re-run the clip stage with one model")
        if found:
            shapes[column] = found.pop()
    if not shapes:
        raise ValueError(f"read_embeddings is set but no sample of the subset of {root} has "
                         f"{' or '.join(EMBEDDING_COLUMNS)} (no emb.safetensors member; shards written from a ledger "
                         "without the clip stage, or by an older lvd); rewrite the shards with `lvd shards write` "
                         "from a run with the clip stage enabled, or set read_embeddings=false")
    return shapes


class _SlotPool:
    """Shared-memory slots a DataLoader worker reuses for its batches' tensors, round robin.

    Fresh shared memory for every batch costs a page fault per 4 KB (on a VM, more than the copy itself).
    A slot is reused `count` batches later; the training process copies each batch out of its slot as it
    receives it, and the DataLoader keeps at most prefetch_factor batches of a worker in flight, so with
    count = prefetch_factor + 2 a slot is never written while its previous batch is still being read."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.storages: list[torch.UntypedStorage | None] = [None] * count
        self.turn = -1
        self.used = 0

    def next_batch(self) -> None:
        self.turn = (self.turn + 1) % self.count
        self.used = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        start = -(-self.used // 64) * 64
        storage = self.storages[self.turn]
        if storage is None or storage.nbytes() < start + nbytes:
            # grow (rarely: a larger bucket); what the slot held so far stays valid in its old storage
            storage = self.storages[self.turn] = torch.UntypedStorage._new_shared(max(2 * (start + nbytes), 1 << 20))
            start = 0
        self.used = start + nbytes
        return torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,))


_POOL: tuple[int, _SlotPool] | None = None


def _worker_slots(config: LoaderConfig) -> _SlotPool | None:
    """This DataLoader worker's slot pool (None in the training process itself)."""
    global _POOL
    if get_worker_info() is None:
        return None
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), _SlotPool(config.prefetch_factor + 2))
    pool = _POOL[1]
    pool.next_batch()
    return pool


class _Recycler:
    """Batch memory of the training process, reused once nothing refers to it any more.

    A fresh buffer per batch costs the kernel zeroing its pages (and, without huge pages, a fault per 4 KB),
    which is as much as the read itself. A buffer here is handed out again only when its reference count
    says no tensor, array or view made from it is alive, so a batch the caller still holds is never reused."""

    def __init__(self, max_buffers: int = 16) -> None:
        self.max_buffers = max_buffers
        self.buffers: list[np.ndarray] = []

    def get(self, nbytes: int) -> np.ndarray:
        for i in range(len(self.buffers)):
            # 2 references: the list's and getrefcount's argument; anything more is a live batch
            if self.buffers[i].nbytes >= nbytes and sys.getrefcount(self.buffers[i]) == 2:
                return self.buffers[i][:nbytes]
        buf = np.empty(nbytes, np.uint8)
        if len(self.buffers) >= self.max_buffers:
            idle = [i for i in range(len(self.buffers)) if sys.getrefcount(self.buffers[i]) == 2]
            if not idle:
                return buf  # every pooled buffer is in use: this one is not pooled
            self.buffers.pop(idle[0])
        self.buffers.append(buf)
        return buf[:nbytes]


_RECYCLER = _Recycler()


class _BatchRows:
    """The batch's big tensors, filled row by row: in numpy-allocated memory in the training process, in a
    reused shared-memory slot in a DataLoader worker."""

    def __init__(self, size: int, slots: _SlotPool | None) -> None:
        self.size, self.slots = size, slots
        self._arrays: dict[str, tuple[torch.Tensor, np.ndarray, str, tuple[int, ...]]] = {}
        self._missing: set[str] = set()
        self._masks: dict[str, np.ndarray] = {}
        self._arena: memoryview | None = None
        self._arena_used = 0

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self.slots is not None:
            return self.slots.alloc(nbytes)
        return torch.from_numpy(_RECYCLER.get(nbytes))

    def names(self) -> list[str]:
        return list(self._arrays)

    def reserve_arena(self, nbytes: int) -> None:
        self._arena = memoryview(_RECYCLER.get(nbytes) if self.slots is None else np.empty(nbytes, np.uint8))

    def arena(self, nbytes: int) -> memoryview:
        """The next `nbytes` of the batch's byte arena (raw output), or a private buffer past its end (spares)."""
        if self._arena is None or self._arena_used + nbytes > len(self._arena):
            return memoryview(np.empty(nbytes, np.uint8)).cast("B")
        view = self._arena[self._arena_used : self._arena_used + nbytes]
        self._arena_used += nbytes
        return view

    def put(self, name: str, row: int, dtype: str, shape, values: np.ndarray) -> None:
        shape = tuple(int(v) for v in shape)
        entry = self._arrays.get(name)
        if entry is None:
            nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            flat = self._alloc(self.size * nbytes)
            entry = self._arrays[name] = (flat, flat.numpy().reshape(self.size, nbytes), dtype, shape)
        _, rows, have_dtype, have_shape = entry
        if (dtype, shape) != (have_dtype, have_shape):
            raise ValueError(f"{name} of {dtype} {shape} in a batch of {have_dtype} {have_shape}")
        if values.dtype == np.uint8 and values.ndim == 1:
            rows[row] = values
        else:
            rows[row].reshape(values.shape)[...] = values

    def put_optional(self, name: str, row: int, view: tuple[str, list[int], memoryview] | None) -> None:
        """A tensor only some samples may have (text embeddings): kept when every sample has it in one shape."""
        if view is None:
            self._missing.add(name)
            return
        dtype, shape, data = view
        entry = self._arrays.get(name)
        if entry is not None and (entry[2], entry[3]) != (dtype, tuple(shape)):
            self._missing.add(name)
            return
        self.put(name, row, dtype, shape, np.frombuffer(data, np.uint8))

    def put_masked(self, name: str, row: int, dtype: str, shape: tuple[int, ...], data: memoryview | None) -> None:
        """A tensor of a fixed shape that some samples lack: zeros there, and mask(name) says which rows have it."""
        mask = self._masks.setdefault(name, np.zeros(self.size, bool))
        if data is None:
            nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            self.put(name, row, dtype, shape, np.zeros(nbytes, np.uint8))
        else:
            self.put(name, row, dtype, shape, np.frombuffer(data, np.uint8))
        mask[row] = data is not None

    def mask(self, name: str) -> np.ndarray:
        return self._masks[name]

    def has(self, name: str) -> bool:
        return name in self._arrays and name not in self._missing

    def tensor(self, name: str, rows: int) -> torch.Tensor:
        """The first `rows` rows (those filled)."""
        flat, _, dtype, shape = self._arrays[name]
        return flat.view(_DTYPES[dtype]).view(self.size, *shape)[:rows]


class ShardDataset(IterableDataset):
    """One rank's batches from a start state; splits them over DataLoader workers (every K-th batch)."""

    def __init__(self, maker: BatchMaker, start: tuple[int, int], rank: int, world_size: int) -> None:
        super().__init__()
        self.maker, self.start, self.rank, self.world_size = maker, start, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.maker.batches.stream(self.start, self.rank, self.world_size, worker, num_workers)
        for epoch, j, state_after, planned in stream:
            batch = self.maker.make(epoch, j, planned)
            batch["state"] = {"epoch": state_after[0], "consumed": state_after[1]}
            batch["worker"] = (self.rank, worker)
            yield batch


def _copy_out_of_slots(batch: dict[str, Any], keep_mapped: deque) -> None:
    """Tensors a worker built in its reused shared-memory slot become the caller's own (a memcpy into
    numpy-allocated memory). Holding on to the slot storages keeps torch's mapping of them cached, so the
    next batch in the same slot is not mapped (and page-faulted) again."""
    names = batch.pop("_in_slot", ())
    by_name = {"frames": "frames_BTCHW", "latents": "latents_BTCHW", "text": "text_BLD",
               **{column: column for column in EMBEDDING_COLUMNS}}
    for name in names:
        key = by_name[name]
        if key not in batch:
            continue
        t = batch[key]
        own = np.empty(t.numel() * t.element_size(), np.uint8)
        own[:] = t.reshape(-1).view(torch.uint8).numpy()
        keep_mapped.append(t.untyped_storage())
        batch[key] = torch.from_numpy(own).view(t.dtype).view(t.shape)


def _small_to_torch(batch: dict[str, Any]) -> None:
    for key in ("fps_B", "motion_bucket_B", "is_image_B", *(f"{c}_mask" for c in EMBEDDING_COLUMNS)):
        if key in batch:
            batch[key] = torch.from_numpy(batch[key])
    if "scores" in batch:
        batch["scores"] = {c: torch.from_numpy(v) for c, v in batch["scores"].items()}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """Batches are made whole in the worker; torch's default conversion would turn tuples into lists."""
    return batch


class ShardLoader:
    """Iterable of batches for one rank, with exact resume. See the module docstring."""

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None,
                 manifest: Manifest | None = None, rows: np.ndarray | None = None, plan: str | None = None) -> None:
        """`plan`: a plan folder written once for this config (shards/plan_file.py, as `lvd train` and `lvd shards
        plan` write it): the rank reads only its own batches of it, never the manifest. Without it the plan is
        made here from the manifest. `rows`: the subset as manifest rows, instead of config's query or subset file
        (a caller that has computed it already, e.g. precompute's task for one shard)."""
        self.config = config
        self.rank, self.world_size = resolve_world(rank, world_size)
        if plan is not None:
            if manifest is not None or rows is not None:
                raise ValueError("pass a plan folder or a manifest and rows, not both: the plan holds the subset")
            self.manifest: Manifest | None = None
            self.batches: SubsetBatches | PlanBatches = PlanBatches(plan, config, self.rank, self.world_size)
        else:
            self.manifest = manifest or Manifest.load(config.shards)
            self.batches = SubsetBatches(self.manifest, config, rows)
        self.maker = BatchMaker(self.batches, config)
        self.epoch, self.consumed = 0, 0
        self.num_read, self.num_corrupt, self.num_repeated = 0, 0, 0
        self.num_refused = self.batches.num_refused  # hostile names, left out of the plan (shards/names.py)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = ShardDataset(self.maker, (self.epoch, self.consumed), self.rank, self.world_size)
        c = self.config
        if c.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=c.num_workers,
                                      prefetch_factor=c.prefetch_factor, pin_memory=c.pin_memory,
                                      persistent_workers=False))
        keep_mapped: deque = deque(maxlen=4 * max(1, c.num_workers) * (c.prefetch_factor + 2))
        for batch in batches:
            _copy_out_of_slots(batch, keep_mapped)
            _small_to_torch(batch)
            # the state advances only with what the caller received, not with what workers prefetched
            self.epoch, self.consumed = batch["state"]["epoch"], batch["state"]["consumed"]
            self.num_read += batch["num_read"]
            self.num_corrupt += batch["num_corrupt"]
            self.num_repeated += batch["num_repeated"]
            self._check_corrupt()
            yield batch

    def _check_corrupt(self) -> None:
        ceiling = self.config.max_corrupt_fraction
        if self.num_corrupt > ceiling * max(self.num_read, MIN_READ_FOR_FRACTION):
            raise CorruptDataError(
                f"{self.num_corrupt} of the {self.num_read} samples read were corrupt (skipped), more than "
                f"max_corrupt_fraction ({ceiling}) allows: run `lvd shards verify {self.config.shards}` to find the "
                "damaged shards and restore or rewrite them, or raise max_corrupt_fraction")

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in `epoch` (default: what is left of the current one); the same on every
        rank unless remainder=uneven."""
        if epoch is None or epoch == self.epoch:
            return self.batches.batches_for_rank(self.epoch, self.consumed, self.world_size)
        return self.batches.batches_for_rank(epoch, 0, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self.consumed,
                "plan": self.batches.fingerprint, "world_size": self.world_size,
                "num_read": self.num_read, "num_corrupt": self.num_corrupt, "num_repeated": self.num_repeated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}; it comes from "
                             "another lvd version")
        if state["plan"] != self.batches.fingerprint:
            raise ValueError("the loader state was saved for another plan: the subset (query, shards), seed, batch "
                             "sizes, buckets or image mixing differ from this config. Restore with the config of the "
                             "saved run (only the number of ranks and workers may change)")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed > self.batches.epoch_batches(epoch):
            raise ValueError(f"loader state consumed {consumed} batches of epoch {epoch}, which has only "
                             f"{self.batches.epoch_batches(epoch)}")
        self.epoch, self.consumed = epoch, consumed
        self.num_read, self.num_corrupt, self.num_repeated = (int(state.get(k, 0)) for k in
                                                              ("num_read", "num_corrupt", "num_repeated"))
