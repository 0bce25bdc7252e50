"""Near-duplicate search at dataset scale: k-means first, all pairs within each cluster, one small merge.

An exact all-pairs search costs N^2 D / 2 multiply-adds (~25 ns of one core per pair at D = 768: a core-day
at 2.6M clips) and holds every vector in one process. This module runs the search as NeMo Curator's
semantic dedup does, in Ray tasks (curation/tasks.py) that exchange files, never rows through the driver:

1. **clustering** (one task, cached in `RUN/clusters/`): spherical k-means (faiss) on a sample of the
   run's usable clip vectors. The sample is chosen by a hash of the clip id (`in_sample`), so the same
   ledger gives the same sample whatever the file layout; k = ceil(usable clips / `dedup.cluster_size`).
   The clustering depends on the ledger and the clustering keys only, not on the thresholds or
   `near_threshold`, so `--rethreshold` reuses it.
2. **assignment** (a task per group of candidate files): every candidate clip goes to its
   `dedup.assignments` nearest centroids, so that two duplicates on either side of a cluster border still
   share a cluster; rows are written partitioned by groups of whole clusters (`part=P`), sized from the
   sample's cluster counts to about `ROWS_PER_TASK` rows each.
3. **search** (a task per partition): within each cluster, the exact tiled all-pairs search of
   curation/post/dedup.py (`near_components`); the members of each component of two or more clips are written
   with their cosine to the component's best clip (dedup.keep's rank).
4. **merge** (one task): a clip in two clusters joins their components (scipy connected components over
   clip-component memberships: duplicates only, not the dataset); each merged group keeps its best clip;
   a dropped clip's `dup_similarity` is its cosine to that survivor (recomputed from the stored vectors when
   they never shared a cluster). Written partitioned by ledger bucket, as curation/post/decisions.py applies it.

Up to `dedup.all_pairs_max` candidates the clusters are skipped: every candidate is one group, which is the
exact search (the funnel says which path ran). The clustered path finds a pair only when the two clips
share one of their nearest centroids. Measured on structure-less random unit vectors (the worst case: real
CLIP embeddings cluster), 200k x 768, k = 100, pairs at cosine 0.98: the 1 / 2 / 3 nearest centroids find
76 / 97.9 / 99.9% of pairs, at 1x / 4x / 9x the within-cluster pairs of a single assignment. Default 3.

Memory per task is bounded by the partition (whole clusters, ~ROWS_PER_TASK rows; a single larger cluster
is its own partition), the assignment group, or the sample: never by the dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from curation.post.dedup import DUPLICATE_PREFIX, DedupConfig, near_components
from curation.ledger import atomic_parquet, atomic_text
from curation.tasks import call_task, map_tasks

ROWS_PER_TASK = 131_072
"""Rows one assignment or search task holds (~400 MB of 768-d float32 vectors)."""
CLUSTERING = "clustering.json"
CENTROIDS = "centroids.npy"


def vector_table(clip_ids: pa.Array, rank_key: np.ndarray, bucket: int, vectors: np.ndarray) -> pa.Table:
    """The candidate layout this module reads: clip_id, rank_key (survivor preference, higher first, null last),
    bucket (ledger bucket), vector (L2-normalised float32)."""
    n, dim = vectors.shape
    rank = pa.array(rank_key, pa.float64(), mask=np.isnan(rank_key))
    return pa.table({"clip_id": clip_ids.cast(pa.string()), "rank_key": rank,
                     "bucket": pa.array(np.full(n, bucket, np.int32)),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)})


def in_sample(clip_ids: pa.Array, fraction: float) -> np.ndarray:
    """True for the clips in the k-means sample: a hash of the clip id below `fraction`, so membership does not
    depend on which file or task a clip is in."""
    if fraction >= 1.0:
        return np.ones(len(clip_ids), dtype=bool)
    limit = int(fraction * 2**64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") < limit
                        for c in clip_ids.to_pylist()), dtype=bool, count=len(clip_ids))


def sample_fraction(config: DedupConfig, num_vectors: int) -> float:
    k = num_clusters(config, num_vectors)
    return min(1.0, max(config.kmeans_sample, 40 * k) / max(num_vectors, 1))


def num_clusters(config: DedupConfig, num_vectors: int) -> int:
    return max(1, math.ceil(num_vectors / config.cluster_size))


def fingerprint(config: DedupConfig, ledger_files: list[str], num_vectors: int) -> str:
    """What the clustering depends on: the ledger's clips files (immutable, uuid-named) and the clustering keys."""
    keys = {k: getattr(config, k) for k in ("cluster_size", "kmeans_sample", "kmeans_iterations", "seed")}
    text = json.dumps({"files": sorted(ledger_files), "vectors": num_vectors, **keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_clustering(clusters_dir: Path, print_: str) -> bool:
    meta = clusters_dir / CLUSTERING
    try:
        return json.loads(meta.read_text())["fingerprint"] == print_ and (clusters_dir / CENTROIDS).is_file()
    except (OSError, ValueError, KeyError):
        return False


@dataclass
class Search:
    dropped: int
    path: str            # "all-pairs" or "clustered"
    detail: str          # for the funnel: what ran, in words

    def funnel_path(self) -> str:
        return f"{self.path}: {self.detail}"


def search(work: Path, vector_files: list[str], num_candidates: int, config: DedupConfig, *,
           exact_dir: Path | None = None, clusters_dir: Path | None = None, sample_files: list[str] = (),
           print_: str = "", num_vectors: int = 0) -> Search:
    """Near duplicates among the rows of `vector_files` (vector_table layout) minus the clip ids under
    `exact_dir/bucket=B/` (already exact duplicates); writes `work/bucket=B/near.parquet` (clip_id, dup_of,
    dup_similarity, decision) and returns how many clips it drops. `num_vectors` clips (all usable, not only
    candidates) were sampled into `sample_files` at `sample_fraction`; `print_` is their `fingerprint`."""
    files = sorted(vector_files)
    if not files or num_candidates < 2:
        return Search(0, "all-pairs", f"{max(num_candidates, 0)} clips")
    scratch = work / "_search"
    clustered = num_candidates > config.all_pairs_max
    if clustered:
        if clusters_dir is None:
            raise ValueError("near dedup above dedup.all_pairs_max needs a clusters folder")
        reused = cached_clustering(clusters_dir, print_)
        if not reused:
            if not sample_files:
                raise ValueError(f"near dedup: {num_candidates} candidates need a k-means sample and none was written")
            call_task(_train, sorted(sample_files), str(clusters_dir), config.model_dump(mode="json"), print_,
                      num_vectors)
        meta = json.loads((clusters_dir / CLUSTERING).read_text())
        parts = _pack(np.asarray(meta["sample_counts"], dtype=np.float64) * num_candidates / max(meta["sample"], 1))
        centroids = str(clusters_dir / CENTROIDS)
        detail = (f"{num_candidates} clips in {meta['k']} k-means clusters ({'reused' if reused else 'trained on'} "
                  f"a sample of {meta['sample']}), each clip in its {config.assignments} nearest")
    else:
        parts, centroids = np.zeros(1, dtype=np.int64), None
        detail = f"{num_candidates} clips, every pair compared"
    groups = _groups(files)
    map_tasks(_assign, [(g, i, str(scratch), centroids, config.assignments if clustered else 1, parts.tolist(),
                         None if exact_dir is None else str(exact_dir)) for i, g in enumerate(groups)])
    part_dirs = sorted(str(p) for p in (scratch / "assigned").glob("part=*"))
    map_tasks(_search_part, [(p, str(scratch), config.near_threshold, config.block_size) for p in part_dirs])
    dropped = call_task(_merge, str(scratch), str(work))
    return Search(dropped, "clustered" if clustered else "all-pairs", detail)


# -- tasks -------------------------------------------------------------------------------------------------
def _train(sample_files: list[str], clusters_dir: str, dedup: dict[str, Any], print_: str, num_vectors: int) -> None:
    """Spherical k-means on the sample (sorted by clip id: the result does not depend on file order); saves the
    centroids and each cluster's sample count over `assignments` nearest (the partition sizes)."""
    import faiss

    config = DedupConfig.model_validate(dedup)
    table = pads.dataset(sample_files, format="parquet").to_table(columns=["clip_id", "vector"])
    table = table.take(pc.sort_indices(table, [("clip_id", "ascending")]))
    vectors = _matrix(table.column("vector"))
    k = min(num_clusters(config, num_vectors), len(vectors))
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=config.kmeans_iterations, seed=config.seed, spherical=True,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)
    kmeans.train(vectors)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    nearest = _nearest(centroids, vectors, min(config.assignments, k))
    out = Path(clusters_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CENTROIDS}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, centroids, allow_pickle=False)
    tmp.replace(out / CENTROIDS)
    atomic_text(out / CLUSTERING, json.dumps({
        "fingerprint": print_, "k": k, "dim": int(vectors.shape[1]), "sample": len(vectors),
        "iterations": config.kmeans_iterations, "seed": config.seed,
        "sample_counts": np.bincount(nearest.reshape(-1), minlength=k).tolist()}))


def _assign(files: list[str], group: int, scratch: str, centroids: str | None, assignments: int, parts: list[int],
            exact_dir: str | None) -> None:
    """One group of candidate files -> `assigned/part=P/g<group>.parquet`: each row once per nearest centroid,
    with its cluster id."""
    table = pads.dataset(files, format="parquet").to_table(columns=["clip_id", "rank_key", "bucket", "vector"])
    if exact_dir is not None:
        gone = _exact_ids(Path(exact_dir), pc.unique(table.column("bucket")).to_pylist())
        if gone is not None:
            table = table.filter(pc.invert(pc.is_in(table.column("clip_id"), gone)))
    if table.num_rows == 0:
        return
    if centroids is None:
        cluster = np.zeros((table.num_rows, 1), dtype=np.int64)
    else:
        matrix = np.load(centroids, allow_pickle=False)
        cluster = _nearest(matrix, _matrix(table.column("vector")), min(assignments, len(matrix)))
    rows = np.repeat(np.arange(table.num_rows), cluster.shape[1])
    cluster = cluster.reshape(-1)
    part = np.asarray(parts, dtype=np.int64)[cluster]
    order = np.lexsort((cluster, part))
    rows, cluster, part = rows[order], cluster[order], part[order]
    starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], part.size]):
        piece = table.take(pa.array(rows[a:b])).append_column("cluster", pa.array(cluster[a:b]))
        atomic_parquet(Path(scratch, "assigned", f"part={part[a]:06d}", f"g{group:06d}.parquet"), piece)


def _search_part(part_dir: str, scratch: str, threshold: float, block_size: int) -> int:
    """All pairs within each cluster of one partition -> the members of every component of 2+ clips, with the
    cosine to the component's best clip, and those members' vectors (for the merge)."""
    files = sorted(str(p) for p in Path(part_dir).glob("*.parquet"))
    table = pads.dataset(files, format="parquet").to_table()
    table = table.take(pc.sort_indices(table, [("cluster", "ascending"), ("clip_id", "ascending")]))
    cluster = table.column("cluster").to_numpy()
    vectors = _matrix(table.column("vector"))
    rank = _rank_order(table)
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    member_rows, group_ids, best_rows = [], [], []
    for a, b in zip(starts, np.r_[starts[1:], cluster.size]):
        if b - a < 2:
            continue
        labels = near_components(vectors[a:b], threshold, block_size)
        sizes = np.bincount(labels)
        big = sizes[labels] >= 2
        if not big.any():
            continue
        rows = np.flatnonzero(big) + a
        lab = labels[big]
        order = np.lexsort((rank[rows], lab))  # per component, best first
        rows, lab = rows[order], lab[order]
        first = np.r_[True, lab[1:] != lab[:-1]]
        best = rows[first][np.cumsum(first) - 1]
        member_rows.append(rows)
        best_rows.append(best)
        group_ids.append(cluster[a] * (1 << 32) + lab)
    name = Path(part_dir).name
    if not member_rows:
        return 0
    rows, best = np.concatenate(member_rows), np.concatenate(best_rows)
    cos = _cosine(vectors[rows], vectors[best])
    ids = table.column("clip_id")
    groups = pa.table({"clip_id": ids.take(pa.array(rows)), "group": pa.array(np.concatenate(group_ids)),
                       "rank_key": table.column("rank_key").take(pa.array(rows)),
                       "bucket": table.column("bucket").take(pa.array(rows)),
                       "best": ids.take(pa.array(best)), "cosine": pa.array(cos)})
    atomic_parquet(Path(scratch, "groups", f"{name}.parquet"), groups)
    unique = np.unique(rows)
    atomic_parquet(Path(scratch, "vectors", f"{name}.parquet"),
                   pa.table({"clip_id": ids.take(pa.array(unique)), "vector": table.column("vector").take(pa.array(unique))}))
    return len(rows)


def _merge(scratch: str, work: str) -> int:
    """Components that share a clip (from two clusters) merge; each merged group keeps its best clip."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    files = sorted(str(p) for p in Path(scratch, "groups").glob("*.parquet"))
    if not files:
        return 0
    table = pads.dataset(files, format="parquet").to_table()
    encoded = pc.dictionary_encode(table.column("clip_id")).combine_chunks()
    clip = encoded.indices.to_numpy().astype(np.int64)
    names = encoded.dictionary
    n = len(names)
    _, group = np.unique(table.column("group").to_numpy(), return_inverse=True)
    graph = coo_matrix((np.ones(len(clip), np.int8), (clip, n + group)), shape=(n + group.max() + 1,) * 2)
    _, comp = connected_components(graph, directed=False)
    comp = comp[:n]
    # per clip: its rank (first row of the clip; every row of a clip has the same rank key) and bucket
    first = np.unique(clip, return_index=True)[1]
    by_name = np.empty(n, np.int64)
    by_name[pc.sort_indices(names).to_numpy()] = np.arange(n)
    rank_key = table.column("rank_key").to_numpy(zero_copy_only=False)[first]
    bucket = table.column("bucket").to_numpy()[first]
    order = np.lexsort((by_name, np.where(np.isnan(rank_key), np.inf, -rank_key), comp))
    head = np.r_[True, comp[order][1:] != comp[order][:-1]]
    survivor = np.empty(comp.max() + 1, np.int64)
    survivor[comp[order][head]] = order[head]
    dup_of = survivor[comp]
    dropped = np.flatnonzero(dup_of != np.arange(n))
    if dropped.size == 0:
        return 0
    # the cosine to the survivor, from a component both were in (the survivor is then that component's best)
    cos = np.full(n, np.nan)
    best = pc.index_in(table.column("best"), names).to_numpy(zero_copy_only=False)
    direct = best == dup_of[clip]
    cos[clip[direct]] = table.column("cosine").to_numpy()[direct]
    missing = dropped[np.isnan(cos[dropped])]
    if missing.size:  # joined through other clips only: from the stored vectors
        cos[missing] = _cosine_by_id(scratch, names, missing, dup_of[missing])
    ids = names.take(pa.array(dropped))
    of = names.take(pa.array(dup_of[dropped]))
    sims = np.clip(cos[dropped], -1.0, 1.0)
    decision = pa.array([f"{DUPLICATE_PREFIX}near {s} cosine {c:.3f}" for s, c in zip(of.to_pylist(), sims)],
                        pa.string())
    out = pa.table({"clip_id": ids, "dup_of": of, "dup_similarity": pa.array(sims), "decision": decision,
                    "bucket": pa.array(bucket[dropped])})
    for b in np.unique(bucket[dropped]):
        atomic_parquet(Path(work, f"bucket={b}", "near.parquet"),
                       out.filter(pc.equal(out.column("bucket"), pa.scalar(b, pa.int32()))).drop_columns(["bucket"]))
    return int(dropped.size)


# -- helpers -----------------------------------------------------------------------------------------------
def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)


def _nearest(centroids: np.ndarray, vectors: np.ndarray, a: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(np.ascontiguousarray(vectors, dtype=np.float32), a)
    return nearest.astype(np.int64)


def _pack(sizes: np.ndarray) -> np.ndarray:
    """Partition of each cluster: consecutive clusters packed to about ROWS_PER_TASK estimated rows."""
    part = np.empty(sizes.size, dtype=np.int64)
    current, filled = 0, 0.0
    for i, s in enumerate(sizes):
        if filled and filled + s > ROWS_PER_TASK:
            current, filled = current + 1, 0.0
        part[i], filled = current, filled + s
    return part


def _groups(files: list[str]) -> list[list[str]]:
    """Candidate files in groups of about ROWS_PER_TASK rows (row counts from the parquet footers)."""
    groups, rows = [[]], 0
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        if groups[-1] and rows + n > ROWS_PER_TASK:
            groups.append([])
            rows = 0
        groups[-1].append(f)
        rows += n
    return groups


def _rank_order(table: pa.Table) -> np.ndarray:
    """Position of each row in the survivor order: higher rank_key first (null last), then the smaller clip_id."""
    key = table.column("rank_key").to_numpy(zero_copy_only=False).astype(np.float64)
    by_id = np.empty(table.num_rows, np.int64)
    by_id[pc.sort_indices(table.column("clip_id")).to_numpy()] = np.arange(table.num_rows)
    order = np.lexsort((by_id, np.where(np.isnan(key), np.inf, -key)))
    rank = np.empty(table.num_rows, np.int64)
    rank[order] = np.arange(table.num_rows)
    return rank


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines in float64 of the float32 vectors re-normalised, as curation/post/dedup.py reports them."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    a64 /= np.linalg.norm(a64, axis=1, keepdims=True)
    b64 /= np.linalg.norm(b64, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a64, b64)


def _cosine_by_id(scratch: str, names: pa.Array, rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    wanted = pc.unique(pa.concat_arrays([names.take(pa.array(rows)), names.take(pa.array(other))]))
    files = sorted(str(p) for p in Path(scratch, "vectors").glob("*.parquet"))
    table = pads.dataset(files, format="parquet").to_table(filter=pc.field("clip_id").isin(wanted))
    first = np.unique(pc.dictionary_encode(table.column("clip_id")).combine_chunks().indices.to_numpy(),
                      return_index=True)[1]
    table = table.take(pa.array(first))
    where = pc.index_in(names.take(pa.array(rows)), table.column("clip_id")).to_numpy(zero_copy_only=False)
    where_other = pc.index_in(names.take(pa.array(other)), table.column("clip_id")).to_numpy(zero_copy_only=False)
    vectors = _matrix(table.column("vector"))
    return _cosine(vectors[where.astype(np.int64)], vectors[where_other.astype(np.int64)])


def _exact_ids(exact_dir: Path, buckets: list[int]) -> pa.Array | None:
    files = [str(p) for b in buckets for p in sorted((exact_dir / f"bucket={b}").glob("*.parquet"))]
    if not files:
        return None
    return pads.dataset(files, format="parquet").to_table(columns=["clip_id"]).column("clip_id").combine_chunks()
