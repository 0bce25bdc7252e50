"""`lvd bench dedup`: near-duplicate search on synthetic clip vectors with planted duplicates.

Writes N random unit vectors (the worst case for clustering: no structure) in the candidate layout the
decision pass writes (files of 65,536 rows, the k-means sample beside them), with about 10% of the clips
planted as near duplicates: groups of 2-5 clips, each a perturbed copy of the group's first clip (cosine
0.97-0.999 to it). Then, on a local Ray with every core, the near-duplicate search `lvd curate` runs
(clustered above `dedup.all_pairs_max`), timed with the peak RSS of the whole process tree (driver and Ray
workers). Printed: wall time, peak RSS, recall (planted pairs whose clips end in one duplicate group), and,
on a subsample of 50,000 clips (whole planted groups), the agreement of the clustered path's decisions with
the exact all-pairs path's (same kept clips, same survivors). Goal on a 2-core machine: 1M x 768 in under
10 minutes, peak RSS under 8 GiB, recall >= 0.99, agreement 1.0.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from curation.post.dedup import DedupConfig
from curation.ledger import atomic_parquet
from curation.post.near_dedup import in_sample, sample_fraction, search, vector_table

ROWS_PER_FILE = 65_536
SUBSAMPLE = 50_000


def planted(n: int, dim: int, seed: int = 0, dup_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim unit vectors, group label per clip): clips of one label (2-5 of them) are near duplicates of
    the label's first clip; every other clip has its own label."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    group = np.arange(n, dtype=np.int64)
    pos = 0
    target = int(n * dup_fraction)
    planted_rows = 0
    while planted_rows < target and pos < n - 5:
        size = int(rng.integers(2, 6))
        base = pos
        eps = rng.uniform(0.05, 0.25, size - 1).astype(np.float32)
        # the copies: the base plus noise of norm ~eps (cosine ~1 / sqrt(1 + eps^2) to it, after normalising)
        base_unit = vectors[base] / np.linalg.norm(vectors[base])
        noise = rng.standard_normal((size - 1, dim), dtype=np.float32) * (eps[:, None] / np.sqrt(dim))
        vectors[base + 1: base + size] = base_unit + noise
        group[base: base + size] = base
        planted_rows += size - 1
        pos += size + int(rng.integers(0, int(2 / dup_fraction)))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(n)  # spread the groups over the files
    return vectors[order], group[order]


def write_candidates(folder: Path, vectors: np.ndarray, ids: list[str], rank: np.ndarray, fraction: float,
                     rows_per_file: int = ROWS_PER_FILE) -> tuple[list[str], list[str]]:
    """Vector files and k-means sample files, as the decision pass writes them."""
    files, samples = [], []
    for i, a in enumerate(range(0, len(ids), rows_per_file)):
        b = min(a + rows_per_file, len(ids))
        table = vector_table(pa.array(ids[a:b]), rank[a:b], i % 8, vectors[a:b])
        files.append(str(folder / "vectors" / f"f{i:05d}.parquet"))
        atomic_parquet(Path(files[-1]), table)
        chosen = in_sample(table.column("clip_id"), fraction)
        if chosen.any():
            samples.append(str(folder / "sample" / f"f{i:05d}.parquet"))
            atomic_parquet(Path(samples[-1]), table.filter(pa.array(chosen)).select(["clip_id", "vector"]))
    return files, samples


def decisions(work: Path) -> dict[str, tuple[str, float]]:
    """clip_id -> (dup_of, dup_similarity) of the dropped clips."""
    files = sorted(str(p) for p in work.glob("bucket=*/*.parquet"))
    if not files:
        return {}
    t = pads.dataset(files, format="parquet").to_table(columns=["clip_id", "dup_of", "dup_similarity"])
    return dict(zip(t.column("clip_id").to_pylist(), zip(t.column("dup_of").to_pylist(),
                                                         t.column("dup_similarity").to_pylist())))


def recall(ids: list[str], group: np.ndarray, dropped: dict[str, tuple[str, float]]) -> tuple[float, int]:
    """Share of planted pairs (each clip of a planted group with the group's first clip) whose two clips end in
    one duplicate group (the same survivor); and the number of pairs."""
    root = {c: of for c, (of, _) in dropped.items()}
    first = _first_of_group(group)
    counts = np.bincount(group, minlength=group.max() + 1)
    members = np.flatnonzero((counts[group] > 1) & (np.arange(len(group)) != first[group]))
    found = sum(root.get(ids[i], ids[i]) == root.get(ids[first[group[i]]], ids[first[group[i]]]) for i in members)
    return (found / len(members) if len(members) else 1.0), len(members)


def _first_of_group(group: np.ndarray) -> np.ndarray:
    """Position of the first clip of each label."""
    first = np.full(group.max() + 1, -1, dtype=np.int64)
    order = np.argsort(group, kind="stable")
    g = group[order]
    head = np.r_[True, g[1:] != g[:-1]]
    first[g[head]] = order[head]
    return first


def run_search(folder: Path, files: list[str], samples: list[str], n: int, config: DedupConfig) -> tuple[Any, float]:
    t0 = time.monotonic()
    found = search(folder / "near", files, n, config, clusters_dir=folder / "clusters", sample_files=samples,
                   print_="bench", num_vectors=n)
    return found, time.monotonic() - t0


def run_bench(clips: int, dim: int, json_path: str | None, work_dir: str | None = None, say=print) -> dict[str, Any]:
    from common.local_ray import local_ray
    from curation.bench.curate import PeakMemory

    config = DedupConfig()
    with tempfile.TemporaryDirectory(prefix="lvd-bench-dedup-", dir=work_dir) as tmp:
        root = Path(tmp)
        say(f"writing {clips} x {dim} synthetic clip vectors with planted near duplicates ...")
        t0 = time.monotonic()
        vectors, group = planted(clips, dim)
        ids = [f"c{i:09d}" for i in range(clips)]
        rank = np.random.default_rng(1).choice([2.0, 3.0, 4.0, 5.0], clips)
        files, samples = write_candidates(root / "full", vectors, ids, rank, sample_fraction(config, clips))
        sub = np.flatnonzero(in_sample(pa.array([f"g{g}" for g in group]), SUBSAMPLE / clips))
        sub_files, sub_samples = write_candidates(root / "sub", vectors[sub], [ids[i] for i in sub], rank[sub],
                                                  sample_fraction(config, len(sub)))
        del vectors
        say(f"  {time.monotonic() - t0:.1f} s")
        with local_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR"):
            with PeakMemory() as peak:
                found, wall = run_search(root / "full", files, samples, clips, config)
            say(f"search: {found.funnel_path()}: {found.dropped} dropped in {wall:.1f} s, peak RSS {peak.peak_mb:.0f} MB")
            got_recall, pairs = recall(ids, group, decisions(root / "full" / "near"))
            say(f"recall of the {pairs} planted pairs: {got_recall:.4f}")
            sub_config = config.model_copy(update={"all_pairs_max": 1})
            clustered, sub_clustered_s = run_search(root / "sub", sub_files, sub_samples, len(sub), sub_config)
            want_clustered = decisions(root / "sub" / "near")
            shutil.rmtree(root / "sub" / "near")
            exact, sub_exact_s = run_search(root / "sub", sub_files, [], len(sub),
                                            config.model_copy(update={"all_pairs_max": len(sub)}))
            want_exact = decisions(root / "sub" / "near")
    sub_ids = [ids[i] for i in sub]
    agree = sum(_same(want_clustered.get(c), want_exact.get(c)) for c in sub_ids) / max(len(sub_ids), 1)
    say(f"agreement with the exact all-pairs path on {len(sub_ids)} clips: {agree:.6f} "
        f"(clustered {sub_clustered_s:.1f} s, all pairs {sub_exact_s:.1f} s)")
    result = {"clips": clips, "dim": dim, "wall_s": round(wall, 2), "peak_rss_mb": round(peak.peak_mb, 1),
              "recall": round(got_recall, 6), "planted_pairs": pairs, "dropped": found.dropped, "path": found.funnel_path(),
              "agreement_50k": round(agree, 6), "subsample_clips": len(sub_ids),
              "subsample_clustered_s": round(sub_clustered_s, 2), "subsample_all_pairs_s": round(sub_exact_s, 2)}
    goals = {"wall_s<600": wall < 600, "peak_rss<8GiB": peak.peak_mb < 8192, "recall>=0.99": got_recall >= 0.99,
             "agreement==1": agree == 1.0}
    result["goals_met"] = goals
    say("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _same(a: tuple[str, float] | None, b: tuple[str, float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and abs(a[1] - b[1]) < 1e-9
