"""Deduplication: exact and near-duplicate clips collapse to one survivor per group.

Dedup runs in the finalize step right after the thresholds and reads stored ledger columns only (no frame
is decoded), so re-deciding with other settings is cheap. It considers only the clips the thresholds kept
(`keep` is True); a clip already dropped keeps its decision and is never chosen as a survivor.

1. Exact: kept clips with the same `content_hash` (key-frame content plus frame count) form a group.
2. Near: among the clips still kept after (1), a clip vector is the mean of the clip's K CLIP frame
   embeddings (`clip_embedding`, first/middle/last frame), L2 re-normalised. Two clips are linked when the
   cosine of their vectors is >= `near_threshold`; groups are the connected components of that graph.
   Linking is transitive: when A~B and B~C but A is not ~C, A, B and C still form one group with one
   survivor, and the dropped clip's `dup_similarity` (the cosine to the survivor, not to its nearest
   neighbour) may then lie below the threshold.

In each group one clip survives, chosen by `keep` (longest `duration_s`, highest `aesthetic` score, or the
first `clip_id`; a missing score ranks last and ties go to the smallest `clip_id`, so the result does not
depend on the row order). The others get keep=False, `dup_of` = the survivor's clip_id, `dup_similarity` (1.0 for
exact, the cosine to the survivor for near) and the decision "duplicate: exact of <id>" or
"duplicate: near <id> cosine 0.973". Clips without a hash (or without a usable embedding: missing, empty,
non-finite or zero) are never grouped.

Scale. This module is the in-memory reference and the within-group search: `near_components` is an exact
all-pairs search, the cosine matrix computed tile by tile (`block_size` x `block_size` float32 tiles, only
the upper triangle), so memory stays at N x D floats for the vectors plus one tile (64 MB at 4096), never
N x N. Each tile's edges are reduced to their connected components (scipy) before they reach the union-find,
and rows already known to be in one component are collapsed (max over their cosines) before thresholding,
so a big duplicate cluster costs one dense tile, not a dense edge list in every tile it spans. The cost is
N^2 D / 2 multiply-adds: on the shared 2-core machine, 20,000 x 768 vectors take 4-5 s of one core (~25 ns
per pair), 40,000 take 17 s. A run decides through curation/post/decisions.py, which calls it over all
candidates up to `all_pairs_max` and, beyond, within k-means clusters (curation/post/near_dedup.py).

Floating point: cosines are compared in float32, so two clips within ~1e-6 of the threshold may link or
not depending on the tile layout; the reported `dup_similarity` is recomputed in float64.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from common.config import Config
from curation.post.thresholds import FunnelStep

log = logging.getLogger(__name__)

# Tiles with fewer rows or columns than this skip the component collapse (its bookkeeping costs more than
# it saves on small tiles).
COLLAPSE_MIN = 256

DUPLICATE_PREFIX = "duplicate: "


class DedupConfig(Config):
    """Recipe section `dedup`: which duplicates to drop and which clip of a group survives."""

    exact: bool = True
    """Drop clips whose `content_hash` equals another kept clip's (identical key frames and frame count)."""
    near: bool = True
    """Drop clips whose mean CLIP embedding is within `near_threshold` cosine of another kept clip's
    (re-encodes, crops of the same footage, near-static repeats). Needs the `clip_embedding` column."""
    near_threshold: float = 0.95
    """Cosine between clip vectors at or above which two clips are near duplicates. Higher is stricter:
    1.0 links only identical vectors; ~0.9 also links different shots of one scene."""
    keep: Literal["longest", "aesthetic", "first"] = "longest"
    """Which clip of a group survives: longest `duration_s`, highest `aesthetic` score (needs the aesthetic
    scores in the ledger), or the first by `clip_id`. Ties go to the smallest clip_id."""
    block_size: int = 4096
    """Rows (and columns) of one tile of the similarity product. Memory per tile is block_size^2 float32
    (64 MB at 4096); the flops do not depend on it. Smaller tiles cost more Python overhead."""
    all_pairs_max: int = 50_000
    """Up to this many candidate clips, every pair is compared in one task (50k pairs of 768-d vectors: ~30 s
    of one core); above, clips are clustered first (k-means) and compared within clusters."""
    cluster_size: int = 2_000
    """Target clips per k-means cluster (k = usable clips / cluster_size). Larger clusters find more pairs
    per assignment but cost quadratically more within each; smaller ones cost more centroids per clip."""
    assignments: int = 3
    """Nearest centroids each clip joins, so that duplicates on either side of a cluster border still meet.
    On structure-less random vectors 1 / 2 / 3 find 76 / 97.9 / 99.9% of pairs at cosine 0.98 (real
    embeddings cluster better); the within-cluster work grows with its square."""
    kmeans_sample: int = 100_000
    """Clip vectors the k-means is trained on (at least 40 per cluster), chosen by a hash of the clip id."""
    kmeans_iterations: int = 10
    """k-means iterations (faiss, spherical)."""
    seed: int = 0
    """k-means seed: the same ledger, recipe and seed give the same clusters and decisions."""

    @pydantic.field_validator("near_threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"dedup.near_threshold ({v}) is a cosine similarity and must lie in (0, 1]; "
                             "use e.g. 0.95, or set dedup.near=false to switch near-duplicate removal off")
        return v

    @pydantic.field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"dedup.block_size ({v}) is a number of rows and must be at least 1; "
                             "the default 4096 uses 64 MB per tile")
        return v

    @pydantic.field_validator("all_pairs_max", "cluster_size", "kmeans_sample", "kmeans_iterations")
    @classmethod
    def _positive(cls, v: int, info: pydantic.ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"dedup.{info.field_name} ({v}) must be at least 1; the default is "
                             f"{cls.model_fields[info.field_name].default}")
        return v

    @pydantic.field_validator("assignments")
    @classmethod
    def _assignments(cls, v: int) -> int:
        if not 1 <= v <= 8:
            raise ValueError(f"dedup.assignments ({v}) is how many nearest clusters each clip joins: use 1 to 8 "
                             "(default 3; 2 costs less and misses more pairs on cluster borders)")
        return v


def apply_dedup(clips: pd.DataFrame, config: DedupConfig) -> tuple[pd.DataFrame, list[FunnelStep]]:
    """Returns `clips` (same rows, same order) with duplicates dropped (keep=False, decision "duplicate: ...")
    and `dup_of` / `dup_similarity` columns, and the funnel steps "dedup exact" / "dedup near" (kept counts
    after each; a step whose option is off is omitted). Only clips with keep == True are considered."""
    if "keep" not in clips.columns or "decision" not in clips.columns:
        raise ValueError("apply_dedup needs the `keep` and `decision` columns: run "
                         "curation.post.thresholds.apply_thresholds on the clips first")
    out = clips.copy()
    keep = out["keep"].fillna(False).to_numpy(dtype=bool).copy()
    decision = out["decision"].to_numpy(dtype=object).copy()
    dup_of, dup_sim = _previous_duplicates(out, keep)
    funnel: list[FunnelStep] = []
    ids = out["clip_id"].astype(str).to_numpy(dtype=object)
    rank = _survivor_rank(out, keep, config.keep) if (config.exact or config.near) else None
    if config.exact:
        _exact(out, keep, rank, ids, decision, dup_of, dup_sim)
        funnel.append(FunnelStep("dedup exact", int(keep.sum())))
    if config.near:
        _near(out, keep, rank, ids, decision, dup_of, dup_sim, config)
        funnel.append(FunnelStep("dedup near", int(keep.sum())))
    out["keep"] = keep
    out["decision"] = decision
    if "reason_code" in out.columns or config.exact or config.near:
        code = out["reason_code"].to_numpy(dtype=object).copy() if "reason_code" in out.columns \
            else np.full(len(out), None, dtype=object)
        detail = out["reason_detail"].to_numpy(dtype=object).copy() if "reason_detail" in out.columns \
            else np.full(len(out), None, dtype=object)
        for kind in ("exact", "near"):
            hit = np.array([isinstance(d, str) and d.startswith(f"{DUPLICATE_PREFIX}{kind} ") for d in decision], bool)
            code[hit] = f"duplicate_{kind}"
            detail[hit] = decision[hit]
        out["reason_code"] = code
        out["reason_detail"] = detail
    out["dup_of"] = pd.Series(dup_of, index=out.index, dtype=object)
    out["dup_similarity"] = pd.Series(dup_sim, index=out.index, dtype=float)
    return out, funnel


def _previous_duplicates(clips: pd.DataFrame, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dup_of / dup_similarity start empty, except for clips already dropped as duplicates (a second
    apply_dedup on its own output keeps them); stale values from an earlier run on clips the thresholds
    now drop or keep are cleared."""
    n = len(clips)
    dup_of = np.full(n, None, dtype=object)
    dup_sim = np.full(n, np.nan)
    if "dup_of" in clips.columns:
        was_dup = ~keep & clips["decision"].astype(str).str.startswith(DUPLICATE_PREFIX).to_numpy()
        dup_of[was_dup] = clips["dup_of"].to_numpy(dtype=object)[was_dup]
        if "dup_similarity" in clips.columns:
            dup_sim[was_dup] = pd.to_numeric(clips["dup_similarity"], errors="coerce").to_numpy(dtype=float)[was_dup]
    return dup_of, dup_sim


def _survivor_rank(clips: pd.DataFrame, keep: np.ndarray, rule: str) -> np.ndarray:
    """rank[i] < rank[j] when clip i is preferred as a survivor; unique among kept clips."""
    ids = clips["clip_id"].astype(str).to_numpy(dtype=object)
    kept_ids = ids[keep]
    if len(set(kept_ids)) != len(kept_ids):
        dupes = sorted(pd.Series(kept_ids).loc[lambda s: s.duplicated()].unique())[:5]
        raise ValueError(f"clip_id is not unique among kept clips (e.g. {dupes}); dedup needs one row per "
                         "clip: pass each clip once")
    if rule == "first":
        score = np.zeros(len(clips))
    else:
        column = "duration_s" if rule == "longest" else "aesthetic"
        if column not in clips.columns:
            if rule == "aesthetic":
                raise ValueError("dedup.keep=aesthetic needs an `aesthetic` score column, which the ledger does "
                                 "not have: enable the aesthetic stage and re-score the run, or set "
                                 "dedup.keep to longest or first")
            raise ValueError("dedup.keep=longest needs the `duration_s` column; the clips do not have it: "
                             "pass the ledger's clips table, or set dedup.keep=first")
        score = pd.to_numeric(clips[column], errors="coerce").to_numpy(dtype=float)
        score = np.where(np.isnan(score), -np.inf, score)  # a clip without a score survives last
    order = np.lexsort((ids, -score))  # by score descending, then clip_id ascending
    rank = np.empty(len(clips), dtype=np.int64)
    rank[order] = np.arange(len(clips))
    return rank


def _exact(clips, keep, rank, ids, decision, dup_of, dup_sim) -> None:
    if "content_hash" not in clips.columns:
        raise ValueError("dedup.exact needs the `content_hash` column, which the ledger does not have: "
                         "re-run the curation with this version (it stores the hash), or set dedup.exact=false")
    hashes = clips["content_hash"].to_numpy(dtype=object)
    has = keep & np.array([isinstance(h, str) and h != "" for h in hashes], dtype=bool)
    idx = np.flatnonzero(has)
    if idx.size < 2:
        return
    frame = pd.DataFrame({"h": hashes[idx], "rank": rank[idx], "row": idx})
    best = frame.loc[frame.groupby("h", sort=False)["rank"].idxmin(), ["h", "row"]]
    survivor = frame["h"].map(dict(zip(best["h"], best["row"]))).to_numpy(dtype=np.int64)
    dropped = survivor != idx
    for row, surv in zip(idx[dropped], survivor[dropped]):
        keep[row] = False
        dup_of[row] = ids[surv]
        dup_sim[row] = 1.0
        decision[row] = f"{DUPLICATE_PREFIX}exact of {ids[surv]}"


def _near(clips, keep, rank, ids, decision, dup_of, dup_sim, config: DedupConfig) -> None:
    if "clip_embedding" not in clips.columns:
        raise ValueError("dedup.near needs the `clip_embedding` column, which the ledger does not have: enable "
                         "the clip stage and re-score the run, or set dedup.near=false")
    candidates = np.flatnonzero(keep)
    rows, vectors = clip_vectors(clips["clip_embedding"].to_numpy(dtype=object)[candidates])
    idx = candidates[rows]
    if candidates.size and idx.size == 0:
        log.warning("dedup.near: none of the %d kept clips has a clip_embedding (is the clip stage off?); "
                    "no near duplicates removed", candidates.size)
    if idx.size < 2:
        return
    labels = near_components(vectors, config.near_threshold, config.block_size)
    # survivor of each component: the member with the smallest rank
    order = np.lexsort((rank[idx], labels))
    first = np.ones(order.size, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best = np.empty(labels.max() + 1, dtype=np.int64)
    best[labels[order[first]]] = order[first]
    survivor = best[labels]  # positions in idx
    dropped = np.flatnonzero(survivor != np.arange(idx.size))
    if dropped.size == 0:
        return
    v64 = vectors.astype(np.float64)
    v64 /= np.linalg.norm(v64, axis=1, keepdims=True)
    cos = np.clip(np.einsum("ij,ij->i", v64[dropped], v64[survivor[dropped]]), -1.0, 1.0)
    for pos, c in zip(dropped, cos):
        row, surv = idx[pos], idx[survivor[pos]]
        keep[row] = False
        dup_of[row] = ids[surv]
        dup_sim[row] = float(c)
        decision[row] = f"{DUPLICATE_PREFIX}near {ids[surv]} cosine {c:.3f}"


def clip_vectors(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """(positions of usable embeddings, their clip vectors as an M x D float32 array, L2-normalised).

    An embedding is a K x D nested list / array (or a single D vector); the clip vector is the mean of its
    K rows, re-normalised. Missing, empty, non-finite or zero embeddings are skipped."""
    rows: list[int] = []
    means: list[np.ndarray] = []
    for i, e in enumerate(embeddings):
        if e is None or (isinstance(e, float) and np.isnan(e)):
            continue
        try:
            if isinstance(e, np.ndarray) and e.dtype == object:  # read back from parquet: arrays of arrays
                e = [np.asarray(f, dtype=np.float32) for f in e]
                a = np.stack(e) if e else np.zeros((0, 0), dtype=np.float32)
            else:
                a = np.asarray(e, dtype=np.float32)
            if a.ndim == 1:
                a = a[None, :]
        except (TypeError, ValueError) as err:
            raise ValueError(f"clip_embedding of row {i} is not a K x D array of floats ({err}); the clip "
                             "stage writes one list of D floats per key frame") from None
        if a.ndim != 2 or a.size == 0:
            continue
        rows.append(i)
        means.append(a.mean(axis=0, dtype=np.float64))
    if not means:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    dims = {m.shape[0] for m in means}
    if len(dims) > 1:
        raise ValueError(f"clip_embedding vectors have different sizes {sorted(dims)}: the clips were embedded "
                         "by different CLIP models; re-run the clip stage with one model for the whole run")
    return _normalised(np.asarray(rows, dtype=np.int64), np.stack(means))


def embedding_vectors(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """`clip_vectors` of a parquet `clip_embedding` column (list<list<float32>>), without a Python object per
    clip when every embedding has the same K x D (the case of one CLIP model); same values as clip_vectors."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    present = np.flatnonzero(~np.isnan(lengths.astype(np.float64)) & (np.nan_to_num(lengths) > 0))
    frames = pc.list_flatten(arr.take(pa.array(present))) if present.size else None
    if frames is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    k, dims = np.unique(lengths[present]), np.unique(pc.list_value_length(frames).to_numpy(zero_copy_only=False))
    if len(k) != 1 or len(dims) != 1 or frames.null_count or pc.list_flatten(frames).null_count:
        return clip_vectors(arr.to_numpy(zero_copy_only=False))
    values = pc.list_flatten(frames).to_numpy().reshape(present.size, int(k[0]), int(dims[0]))
    return _normalised(present.astype(np.int64), values.mean(axis=1, dtype=np.float64))


def _normalised(rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose mean is finite and non-zero, and their means L2-normalised as float32."""
    norms = np.sqrt(np.einsum("ij,ij->i", means, means))
    ok = np.isfinite(norms) & (norms > 0)
    return rows[ok], (means[ok] / norms[ok, None]).astype(np.float32)


def near_components(vectors: np.ndarray, threshold: float, block_size: int) -> np.ndarray:
    """Connected-component labels (0..C-1, ordered by first member) of the graph linking rows of the
    L2-normalised `vectors` whose cosine is >= `threshold`, computed over block_size x block_size tiles."""
    n = vectors.shape[0]
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    parent = np.arange(n, dtype=np.int64)
    thr = np.float32(threshold)
    for i0 in range(0, n, block_size):
        for j0 in range(i0, n, block_size):
            r, c = _tile_edges(v, parent, slice(i0, min(i0 + block_size, n)), slice(j0, min(j0 + block_size, n)), thr)
            if r.size:
                _merge_tile(parent, r, c)
    # a union makes the smaller root the parent, so every root is its component's smallest row and the
    # labels are numbered by first member whatever order the edges came in
    _, labels = np.unique(_roots(parent, np.arange(n)), return_inverse=True)
    return labels


def _tile_edges(v: np.ndarray, parent: np.ndarray, rows: slice, cols: slice,
                thr: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The edges of one tile as global (row, col) node ids. Rows (columns) already in one component are
    collapsed to that component's root by a max over their cosines, so a big duplicate cluster yields a
    dense edge set only in the first tile that sees it, not in every tile it spans."""
    row_nodes, a = _collapse(v, parent, rows)
    col_nodes, b = _collapse(v, parent, cols)
    sims = (v[rows] if a is None else a[0]) @ (v[cols] if b is None else b[0]).T
    if a is not None:
        sims = np.maximum.reduceat(sims, a[1], axis=0)
    if b is not None:
        sims = np.maximum.reduceat(sims, b[1], axis=1)
    diagonal = rows == cols and a is None and b is None
    if diagonal:
        np.fill_diagonal(sims, -np.inf)  # a clip with itself is no edge
    hit = np.flatnonzero(sims.max(axis=1) >= thr)  # most rows have no neighbour: search only the others
    r, c = np.nonzero(sims[hit] >= thr)
    r = hit[r]
    if diagonal:  # each pair once
        upper = c > r
        r, c = r[upper], c[upper]
    if a is None:
        r = r + rows.start
    else:
        r = row_nodes[r]
    return r, (c + cols.start if b is None else col_nodes[c])


def _collapse(v: np.ndarray, parent: np.ndarray, span: slice) -> tuple[np.ndarray | None, Any]:
    """(None, None) when the rows of `span` are few or mostly in distinct components; otherwise (their
    component roots, (their vectors sorted by root, the start of each root's run)) for a max-reduction
    over each run."""
    if span.stop - span.start < COLLAPSE_MIN:
        return None, None
    ids = np.arange(span.start, span.stop)
    roots = _roots(parent, ids)
    unique, inverse = np.unique(roots, return_inverse=True)
    if unique.size > ids.size // 2:
        return None, None
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(unique.size))
    return unique, (v[ids[order]], starts)


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        nr = parent[r]
        if np.array_equal(nr, r):
            break
        r = nr
    parent[x] = r  # path compression for the queried nodes
    return r


def _merge_tile(parent: np.ndarray, r: np.ndarray, c: np.ndarray) -> None:
    """Union the edges (r, c) into `parent`: the tile's own components first (vectorised), then one union
    per distinct pair of global roots that still differ."""
    nodes, inv = np.unique(np.concatenate([r, c]), return_inverse=True)
    m = nodes.size
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (inv[: r.size], inv[r.size:])), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    # link every node to its tile component's first node, then only global roots that differ
    _, head = np.unique(comp, return_index=True)
    a = _roots(parent, nodes)
    b = _roots(parent, nodes[head[comp]])
    pairs = np.unique(np.stack([a, b], axis=1)[a != b], axis=0)
    for x, y in pairs:
        rx, ry = _find(parent, int(x)), _find(parent, int(y))
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = int(parent[root])
    while parent[x] != root:
        parent[x], x = root, int(parent[x])
    return root
