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

from shards.config import LoaderConfig
from shards.manifest import Manifest

log = logging.getLogger("lvd.shards")

VIDEO, IMAGE, LATENTS = "video", "image", "latents"


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
        if rows is None:
            rows = subset_rows(manifest, config)
        rows, num_refused = without_refused(manifest, np.asarray(rows, np.int64))
        if len(rows) == 0:
            raise ValueError(f"the subset is empty: query {config.query!r} selects no sample of {manifest.root}; "
                             "check it with `lvd shards query` and loosen it")
        frame = manifest.samples.iloc[rows]
        table: dict[Bucket, int] = {}
        excluded: dict[str, int] = {}
        video = _video_buckets(frame, config, table, excluded)
        image = _image_buckets(frame, config, table) if config.image_ratio > 0 else np.full(len(rows), -1)
        # bucket ids in a canonical order, so that the plan does not depend on the order buckets were met
        ordered = sorted(table)
        remap = np.array([ordered.index(b) for b in table] + [-1], dtype=np.int64)  # index -1 maps to -1
        video, image = remap[video], remap[image]
        planner = cls(config, rows, video, image, ordered, excluded, num_refused=num_refused)
        planner.fingerprint = planner._fingerprint(manifest)
        if config.image_ratio < 1 and (video < 0).all():
            raise ValueError(f"no sample of the subset fits a video bucket ({excluded}); lower num_frames "
                             f"({config.num_frames}) or fps ({config.fps}), or set image_ratio=1 for images only")
        for reason, n in excluded.items():
            log.warning("%d of %d samples left out of video batches: %s", n, len(rows), reason)
        return planner

    def _fingerprint(self, manifest: Manifest) -> str:
        c = self.config
        doc = {"keys": hashlib.sha256("\n".join(manifest.samples["key"].iloc[self.rows]).encode()).hexdigest(),
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
    """`rows` less the samples with hostile names (never read, never yielded), and how many those were."""
    refused = manifest.refused
    if not refused:
        return rows, 0
    mask = np.zeros(len(manifest.samples), bool)
    mask[[r for r, _ in refused]] = True
    kept = rows[~mask[rows]]
    if len(kept) < len(rows):
        log.warning("%d samples of the subset refused, e.g. %s; run `lvd shards verify %s` and rewrite the shards "
                    "from their curation run", len(rows) - len(kept), refused[0][1], manifest.root)
    return kept, len(rows) - len(kept)


def subset_rows(manifest: Manifest, config: LoaderConfig) -> np.ndarray:
    if config.subset is not None:
        import fsspec

        with fsspec.open(config.subset, "rb") as f:
            keys = pd.read_parquet(f)["key"]
        pos = pd.Index(manifest.samples["key"]).get_indexer(keys)
        if (pos < 0).any():
            missing = keys[pos < 0].iloc[0]
            raise ValueError(f"subset {config.subset} names {int((pos < 0).sum())} keys not in {manifest.root} "
                             f"(e.g. {missing}); it was made from other shards: re-run `lvd shards query`")
        return np.sort(pos)
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


def _bucket_id(table: dict[Bucket, int], bucket: Bucket) -> int:
    return table.setdefault(bucket, len(table))


def _video_buckets(frame: pd.DataFrame, config: LoaderConfig, table: dict[Bucket, int],
                   excluded: dict[str, int]) -> np.ndarray:
    n = len(frame)
    out = np.full(n, -1, dtype=np.int64)
    if config.image_ratio >= 1:
        return out
    res = nearest_resolution(frame["width"].to_numpy(), frame["height"].to_numpy(), config.resolutions)
    duration = frame["duration_s"].to_numpy(dtype=float, na_value=np.nan)
    latents = frame["latents_shape"].to_numpy(dtype=object)
    frames_sorted = sorted(set(config.num_frames), reverse=True)
    for i in range(n):
        has_latents = latents[i] is not None and len(latents[i]) > 0
        if has_latents and config.latents != "ignore":
            out[i] = _bucket_id(table, Bucket(LATENTS, tuple(int(v) for v in latents[i])))
            continue
        if config.latents == "require":
            excluded["no precomputed latents (latents=require)"] = excluded.get("no precomputed latents (latents=require)", 0) + 1
            continue
        t = next((t for t in frames_sorted if t / config.fps <= duration[i] + 1e-6), None)
        if t is None:
            why = f"shorter than {min(frames_sorted)} frames at {config.fps:g} fps"
            excluded[why] = excluded.get(why, 0) + 1
            continue
        h, w = config.resolutions[res[i]]
        out[i] = _bucket_id(table, Bucket(VIDEO, (t, h, w)))
    return out


def _image_buckets(frame: pd.DataFrame, config: LoaderConfig, table: dict[Bucket, int]) -> np.ndarray:
    res = nearest_resolution(frame["width"].to_numpy(), frame["height"].to_numpy(), config.resolutions)
    ids = [_bucket_id(table, Bucket(IMAGE, (1, *config.resolutions[r]))) for r in range(len(config.resolutions))]
    return np.array([ids[r] for r in res], dtype=np.int64)


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
