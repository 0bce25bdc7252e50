"""The loader's plan: which samples form which batch, in what order, on which rank, from the manifest alone.

An epoch's plan is a list of batches, a function of (subset, seed, epoch, batch settings) only: the subset
is permuted by (seed, epoch); each sample goes to a bucket (kind, frames, height, width) from its manifest
metadata; walking the permuted order, a bucket emits a batch each time it has gathered a batch's worth; image
batches (joint image-video training) are drawn the same way from a second permutation and interleaved at
`image_ratio`. The plan never depends on the number of ranks or workers.

Ranks and workers deal the plan's batches out: rank r of W gets batches c + r, c + r + W, ... (c: batches
the run had consumed when this pass started), and data-loader worker k of K gets every K-th of its rank's
batches, which is the order in which torch's DataLoader returns them. A step consumes W consecutive batches.
State is (epoch, batches consumed): restored with the same W every rank gets exactly the batches it would
have got; with another W' the next steps consume batches c, c+1, ..., c+kW'-1, the very batches the
uninterrupted run would have consumed next (only their dealing to ranks differs, and at the end of the
current epoch which < W' leftover batches are dropped).

Letters: B samples in a batch, T frames, H x W pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shards.config import LoaderConfig
from shards.manifest import Manifest

log = logging.getLogger("lvd.shards")

VIDEO, IMAGE, LATENTS = "video", "image", "latents"
# What planning reads of each subset sample.
PLAN_COLUMNS = ["key", "width", "height", "duration_s", "latents_shape"]


@dataclass(frozen=True, order=True)
class Bucket:
    kind: str                 # video (decoded frames), image (one stored frame), latents (precomputed)
    shape: tuple[int, ...]    # video/image: (T, H, W); latents: the latents tensor's shape


@dataclass
class EpochPlan:
    """Batch j holds subset positions items[offsets[j]:offsets[j+1]] and is of bucket bucket_ids[j]."""

    epoch: int
    items: np.ndarray
    offsets: np.ndarray
    bucket_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket_ids)

    def batch(self, j: int) -> tuple[int, np.ndarray]:
        return int(self.bucket_ids[j]), self.items[self.offsets[j] : self.offsets[j + 1]]


@dataclass(frozen=True)
class Step:
    """One batch of a rank's stream and the loader state once it has been consumed."""

    epoch: int
    batch_index: int           # index into the epoch's plan
    state_after: tuple[int, int]


@dataclass
class SubsetPlanner:
    """The subset (manifest rows) with each sample's buckets; makes epoch plans and rank streams."""

    config: LoaderConfig
    rows: np.ndarray                 # manifest row of each subset position
    video_bucket: np.ndarray         # bucket id per subset position for video/latents batches, -1: none
    image_bucket: np.ndarray         # bucket id per subset position for image batches, -1: none
    buckets: list[Bucket]
    excluded: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    num_refused: int = 0             # subset samples left out for names the writer could not have written
    _cache: tuple[int, EpochPlan] | None = None

    @classmethod
    def build(cls, manifest: Manifest, config: LoaderConfig, rows: np.ndarray | None = None) -> "SubsetPlanner":
        """From the subset's planning columns alone (a projected read of the selected rows). `rows`: the subset
        as manifest rows when the caller has it already (instead of config's query or subset file)."""
        if rows is None:
            rows = subset_rows(manifest, config)
        rows, num_refused = without_refused(manifest, np.asarray(rows, np.int64))
        if len(rows) == 0:
            raise ValueError(f"the subset is empty: query {config.query!r} selects no sample of {manifest.root}; "
                             "check it with `lvd shards query` and loosen it")
        planner = cls.from_table(manifest.take(rows, PLAN_COLUMNS), rows, config)
        planner.num_refused = num_refused
        return planner

    @classmethod
    def from_table(cls, table: pa.Table, rows: np.ndarray, config: LoaderConfig) -> "SubsetPlanner":
        """Buckets from the subset's PLAN_COLUMNS (one row per subset position), vectorised."""
        excluded: dict[str, int] = {}
        video, video_buckets = _video_buckets(table, config, excluded)
        image, image_buckets = (_image_buckets(table, config) if config.image_ratio > 0
                                else (np.full(len(rows), -1, np.int64), []))
        # bucket ids in a canonical order, so that the plan does not depend on the order buckets were met
        ordered = sorted(set(video_buckets) | set(image_buckets))
        index = {b: i for i, b in enumerate(ordered)}
        video = np.array([index[b] for b in video_buckets] + [-1], np.int64)[video]  # -1 stays -1
        image = np.array([index[b] for b in image_buckets] + [-1], np.int64)[image]
        planner = cls(config, np.asarray(rows, np.int64), video, image, ordered, excluded)
        planner.fingerprint = planner._fingerprint(table.column("key"))
        if config.image_ratio < 1 and (video < 0).all():
            raise ValueError(f"no sample of the subset fits a video bucket ({excluded}); lower num_frames "
                             f"({config.num_frames}) or fps ({config.fps}), or set image_ratio=1 for images only")
        for reason, n in excluded.items():
            log.warning("%d of %d samples left out of video batches: %s", n, len(rows), reason)
        return planner

    def _fingerprint(self, keys: pa.ChunkedArray) -> str:
        c = self.config
        doc = {"keys": _join_hash(keys),
               "seed": c.seed, "shuffle": c.shuffle, "batch_size": c.batch_size, "image_batch": c.images_per_batch,
               "remainder": c.remainder, "num_frames": c.num_frames, "fps": c.fps, "resolutions": c.resolutions,
               "clip_start": c.clip_start, "image_ratio": c.image_ratio, "image_frame": c.image_frame,
               "latents": c.latents, "buckets": [str(b) for b in self.buckets],
               "assignment": hashlib.sha256(self.video_bucket.tobytes() + self.image_bucket.tobytes()).hexdigest()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # --- epoch plans
    def plan(self, epoch: int) -> EpochPlan:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        plan = self._make_plan(epoch)
        self._cache = (epoch, plan)
        return plan

    def _make_plan(self, epoch: int) -> EpochPlan:
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        n = len(self.rows)
        perm = rng.permutation(n) if c.shuffle else np.arange(n)
        video = [] if c.image_ratio >= 1 else _batches(perm, self.video_bucket, c.batch_size, c.remainder)
        images: list[tuple[int, np.ndarray]] = []
        if c.image_ratio > 0:
            if c.image_ratio >= 1:
                wanted = None
            else:
                wanted = int(round(len(video) * c.image_ratio / (1 - c.image_ratio)))
            images = _image_batches(rng, n, c.shuffle, self.image_bucket, c.images_per_batch, c.remainder, wanted)
        batches = _interleave(rng, video, images)
        if not batches:
            raise ValueError(f"epoch {epoch} has no batch: the subset ({n} samples) does not fill one batch of "
                             f"{c.batch_size}; lower batch_size or set remainder=pad")
        sizes = np.array([len(b[1]) for b in batches], dtype=np.int64)
        return EpochPlan(epoch, np.concatenate([b[1] for b in batches]).astype(np.int64),
                         np.concatenate([[0], np.cumsum(sizes)]), np.array([b[0] for b in batches], dtype=np.int64))

    # --- dealing batches to ranks
    def batches_for_rank(self, epoch: int, consumed: int, world_size: int) -> int:
        """How many batches each rank gets from `consumed` to the end of `epoch` (uneven: the most any rank gets)."""
        left = len(self.plan(epoch)) - consumed
        if left <= 0:
            return 0
        if self.config.remainder == "drop":
            return left // world_size
        return -(-left // world_size)

    def rank_stream(self, start: tuple[int, int], rank: int, world_size: int) -> Iterator[Step]:
        """This rank's batches from state `start` on, across epochs, with the state after each."""
        epoch, consumed = start
        mode = self.config.remainder
        while self.config.epochs is None or epoch < self.config.epochs:
            m = len(self.plan(epoch))
            count = self.batches_for_rank(epoch, consumed, world_size)
            if count == 0 and consumed == 0:
                raise ValueError(f"epoch {epoch} makes {m} batches, fewer than the {world_size} ranks, so remainder=drop "
                                 "leaves none: lower batch_size, use fewer ranks, or set remainder=pad")
            for i in range(count):
                j = consumed + rank + i * world_size
                if j >= m:
                    if mode == "uneven":
                        break
                    j %= m  # pad: repeat the epoch's first batches
                after = (epoch, consumed + (i + 1) * world_size) if i < count - 1 else (epoch + 1, 0)
                yield Step(epoch, j, after)
            epoch, consumed = epoch + 1, 0

    def describe(self) -> dict:
        counts = pd.Series(self.video_bucket[self.video_bucket >= 0]).value_counts().sort_index()
        return {"samples": len(self.rows), "buckets": {str(self.buckets[k]): int(v) for k, v in counts.items()},
                "excluded": dict(self.excluded), "fingerprint": self.fingerprint}


def without_refused(manifest: Manifest, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """`rows` less the samples whose key or shard name the writer could not have written (shards/names.py):
    never read, never yielded. A projected read of the two columns for the subset's rows. (Member extensions
    are not checked here: the loader looks members up by its own fixed names.)"""
    from shards.names import refused_rows

    refused = refused_rows(manifest.take(rows, ["key", "shard"])) if len(rows) else []
    if not refused:
        return rows, 0
    mask = np.ones(len(rows), bool)
    mask[[r for r, _ in refused]] = False
    log.warning("%d samples of the subset refused, e.g. %s; run `lvd shards verify %s` and rewrite the shards "
                "from their curation run", len(refused), refused[0][1], manifest.root)
    return rows[mask], len(refused)


def subset_rows(manifest: Manifest, config: LoaderConfig) -> np.ndarray:
    if config.subset is not None:
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(config.subset, "rb") as f:
            keys = pq.read_table(f, columns=["key"]).column("key")
        pos = pc.index_in(keys, value_set=manifest.scan(["key"]).column("key")).to_numpy(zero_copy_only=False)
        missing = np.isnan(pos) if pos.dtype.kind == "f" else np.zeros(len(pos), bool)
        if missing.any():
            raise ValueError(f"subset {config.subset} names {int(missing.sum())} keys not in {manifest.root} "
                             f"(e.g. {keys[int(np.flatnonzero(missing)[0])]}); it was made from other shards: "
                             "re-run `lvd shards query`")
        return np.sort(pos.astype(np.int64))
    if config.query is None and manifest.selection == "all_usable":
        raise ValueError(f"{manifest.root} holds every usable clip (written with --all-usable), including those the "
                         "curation thresholds dropped: set query=keep for the curated set, a stage's own query, or "
                         "query=true to read everything")
    return manifest.select(config.query)


def nearest_resolution(width: np.ndarray, height: np.ndarray, resolutions: list[tuple[int, int]]) -> np.ndarray:
    """Index of the (H, W) bucket nearest each sample's aspect ratio (in log space; ties to the first)."""
    aspect = np.log(np.asarray(width, float) / np.asarray(height, float))
    targets = np.log(np.array([w / h for h, w in resolutions]))
    return np.argmin(np.abs(aspect[:, None] - targets[None, :]), axis=1)


def _join_hash(keys: pa.ChunkedArray) -> str:
    """sha256 of "\n".join(keys), a few thousand keys at a time."""
    h = hashlib.sha256()
    first = True
    for chunk in keys.chunks:
        for start in range(0, len(chunk), 65536):
            piece = "\n".join(chunk.slice(start, 65536).to_pylist())
            h.update(piece.encode() if first else b"\n" + piece.encode())
            first = False
    return h.hexdigest()


def _numbers(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy(zero_copy_only=False).astype(float)


def _video_buckets(table: pa.Table, config: LoaderConfig, excluded: dict[str, int]) -> tuple[np.ndarray, list[Bucket]]:
    """(bucket index per subset position into the returned list, -1: none; the buckets met)."""
    n = table.num_rows
    out = np.full(n, -1, dtype=np.int64)
    if config.image_ratio >= 1:
        return out, []
    buckets: list[Bucket] = []
    shapes = table.column("latents_shape").combine_chunks().cast(pa.list_(pa.int64()))
    lengths = pc.fill_null(pc.list_value_length(shapes), 0).to_numpy(zero_copy_only=False)
    has_latents = lengths > 0
    if config.latents != "ignore":
        flat = pc.list_flatten(shapes).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for ndim in np.unique(lengths[has_latents]):  # latents of each rank grouped by their shape
            idx = np.flatnonzero(lengths == ndim)
            dims = flat[starts[idx][:, None] + np.arange(ndim)[None, :]]
            unique, inverse = np.unique(dims, axis=0, return_inverse=True)
            out[idx] = len(buckets) + inverse.reshape(-1)
            buckets += [Bucket(LATENTS, tuple(int(v) for v in u)) for u in unique]
    todo = ~has_latents if config.latents != "ignore" else np.ones(n, bool)
    if config.latents == "require":
        if todo.any():
            excluded["no precomputed latents (latents=require)"] = int(todo.sum())
        return out, buckets
    frames_sorted = np.array(sorted(set(config.num_frames), reverse=True))
    duration = _numbers(table, "duration_s")
    with np.errstate(invalid="ignore"):
        fits = frames_sorted[None, :] / config.fps <= duration[:, None] + 1e-6  # NaN: fits nothing
    short = todo & ~fits.any(axis=1)
    if short.any():
        excluded[f"shorter than {frames_sorted.min()} frames at {config.fps:g} fps"] = int(short.sum())
    todo &= ~short
    t = frames_sorted[np.argmax(fits, axis=1)]  # the longest frame count that fits
    res = nearest_resolution(_numbers(table, "width"), _numbers(table, "height"), config.resolutions)
    code = t.astype(np.int64) * len(config.resolutions) + res
    unique, inverse = np.unique(code[todo], return_inverse=True)
    out[todo] = len(buckets) + inverse.reshape(-1)
    for c in unique:
        h, w = config.resolutions[int(c) % len(config.resolutions)]
        buckets.append(Bucket(VIDEO, (int(c) // len(config.resolutions), h, w)))
    return out, buckets


def _image_buckets(table: pa.Table, config: LoaderConfig) -> tuple[np.ndarray, list[Bucket]]:
    res = nearest_resolution(_numbers(table, "width"), _numbers(table, "height"), config.resolutions)
    return res.astype(np.int64), [Bucket(IMAGE, (1, *r)) for r in config.resolutions]


def _batches(perm: np.ndarray, bucket_of: np.ndarray, size: int, remainder: str) -> list[tuple[int, np.ndarray]]:
    """Walks `perm`; each bucket emits a batch when it has `size` samples. Batches in emission order."""
    order = perm[bucket_of[perm] >= 0]
    if order.size == 0:
        return []
    b = bucket_of[order]
    idx = np.argsort(b, kind="stable")  # groups by bucket, keeping the permuted order inside a bucket
    bounds = np.flatnonzero(np.diff(b[idx])) + 1
    out: list[tuple[int, int, np.ndarray]] = []  # (emitted at, bucket, items)
    for group in np.split(idx, bounds):
        items, bucket = order[group], int(b[group[0]])
        full = len(items) // size
        for k in range(full):
            out.append((int(group[(k + 1) * size - 1]), bucket, items[k * size : (k + 1) * size]))
        rest = items[full * size :]
        if rest.size and remainder != "drop":
            if remainder == "pad":  # fill with the bucket's first samples of this epoch
                rest = np.concatenate([rest, np.resize(items, size - rest.size)])
            out.append((int(group[-1]), bucket, rest))
    out.sort(key=lambda t: t[0])
    return [(bucket, items) for _, bucket, items in out]


def _image_batches(rng: np.random.Generator, n: int, shuffle: bool, bucket_of: np.ndarray, size: int,
                   remainder: str, wanted: int | None) -> list[tuple[int, np.ndarray]]:
    """Image batches from passes over the subset in fresh permutations, until `wanted` (None: one pass)."""
    out: list[tuple[int, np.ndarray]] = []
    while True:
        perm = rng.permutation(n) if shuffle else np.arange(n)
        one_pass = _batches(perm, bucket_of, size, remainder)
        if not one_pass:
            raise ValueError("no sample makes an image batch; lower image_batch_size or set remainder=pad")
        out += one_pass
        if wanted is None:
            return out
        if len(out) >= wanted:
            return out[:wanted]


def _interleave(rng: np.random.Generator, video: list, images: list) -> list:
    if not images or not video:
        return video or images
    total = len(video) + len(images)
    is_image = np.zeros(total, bool)
    is_image[rng.choice(total, size=len(images), replace=False)] = True
    vi, ii = iter(video), iter(images)
    return [next(ii) if flag else next(vi) for flag in is_image]
