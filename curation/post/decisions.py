"""Deciding a run: thresholds and dedup over the stored scores, written as `decisions/` beside the ledger.

No frame is decoded and no step holds the ledger in one place:

1. aggregates (a DuckDB query in one task): the percentiles the rules need, exact (DuckDB's
   `quantile_cont` is numpy's linear percentile), over the score column of the usable clips only;
   whether the scores are comparable (one OCR engine, one CLIP model);
2. per clips file (a task each): the rules in recipe order -> keep / decision / reason code / pass_<score>;
   the clips still kept become dedup candidates (hash and rank key; clip vector), written for step 3;
3. exact duplicates: the candidates are written hash-partitioned by `content_hash` (`.decide/exact_in/hpart=H/`),
   and a DuckDB window per partition (a task each) picks each hash's survivor (`.decide/exact/`, partitioned by
   bucket); near duplicates: curation/post/near_dedup.py over the candidates' clip vectors (`.decide/vectors/`):
   all pairs up to `dedup.all_pairs_max` candidates, else k-means clusters (cached in `RUN/clusters/`, trained
   on `.decide/sample/`) searched in parallel tasks (`.decide/near/`, partitioned by bucket);
4. per clips file again: the duplicates of its bucket applied, the file's decisions written; the new
   decisions folder replaces the old one in one rename, so readers see the old or the new decisions.

Tasks run on Ray when it is initialised (curation/tasks.py: the curate run, `--rethreshold`), else in
this process. The in-memory `thresholds.apply_thresholds` + `dedup.apply_dedup` are the reference this
reproduces (tests compare the two).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from curation.config import CurationConfig
from curation.post import near_dedup
from curation.post.dedup import embedding_vectors
from curation.tasks import call_task, map_tasks
from curation.ledger import CLIP_SCHEMA, DECISION_SCHEMA, Ledger, atomic_parquet, atomic_text
from curation.post.thresholds import Bound, Threshold, _check_comparable, check_names, decide_block, percentile_points, resolve_bounds

SUMMARY = "_summary.json"
EXACT_ROWS_PER_TASK = 2_000_000
"""Clips per exact-dedup partition (one DuckDB window each; DuckDB spills beyond its memory limit)."""


@dataclass
class Decided:
    funnel: list[dict]
    reasons: dict[str, int]                                   # "video failed: decode_timeout" -> count
    changes: list[str] = field(default_factory=list)          # what a re-decision changed, one line per rule


def decide(config: CurationConfig, ledger: Ledger) -> Decided:
    call_task(_recover, str(ledger.run_dir))  # a DuckDB pass over every video id: in a task, not here
    files = ledger.clip_files()
    if not files:
        raise FileNotFoundError(f"no ledger in {ledger.run_dir}: run `lvd curate` with output={ledger.run_dir} first")
    thresholds, dedup = config.thresholds, config.dedup
    float_scores = [f.name for f in CLIP_SCHEMA if pa.types.is_floating(f.type)]
    check_names(thresholds, float_scores, CLIP_SCHEMA.names)
    stats = call_task(_aggregates, str(ledger.run_dir), {n: percentile_points(r) for n, r in thresholds.items()},
                      list(thresholds))
    bounds = {name: resolve_bounds(rule, {float(p): v for p, v in stats["percentiles"][name].items()})
              for name, rule in thresholds.items()}
    work = ledger.run_dir / ".decide"
    shutil.rmtree(work, ignore_errors=True)
    clusters = ledger.run_dir / "clusters"
    print_ = near_dedup.fingerprint(dedup, [f.name for f in files], stats["embedded"])
    sample = None
    if dedup.near and stats["embedded"] > dedup.all_pairs_max and not near_dedup.cached_clustering(clusters, print_):
        sample = near_dedup.sample_fraction(dedup, stats["embedded"])
    plan = {"exact": dedup.exact, "near": dedup.near, "keep": dedup.keep, "sample": sample,
            "hash_parts": max(1, math.ceil(stats["clips"] / EXACT_ROWS_PER_TASK))}
    first = map_tasks(_decide_file, [(str(ledger.run_dir), str(f), bounds, plan, str(work)) for f in files])
    steps = Counter()
    for counts in first:
        steps.update(counts)
    funnel = [{"step": "input videos", "count": stats["videos"]},
              {"step": "videos decoded", "count": stats["decoded"]},
              {"step": "clips", "count": stats["clips"]},
              {"step": "usable clips", "count": steps["usable clips"]},
              *({"step": name, "count": steps[name]} for name in thresholds)]
    kept = funnel[-1]["count"]
    if dedup.exact:
        parts = sorted(str(p) for p in (work / "exact_in").glob("hpart=*"))
        exact = sum(map_tasks(_exact_duplicates, [(p, str(work / "exact")) for p in parts]))
        kept -= exact
        funnel.append({"step": "dedup exact", "count": kept})
    near_path = None
    if dedup.near:
        found = near_dedup.search(
            work / "near", sorted(str(p) for p in (work / "vectors").glob("*.parquet")),
            steps["vectors"] - (exact if dedup.exact else 0), dedup, exact_dir=work / "exact",
            clusters_dir=clusters, sample_files=sorted(str(p) for p in (work / "sample").glob("*.parquet")),
            print_=print_, num_vectors=stats["embedded"])
        kept -= found.dropped
        near_path = found.funnel_path()
        step = {"step": "dedup near", "count": kept, "path": near_path}
        if not stats["embedded"] and not config.clip.enabled:  # nothing to compare: say why, not "0 pairs"
            step = {"step": "dedup near", "count": kept,
                    "off": "off in this recipe: the clip stage is off, no embeddings to compare"}
        funnel.append(step)
    second = map_tasks(_apply_duplicates, [(str(ledger.run_dir), str(f), str(work)) for f in files])
    changes = _changes(ledger, thresholds, second, kept)
    _swap(ledger, work, {
        "thresholds": {n: r.model_dump(mode="json") for n, r in thresholds.items()},
        "dedup": dedup.model_dump(mode="json"),
        "bounds": {n: [b.__dict__ for b in bs] for n, bs in bounds.items()},
        "funnel": funnel,
        "near_search": near_path,
        "decided": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    atomic_text(ledger.run_dir / "funnel.json", json.dumps(funnel, indent=2))
    reasons = call_task(_reason_counts, str(ledger.run_dir))
    return Decided(funnel, reasons, changes)


# -- tasks -------------------------------------------------------------------------------------------------
def _recover(run_dir: str) -> None:
    ledger = Ledger(run_dir)
    ledger.recover()
    ledger.drop_duplicate_videos()


def _aggregates(run_dir: str, points: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """Counts, percentiles and the comparability checks, in one DuckDB pass per query."""
    import duckdb
    import pandas as pd

    ledger = Ledger(run_dir)
    clips, videos = _glob(ledger.clips_dir), _glob(ledger.videos_dir)
    with duckdb.connect() as db:
        db.execute("SET threads TO 2")
        n_videos, decoded = db.execute(f"SELECT count(*), count(*) FILTER (WHERE status IN ('ok', 'no_clips')) "
                                       f"FROM read_parquet({videos!r})").fetchone() if videos else (0, 0)
        n_clips, embedded = db.execute(
            f"SELECT count(*), count(*) FILTER (WHERE status = 'ok' AND len(clip_embedding) > 0) "
            f"FROM read_parquet({clips!r})").fetchone() if clips else (0, 0)
        percentiles: dict[str, dict[float, float | None]] = {}
        for name in names:
            pts = points.get(name) or []
            if not pts:
                percentiles[name] = {}
                continue
            q = ", ".join(f"quantile_cont({name}, {p / 100!r})" for p in pts)
            row = db.execute(f"SELECT {q} FROM read_parquet({clips!r}) WHERE status = 'ok' AND {name} IS NOT NULL "
                             f"AND NOT isnan({name}::DOUBLE)").fetchone()
            percentiles[name] = {p: (None if v is None else float(v)) for p, v in zip(pts, row)}
        distinct = {}
        for col in ("text_engine", "clip_model"):
            distinct[col] = [r[0] for r in db.execute(
                f"SELECT DISTINCT {col} FROM read_parquet({clips!r}) WHERE status = 'ok' AND {col} IS NOT NULL "
                f"AND {col} <> ''").fetchall()]
    # the same check as the in-memory reference, on the distinct values only
    probe = pd.DataFrame({"status": "ok", "text_engine": pd.Series(distinct["text_engine"] or [None]),
                          "clip_model": pd.Series(distinct["clip_model"] or [None])})
    _check_comparable(probe, {n: Threshold(min=0) for n in names})
    return {"videos": int(n_videos), "decoded": int(decoded), "clips": int(n_clips), "embedded": int(embedded),
            "percentiles": percentiles}


def _decide_file(run_dir: str, clips_file: str, bounds: dict[str, list[Bound]], plan: dict[str, Any],
                 work: str) -> dict[str, int]:
    """Thresholds for one clips file -> its first-pass decisions, and its dedup inputs: the kept clips with a
    hash (hash-partitioned), the kept clips' vectors, and (when the clustering is to be trained) the sampled
    usable clips' vectors."""
    path = Path(clips_file)
    rank_column = {"longest": "duration_s", "aesthetic": "aesthetic"}.get(plan["keep"])
    wanted = ["clip_id", "video_id", "status", "reason", "reason_code", "reason_detail", *bounds]
    wanted += [c for c, on in (("content_hash", plan["exact"]), (rank_column, rank_column and (plan["exact"] or plan["near"])),
                               ("clip_embedding", plan["near"])) if on]
    columns = list(dict.fromkeys(wanted))
    table = pq.read_table(path, columns=columns, schema=CLIP_SCHEMA)
    frame = table.select([c for c in columns if c != "clip_embedding"]).to_pandas()
    decided, steps = decide_block(frame, bounds)
    out = Path(work)
    atomic_parquet(out / "thresholds" / path.parent.name / path.name, _decision_table(decided, list(bounds)))
    counts = {s.name: s.count for s in steps}
    keep = decided["keep"].to_numpy(dtype=bool)
    bucket = int(path.parent.name.split("=")[1])
    rank = frame[rank_column].to_numpy(dtype=np.float64) if rank_column else np.zeros(len(frame))
    ids = table.column("clip_id").combine_chunks()
    if plan["exact"]:
        _write_hash_parts(out / "exact_in", path.name, ids, table.column("content_hash").to_pylist(), rank, bucket,
                          keep, plan["hash_parts"])
    if plan["near"]:
        usable = (frame["status"] == "ok").to_numpy()
        rows, vectors = embedding_vectors(table.column("clip_embedding").filter(pa.array(usable if plan["sample"] else keep)))
        rows = np.flatnonzero(usable if plan["sample"] else keep)[rows]
        kept = keep[rows]
        counts["vectors"] = int(kept.sum())
        if kept.any():
            atomic_parquet(out / "vectors" / path.name,
                           near_dedup.vector_table(ids.take(pa.array(rows[kept])), rank[rows[kept]], bucket, vectors[kept]))
        if plan["sample"]:
            chosen = near_dedup.in_sample(ids.take(pa.array(rows)), plan["sample"])
            if chosen.any():
                atomic_parquet(out / "sample" / path.name,
                               near_dedup.vector_table(ids.take(pa.array(rows[chosen])), rank[rows[chosen]], bucket,
                                                       vectors[chosen]).select(["clip_id", "vector"]))
    return counts


def _write_hash_parts(folder: Path, name: str, ids: pa.Array, hashes: list, rank: np.ndarray, bucket: int,
                      keep: np.ndarray, parts: int) -> None:
    """The kept clips with a content hash, in `parts` partitions by a stable hash of it (crc32), so that
    every copy of a hash lands in one partition whichever file it is in."""
    has = keep & np.array([isinstance(h, str) and h != "" for h in hashes], dtype=bool)
    rows = np.flatnonzero(has)
    if rows.size == 0:
        return
    part = np.array([zlib.crc32(hashes[r].encode()) % parts for r in rows], dtype=np.int64)
    table = pa.table({"clip_id": ids.take(pa.array(rows)), "content_hash": pa.array([hashes[r] for r in rows], pa.string()),
                      "rank_key": pa.array(rank[rows], pa.float64(), mask=np.isnan(rank[rows])),
                      "bucket": pa.array(np.full(rows.size, bucket, np.int32))})
    for p in np.unique(part):
        atomic_parquet(folder / f"hpart={p:05d}" / name, table.filter(pa.array(part == p)))


def _exact_duplicates(part_dir: str, out: str) -> int:
    """Kept clips with one content hash (all in this hash partition): all but the best-ranked become duplicates
    of it. DuckDB sorts and spills; the result is written partitioned by bucket. Returns how many were dropped."""
    import duckdb

    files = sorted(str(p) for p in Path(part_dir).glob("*.parquet"))
    if not files:
        return 0
    with duckdb.connect() as db:
        db.execute("SET threads TO 1")
        written = db.execute(f"""COPY (SELECT clip_id, dup_of, 1.0::DOUBLE AS dup_similarity, bucket FROM (
                SELECT clip_id, bucket, first_value(clip_id) OVER (PARTITION BY content_hash
                    ORDER BY rank_key DESC NULLS LAST, clip_id) AS dup_of
                FROM read_parquet({files!r})) WHERE dup_of <> clip_id)
            TO '{out}' (FORMAT parquet, PARTITION_BY (bucket), OVERWRITE_OR_IGNORE true,
                        FILENAME_PATTERN '{Path(part_dir).name}_{{i}}')""").fetchone()
        return int(written[0]) if written else 0


def _apply_duplicates(run_dir: str, clips_file: str, work: str) -> dict[str, Any]:
    """One file's first-pass decisions with its bucket's duplicates applied; returns what changed against the
    decisions it replaces."""
    path = Path(clips_file)
    ledger = Ledger(run_dir)
    table = pq.read_table(Path(work, "thresholds", path.parent.name, path.name))
    bucket = int(path.parent.name.split("=")[1])
    ids = table.column("clip_id")
    keep = table.column("keep").to_numpy(zero_copy_only=False).copy()
    decision = table.column("decision").to_pylist()
    code, detail = table.column("reason_code").to_pylist(), table.column("reason_detail").to_pylist()
    dup_of, dup_sim = [None] * len(ids), [None] * len(ids)
    for kind in ("exact", "near"):
        dups = _bucket_dups(Path(work, kind, f"bucket={bucket}"))
        if dups is None:
            continue
        where = pc.index_in(ids, dups.column("clip_id")).to_pylist()
        of, sim = dups.column("dup_of").to_pylist(), dups.column("dup_similarity").to_pylist()
        texts = dups.column("decision").to_pylist() if "decision" in dups.column_names else None
        for i, j in enumerate(where):
            if j is None or not keep[i]:
                continue
            keep[i] = False
            dup_of[i], dup_sim[i] = of[j], sim[j]
            decision[i] = texts[j] if texts else f"duplicate: exact of {of[j]}"
            code[i], detail[i] = f"duplicate_{kind}", decision[i]
    for name, values in (("keep", pa.array(keep)), ("decision", pa.array(decision, pa.string())),
                         ("reason_code", pa.array(code, pa.string())), ("reason_detail", pa.array(detail, pa.string())),
                         ("dup_of", pa.array(dup_of, pa.string())), ("dup_similarity", pa.array(dup_sim, pa.float64()))):
        table = table.set_column(table.schema.get_field_index(name), name, values)
    atomic_parquet(Path(work, "final", path.parent.name, path.name), table)
    return _compare(ledger.decision_file(path), table)


def _reason_counts(run_dir: str) -> dict[str, int]:
    """Why videos failed and clips were not kept, grouped by reason code (most frequent first)."""
    import duckdb

    ledger = Ledger(run_dir)
    videos, decisions = _glob(ledger.videos_dir), _glob(ledger.decisions_dir)
    counts: Counter = Counter()
    with duckdb.connect() as db:
        if videos:
            for status, code, n in db.execute(
                    f"SELECT status, reason_code, count(*) FROM read_parquet({videos!r}) WHERE reason_code IS NOT NULL "
                    "AND status <> 'ok' GROUP BY ALL").fetchall():
                counts[f"video {status}: {code}"] += n
        if decisions:
            for code, n in db.execute(f"SELECT reason_code, count(*) FROM read_parquet({decisions!r}, union_by_name=true) "
                                      "WHERE NOT keep GROUP BY ALL").fetchall():
                counts[f"clip {code}"] += n
    return dict(counts.most_common())


# -- helpers -----------------------------------------------------------------------------------------------
def _decision_table(frame, rules: list[str]) -> pa.Table:
    cols = {f.name: pa.array(frame[f.name] if f.name in frame.columns else [None] * len(frame), f.type,
                             from_pandas=True) for f in DECISION_SCHEMA}
    cols.update({f"pass_{r}": pa.array(frame[f"pass_{r}"].to_numpy(dtype=bool)) for r in rules})
    return pa.table(cols)


def _bucket_dups(folder: Path) -> pa.Table | None:
    """The duplicates one bucket's files drop (exact or near), or None."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    table = pads.dataset([str(f) for f in files], format="parquet").to_table()
    return table if table.num_rows else None


def _compare(old_path: Path, new: pa.Table) -> dict[str, Any]:
    """Counts for the re-decision message: clips each rule now drops that it passed before (and back)."""
    out: dict[str, Any] = {"kept_before": None, "more": {}, "fewer": {}}
    if not old_path.is_file():
        return out
    old = pq.read_table(old_path)
    if old.num_rows != new.num_rows or "keep" not in old.column_names:
        return out
    out["kept_before"] = int(pc.sum(old.column("keep")).as_py() or 0)
    for name in new.column_names:
        if not name.startswith("pass_"):
            continue
        now = new.column(name).to_numpy(zero_copy_only=False)
        was = old.column(name).to_numpy(zero_copy_only=False) if name in old.column_names else np.ones_like(now)
        out["more"][name[5:]] = int((was & ~now).sum())
        out["fewer"][name[5:]] = int((~was & now).sum())
    return out


def _changes(ledger: Ledger, thresholds: dict[str, Threshold], compared: list[dict], kept: int) -> list[str]:
    """"text_area.max 0.07 -> 0.03: 7 more clips dropped, 19 kept", for the rules that changed since the last
    decision pass (none on a first pass)."""
    summary = ledger.decisions_dir / SUMMARY
    if not summary.is_file() or any(c["kept_before"] is None for c in compared):
        return []
    before = json.loads(summary.read_text()).get("thresholds", {})
    lines = []
    for name in sorted(set(before) | set(thresholds)):
        old = before.get(name, {})
        new = thresholds[name].model_dump(mode="json") if name in thresholds else {}
        changed = [f"{name}.{k} {old.get(k)} -> {new.get(k)}" for k in ("min", "max", "drop_bottom_pct", "drop_top_pct")
                   if old.get(k) != new.get(k)]
        if not changed:
            continue
        more = sum(c["more"].get(name, 0) for c in compared)
        fewer = sum(c["fewer"].get(name, 0) for c in compared)
        effect = [f"{more} more clips dropped"] if more or not fewer else []
        effect += [f"{fewer} fewer dropped"] if fewer else []
        lines.append(f"{', '.join(changed)}: {', '.join(effect)}, {kept} kept")
    return lines


def _swap(ledger: Ledger, work: Path, summary: dict[str, Any]) -> None:
    final = work / "final"
    final.mkdir(parents=True, exist_ok=True)
    atomic_text(final / SUMMARY, json.dumps(summary, indent=2))
    old = work / "old"
    if ledger.decisions_dir.exists():
        ledger.decisions_dir.rename(old)
    final.rename(ledger.decisions_dir)
    shutil.rmtree(work, ignore_errors=True)


def _glob(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("bucket=*/*.parquet"))
