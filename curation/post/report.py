"""The curation report: one static, self-contained HTML page per run, to read and to mail around.

    lvd report runs/cur1                # -> runs/cur1/report.html

What the page shows, all read from the run folder (nothing is decoded or scored again):

1. the funnel (funnel.json) as horizontal bars, as in SVD's data-curation figure: video steps as a
   share of the input videos, clip steps as a share of all clips;
2. a histogram of every score column (see `score_columns`), kept and not-kept clips stacked, with the
   thresholds drawn as lines where the last decision pass put them (decisions/_summary.json; a run
   without it: config.yaml's rules, a percentile resolved over the usable clips as the decisions do);
   a score without values whose stage the recipe turned off is listed as "off in this recipe" instead,
   as is a funnel step that had nothing to work on (near dedup without clip embeddings);
3. a contact sheet: kept clips, then not-kept clips grouped by reason code (decisions' `reason_code`),
   each with its thumbnail strip (first | middle | last key frame), scores, captions and decision; at
   most `max_clips` clips per side, picked deterministically and spread over videos and reasons;
4. the videos that were not decoded (the first MAX_FAILED_VIDEOS), the resolved recipe (config.yaml,
   verbatim) and run.json's basics.

Nothing here holds the ledger in memory, so the report of a cluster-scale run costs what a small one
does: counts and histograms are summed file by file (`Ledger.iter_clips`, one clips file and its
decisions at a time, two passes: ranges, then bin counts); percentiles, the contact-sheet sample and the
failed videos are DuckDB aggregates (which spill to disk past DUCKDB_MEMORY); of the sampled clips only
their own rows are read (the row groups that hold them).

The file has no external references: CSS is inline, thumbnails are data: URIs, and the few lines of
JavaScript (filter buttons) are optional, the page renders fully without them. Every string from the
ledger (captions, file names, reasons) is HTML-escaped: they come from untrusted inputs.

DOM hooks (stable, used by the tests): `.funnel-step[data-step]` (`.off` when off in the recipe) with
`.funnel-count[data-step][data-count]`; `.off-scores[data-off]` (the scores of stages turned off);
`.stat[data-stat]` (videos, clips, usable, kept, from the ledger); `figure.histogram[data-column]` holding
`rect.bar.kept|.bar.dropped[data-count]` and `line.threshold[data-column][data-kind][data-value]`;
`.clip-group[data-group][data-total][data-shown]` ("kept", or a reason code) holding
`.clip-card[data-clip-id][data-keep]`, each with `img.thumb` or `.thumb.placeholder`, `.caption` and
`.decision`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.post.decisions import SUMMARY
from curation.ledger import CLIP_SCHEMA, DECISION_SCHEMA, Ledger

REPORT_NAME = "report.html"
DEFAULT_MAX_CLIPS = 60
MAX_FAILED_VIDEOS = 200
SAMPLE_FACTOR = 8        # rows kept per contact-sheet slot before the even spacing picks
HASH_RANGE = 1 << 20
DUCKDB_MEMORY = "256MB"  # DuckDB spills sorts and aggregates to a temporary folder past this (bounded RSS)
# Score columns shown even when no threshold names them (the stages' outputs).
KNOWN_SCORES = ("motion_score", "text_area", "aesthetic", "caption_similarity", "dup_similarity")
# The recipe switch behind each stage score: a score without values whose stage the recipe turned off gets
# no empty histogram, only a mention that it is off.
SCORE_STAGE = {"text_area": ("text", "text stage"), "aesthetic": ("clip", "clip stage"),
               "caption_similarity": ("clip", "clip stage"), "dup_similarity": ("dedup.near", "near dedup")}
# Float columns that describe a clip or its decoding rather than score it.
BOOKKEEPING = {"start_s", "end_s", "duration_s", "fps", "width", "height", "num_frames", "start_frame",
               "end_frame", "clip_index", "sar", "process_s", "coded_width", "coded_height", "rotation",
               "size_bytes", "num_corrupt", "motion_pairs"}
# Numeric columns of the ledger and of its decisions -> whether they are floats (only those are scores
# unless a threshold names them).
NUMERIC = {f.name: pa.types.is_floating(f.type) for f in [*CLIP_SCHEMA, *DECISION_SCHEMA]
           if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)}
# What a card shows of a clip, besides its scores and its decision row.
CARD_COLUMNS = ("clip_id", "video_id", "source", "clip_index", "start_s", "end_s", "duration_s", "status",
                "reason", "thumb_path", "captions")
KEPT = "kept"
UNKNOWN_REASON = "unknown"  # a not-kept clip whose decision has no reason code
THUMB_MAX_BYTES = 1 << 20  # a larger "thumbnail" is not one; it would bloat a page meant for mailing
# Colours the tests look for in the screenshot.
FUNNEL_COLOR = "#2f6db5"
KEPT_COLOR = "#3a9d5d"
DROPPED_COLOR = "#d0644a"
THRESHOLD_COLOR = "#7b2cbf"


class NoLedger(FileNotFoundError):
    """The folder holds no decided ledger; the message says which command writes one."""


@dataclass(frozen=True)
class Line:
    """A threshold line: one bound of a rule, a percentile at the value it resolved to."""

    kind: str    # "min" | "max" | "drop_bottom_pct" | "drop_top_pct"
    label: str   # "min", "bottom 20%"
    value: float


@dataclass
class Histogram:
    column: str
    num_scored: int            # clips with a finite value
    num_missing: int           # clips without one
    lines: list[Line]
    has_rule: bool             # a threshold names the column (its rule is shown even without values)
    edges: np.ndarray | None = None    # None when no clip has a value
    kept: np.ndarray | None = None     # clips per bin
    dropped: np.ndarray | None = None


@dataclass
class ClipGroup:
    key: str           # "kept" or the reason code
    title: str
    total: int         # clips in the group
    shown: list[dict]  # the sampled clips: their ledger row with their decision row


@dataclass
class RunData:
    run_dir: Path
    funnel: list[dict] | None
    config_text: str | None
    rules: dict[str, dict[str, float | None]]   # threshold rules by score column
    run_info: dict[str, Any] | None
    stats: dict[str, float]                     # videos, clips, usable, kept, kept_seconds
    histograms: list[Histogram]
    groups: list[ClipGroup]
    has_thumbs: bool                            # any clip has a thumbnail path
    failed_videos: list[dict]                   # the first MAX_FAILED_VIDEOS not decoded, by source
    num_failed_videos: int
    models: list[dict[str, Any]] = field(default_factory=list)  # models.json: the weights that scored the run
    off_scores: dict[str, str] = field(default_factory=dict)     # score -> the stage the recipe turned off

    @property
    def score_columns(self) -> list[str]:
        return [h.column for h in self.histograms]


def load_run(run_dir: str | Path, max_clips: int = DEFAULT_MAX_CLIPS) -> RunData:
    """Everything the page shows, as aggregates and a sample: memory does not grow with the clips."""
    run_dir = Path(run_dir)
    ledger = Ledger(run_dir)
    check_decided(ledger)
    config_text, tree = _read_config(run_dir)
    rules, lines = threshold_lines(ledger, tree)
    candidates = [c for c in NUMERIC if c in rules or c in KNOWN_SCORES or (NUMERIC[c] and c not in BOOKKEEPING)]
    totals, scored = _first_pass(ledger, candidates)
    columns = score_columns(rules, {c: s[0] for c, s in scored.items()})
    off = off_stages(tree)
    off_scores = {c: why for c, (stage, why) in SCORE_STAGE.items() if stage in off and not scored.get(c, (0,))[0]}
    columns = [c for c in columns if c not in off_scores]
    histograms = [Histogram(c, scored[c][0], int(totals["clips"]) - scored[c][0], lines.get(c, []), c in rules)
                  for c in columns]
    for h in histograms:
        if h.num_scored:
            h.edges = histogram_edges(scored[h.column][1], scored[h.column][2], h.num_scored, h.lines)
    _bin_counts(ledger, [h for h in histograms if h.edges is not None])
    groups = select_clips(ledger, max_clips, columns)
    num_videos, num_failed, failed = _videos(ledger, MAX_FAILED_VIDEOS)
    funnel = _read_json(run_dir / "funnel.json")
    run_info = _read_json(run_dir / "run.json")
    models = _read_json(run_dir / "models.json")
    stats = {"videos": num_videos, **{k: v for k, v in totals.items() if k != "thumbs"}}
    return RunData(run_dir, funnel if isinstance(funnel, list) else None, config_text, rules,
                   run_info if isinstance(run_info, dict) else None, stats, histograms, groups,
                   totals["thumbs"] > 0, failed, num_failed,
                   [m for m in models if isinstance(m, dict)] if isinstance(models, list) else [], off_scores)


def off_stages(tree: dict) -> set[str]:
    """The stages config.yaml (the resolved recipe) turned off: "text", "caption", "clip", "dedup.near"
    (near dedup compares clip embeddings, so it is off without the clip stage too)."""
    def section(name: str) -> dict:
        value = tree.get(name)
        return value if isinstance(value, dict) else {}

    off = {name for name in ("text", "caption", "clip") if section(name).get("enabled") is False}
    if section("dedup").get("near") is False or "clip" in off:
        off.add("dedup.near")
    return off


def check_decided(ledger: Ledger) -> None:
    """Raises NoLedger, naming the command that fixes it, unless every committed clips file has its decisions."""
    run_dir = ledger.run_dir
    if not run_dir.is_dir():
        raise NoLedger(f"{run_dir} does not exist; pass the output folder of a curation run "
                       f"(lvd curate RECIPE --set output={run_dir})")
    if not ledger.has_rows():
        if (ledger.dir / "clips.parquet").is_file():
            raise NoLedger(f"{run_dir} holds a ledger of the old layout (ledger/clips.parquet), which this version "
                           "does not read: re-run `lvd curate` into a new output folder")
        if ledger.meta_path.is_file() or (run_dir / "inputs").is_dir():
            raise NoLedger(f"{run_dir} has no committed video yet (the run was interrupted): re-run the same "
                           "`lvd curate` command to finish it, then `lvd report` again")
        raise NoLedger(f"no ledger in {run_dir}: run `lvd curate RECIPE --set output={run_dir}` first")
    files = ledger.clip_files()
    undecided = [f for f in files if not ledger.decision_file(f).is_file()]
    if not ledger.decisions_dir.is_dir() or undecided:
        what = "no decisions" if len(undecided) == len(files) else \
            f"{len(undecided)} of {len(files)} clips files without decisions"
        raise NoLedger(f"{run_dir} has a ledger but {what} (the run was interrupted before deciding): re-run the "
                       "same `lvd curate` command (or `lvd curate RECIPE --rethreshold`), then `lvd report` again")


def threshold_lines(ledger: Ledger, tree: dict) -> tuple[dict[str, dict[str, float | None]], dict[str, list[Line]]]:
    """(rules, lines) by score column: as the last decision pass resolved them (decisions/_summary.json), or
    for a run without it from config.yaml's thresholds, a percentile resolved over the usable clips'
    scores with DuckDB's quantile_cont (numpy's linear percentile, as the decisions resolve it)."""
    summary = _read_json(ledger.decisions_dir / SUMMARY)
    if isinstance(summary, dict) and isinstance(summary.get("bounds"), dict):
        resolved = {str(name): [Line(str(b.get("kind")), str(b.get("label", b.get("kind"))), float(b["value"]))
                                for b in bounds if isinstance(b, dict) and _num(b.get("value")) is not None]
                    for name, bounds in summary["bounds"].items() if isinstance(bounds, list)}
        return {**{n: {} for n in resolved}, **_rules(summary.get("thresholds"))}, resolved
    from curation.post.thresholds import Threshold, percentile_points, resolve_bounds

    rules = _rules(tree.get("thresholds"))
    lines: dict[str, list[Line]] = {}
    for name, rule in rules.items():
        try:
            threshold = Threshold.model_validate({k: v for k, v in rule.items() if v is not None})
        except ValueError:
            continue
        points = percentile_points(threshold) if name in NUMERIC and name in CLIP_SCHEMA.names else []
        values = _percentiles(ledger, name, points) if points else {}
        lines[name] = [Line(b.kind, b.label, b.value) for b in resolve_bounds(threshold, values)]
    return rules, lines


def score_columns(rules: dict[str, Any], num_scored: dict[str, int]) -> list[str]:
    """Columns named by a threshold (any numeric type), then the known stage scores, then any other
    float column that is not bookkeeping, the last two only where a clip has a value: the columns a
    histogram is drawn for, in that order."""
    out = [c for c in rules if c in NUMERIC]
    out += [c for c in KNOWN_SCORES if num_scored.get(c) and c not in out]
    out += [c for c, is_float in NUMERIC.items()
            if is_float and c not in out and c not in BOOKKEEPING and num_scored.get(c)]
    return out


def histogram_edges(lo: float, hi: float, num_scored: int, lines: list[Line]) -> np.ndarray:
    """Bin edges over the values' range, widened to a threshold unless that would squash the data to a sliver."""
    span = hi - lo
    for line in lines:
        nlo, nhi = min(lo, line.value), max(hi, line.value)
        if span == 0 or (hi - lo) >= 0.25 * (nhi - nlo):
            lo, hi = nlo, nhi
    if hi == lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    num_bins = int(np.clip(2 * math.ceil(math.sqrt(num_scored)), 5, 40))
    return np.linspace(lo, hi, num_bins + 1)


def select_clips(ledger: Ledger, max_clips: int = DEFAULT_MAX_CLIPS, columns: list[str] = ()) -> list[ClipGroup]:
    """Kept clips, then not-kept ones by reason code (largest first). At most `max_clips` kept and
    `max_clips` not kept are shown: evenly spaced over the clip id order (`<video_id>-<index>`: the
    video, clip index order), and for the not-kept ones dealt round robin over the reason codes, largest
    first (so every code shows clips while there are slots, and a small code's unused share goes to the
    others). One DuckDB pass over the decisions' ids picks them; only their rows are then read, with the
    card columns and the score `columns`."""
    if max_clips < 0:
        raise ValueError(f"max_clips ({max_clips}) must be 0 or more")
    files = [str(ledger.decision_file(f)) for f in ledger.clip_files()]
    if not files:
        return []
    groups = (f"SELECT clip_id, filename, file_row_number AS row, CASE WHEN coalesce(keep, false) THEN '{KEPT}' "
              f"ELSE coalesce(reason_code, '{UNKNOWN_REASON}') END AS grp FROM read_parquet(?, filename=true, "
              "file_row_number=true, union_by_name=true, hive_partitioning=false)")
    with _duckdb() as db:
        sizes = dict(db.execute(f"SELECT grp, count(*) FROM ({groups}) GROUP BY grp", [files]).fetchall())
        dropped = sorted((k for k in sizes if k != KEPT), key=lambda k: (-sizes[k], k))
        quota = {KEPT: min(max_clips, sizes.get(KEPT, 0)), **_round_robin({k: sizes[k] for k in dropped}, max_clips)}
        # a big group is first thinned to ~SAMPLE_FACTOR x its quota by a hash of the clip id (deterministic,
        # spread over every file), so the ranking below holds a few hundred rows, not the run
        keep_of = {g: min(HASH_RANGE, -(-SAMPLE_FACTOR * k * HASH_RANGE // sizes[g])) if k else 0
                   for g, k in quota.items()}
        db.register("quota", pa.table({"grp": list(quota), "k": list(quota.values()),
                                       "thr": [keep_of[g] for g in quota]}))
        # evenly spaced ranks floor(i * n / k), i < k: rank r is one iff i = ceil(r * k / n) gives it back
        picked = db.execute(f"""SELECT grp, filename, row FROM (
                SELECT grp, filename, row, k, row_number() OVER (PARTITION BY grp ORDER BY clip_id, filename, row) - 1
                    AS r, count(*) OVER (PARTITION BY grp) AS n
                FROM ({groups}) JOIN quota USING (grp) WHERE k > 0 AND hash(clip_id) % {HASH_RANGE} < thr)
            WHERE least(k, n) > 0 AND (r * least(k, n) + n - 1) // n < least(k, n)
                AND ((r * least(k, n) + n - 1) // n) * n // least(k, n) = r
            ORDER BY grp, r""", [files]).fetchall()
    rows = _read_rows(ledger, [(Path(f), int(r)) for _, f, r in picked],
                      [*CARD_COLUMNS, *(c for c in columns if c in CLIP_SCHEMA.names and c not in CARD_COLUMNS)])
    shown: dict[str, list[dict]] = {k: [] for k in quota}
    for (grp, _, _), row in zip(picked, rows):
        shown[grp].append(row)
    out = [ClipGroup(KEPT, KEPT, sizes.get(KEPT, 0), shown[KEPT])]
    out += [ClipGroup(k, k if k != UNKNOWN_REASON else "not kept (no reason code recorded)", sizes[k], shown[k])
            for k in dropped]
    return out


def _round_robin(sizes: dict[str, int], slots: int) -> dict[str, int]:
    """Slots dealt one per group and round, in the given order, until they or the groups run out."""
    quota = dict.fromkeys(sizes, 0)
    while slots and any(quota[k] < sizes[k] for k in sizes):
        for k in sizes:
            if slots and quota[k] < sizes[k]:
                quota[k] += 1
                slots -= 1
    return quota


def write_report(run_dir: str | Path, out: str | Path | None = None, max_clips: int = DEFAULT_MAX_CLIPS) -> Path:
    """Writes the report of a curation run and returns its path (default RUN_DIR/report.html)."""
    run = load_run(run_dir, max_clips)
    path = Path(out) if out is not None else run.run_dir / REPORT_NAME
    page = render(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def render(run: RunData) -> str:
    title = f"curation report: {run.run_dir.name or run.run_dir}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p class=\"path\">{_e(str(run.run_dir.absolute()))}</p>",
        _stats(run), _stand_in_warning(run), "</header>",
        '<section id="funnel"><h2>Funnel</h2>', _funnel(run), "</section>",
        '<section id="reasons"><h2>Why clips were not kept</h2>', _reasons(run.groups), "</section>",
        '<section id="scores"><h2>Scores</h2>', _legend(), '<div class="histograms">',
        *(_histogram(h) for h in run.histograms),
        "</div>" + ("" if run.histograms or run.off_scores else '<p class="empty">no score columns in the ledger</p>'),
        _off_scores(run.off_scores), "</section>",
        '<section id="clips"><h2>Clips</h2>', _contact_sheet(run), "</section>",
        '<section id="videos"><h2>Videos not decoded</h2>', _failed_videos(run), "</section>",
        '<section id="run"><h2>Run</h2>', _run_info(run), "</section>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------- reading

def _first_pass(ledger: Ledger, candidates: list[str]) -> tuple[dict[str, float], dict[str, tuple[int, float, float]]]:
    """One pass, file by file: the run's counts, and per candidate score column (finite values, min, max)."""
    totals = {"clips": 0, "usable": 0, "kept": 0, "kept_seconds": 0.0, "thumbs": 0}
    scored = {c: (0, math.inf, -math.inf) for c in candidates}
    clip_side = [c for c in candidates if c in CLIP_SCHEMA.names]
    for table in _clip_tables(ledger, ["status", "duration_s", "thumb_path", *clip_side]):
        keep = _bools(table, "keep")
        totals["clips"] += table.num_rows
        totals["usable"] += int(_bools(table, "status", equal="ok").sum())
        totals["kept"] += int(keep.sum())
        totals["kept_seconds"] += float(np.nansum(_floats(table, "duration_s")[keep]))
        thumbs = table.column("thumb_path")
        totals["thumbs"] += int(pc.sum(pc.fill_null(pc.not_equal(thumbs, ""), False)).as_py() or 0)
        for c in candidates:
            values = _floats(table, c)
            values = values[np.isfinite(values)]
            if values.size:
                n, lo, hi = scored[c]
                scored[c] = (n + values.size, min(lo, float(values.min())), max(hi, float(values.max())))
    return totals, scored


def _bin_counts(ledger: Ledger, histograms: list[Histogram]) -> None:
    """The second pass: kept and not-kept clips per bin, summed over the files (bins are fixed by then)."""
    for h in histograms:
        h.kept = np.zeros(len(h.edges) - 1, np.int64)
        h.dropped = np.zeros(len(h.edges) - 1, np.int64)
    if not histograms:
        return
    clip_side = [h.column for h in histograms if h.column in CLIP_SCHEMA.names]
    for table in _clip_tables(ledger, clip_side or ["clip_id"]):
        keep = _bools(table, "keep")
        for h in histograms:
            values = _floats(table, h.column)
            finite = np.isfinite(values)
            h.kept += np.histogram(values[finite & keep], h.edges)[0]
            h.dropped += np.histogram(values[finite & ~keep], h.edges)[0]


def _clip_tables(ledger: Ledger, columns: list[str]) -> Iterator[pa.Table]:
    """One clips file at a time with its decisions; a decisions file that does not match is a NoLedger."""
    try:
        yield from ledger.iter_clips(columns=list(dict.fromkeys(columns)))
    except ValueError as e:  # rows of a decisions file do not match its clips file
        raise NoLedger(str(e)) from None


def _read_rows(ledger: Ledger, where: list[tuple[Path, int]], columns: list[str]) -> list[dict]:
    """The rows at (decisions file, row number): each clip's ledger columns with its decision row. Reads
    only the row groups that hold them."""
    out: dict[tuple[Path, int], dict] = {}
    by_file: dict[Path, list[int]] = {}
    for path, row in where:
        by_file.setdefault(path, []).append(row)
    for decisions, rows in by_file.items():
        clips = ledger.clips_dir / decisions.parent.name / decisions.name
        for row, clip, decision in zip(rows, _take(clips, rows, columns), _take(decisions, rows, None)):
            if clip.get("clip_id") != decision.get("clip_id"):
                raise NoLedger(f"{decisions} does not match {clips} (row {row}: {decision.get('clip_id')} vs "
                               f"{clip.get('clip_id')}): re-decide the run with `lvd curate RECIPE --rethreshold`")
            out[(decisions, row)] = {**clip, **decision}
    return [out[w] for w in where]


def _take(path: Path, rows: list[int], columns: list[str] | None) -> list[dict]:
    file = pq.ParquetFile(path)
    if columns is not None:
        columns = [c for c in columns if c in file.schema_arrow.names]
    starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
    out = {}
    for group in sorted({int(np.searchsorted(starts, r, "right")) - 1 for r in rows}):
        table = file.read_row_group(group, columns=columns)
        for r in rows:
            if starts[group] <= r < starts[group + 1]:
                out[r] = table.slice(r - int(starts[group]), 1).to_pylist()[0]
    return [out[r] for r in rows]


def _percentiles(ledger: Ledger, column: str, points: list[float]) -> dict[float, float | None]:
    """Percentiles (0-100) of a score over the usable clips that have one, as curation/post/decisions.py computes them."""
    files = [str(f) for f in ledger.clip_files()]
    if not files:
        return {}
    q = ", ".join(f"quantile_cont({column}, {p / 100!r})" for p in points)
    with _duckdb() as db:
        row = db.execute(f"SELECT {q} FROM read_parquet(?, union_by_name=true, hive_partitioning=false) WHERE "
                         f"status = 'ok' AND {column} IS NOT NULL AND NOT isnan({column}::DOUBLE)", [files]).fetchone()
    return {p: (None if v is None else float(v)) for p, v in zip(points, row)}


def _videos(ledger: Ledger, limit: int) -> tuple[int, int, list[dict]]:
    """(videos, videos not decoded, the first `limit` of those by source)."""
    files = [str(f) for f in ledger.video_files()]
    if not files:
        return 0, 0, []
    scan = "read_parquet(?, union_by_name=true, hive_partitioning=false)"
    bad = "coalesce(status, '') NOT IN ('ok', 'no_clips')"
    with _duckdb() as db:
        total, failed = db.execute(f"SELECT count(*), count(*) FILTER (WHERE {bad}) FROM {scan}", [files]).fetchone()
        rows = db.execute(f"SELECT source, status, reason FROM {scan} WHERE {bad} ORDER BY source, video_id "
                          f"LIMIT {int(limit)}", [files]).fetchall()
    return int(total), int(failed), [dict(zip(("source", "status", "reason"), r)) for r in rows]


@contextmanager
def _duckdb() -> Iterator[Any]:
    import duckdb

    with tempfile.TemporaryDirectory(prefix="lvd-report-") as tmp, duckdb.connect() as db:
        db.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
        db.execute("SET threads TO 2")
        db.execute("SET preserve_insertion_order = false")
        db.execute("SET temp_directory = '" + tmp.replace("'", "''") + "'")
        yield db


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 (nulls NaN); all NaN when the file lacks it."""
    if name not in table.column_names or pa.types.is_null(table.column(name).type):
        return np.full(table.num_rows, np.nan)
    return pc.cast(table.column(name), pa.float64()).to_numpy()


def _bools(table: pa.Table, name: str, equal: str | None = None) -> np.ndarray:
    """A bool column (or `column == equal`), null as False; all False when the file lacks it."""
    if name not in table.column_names or pa.types.is_null(table.column(name).type):
        return np.zeros(table.num_rows, bool)
    column = table.column(name)
    column = pc.equal(column, equal) if equal is not None else pc.cast(column, pa.bool_())
    return pc.fill_null(column, False).to_numpy()


def _read_config(run_dir: Path) -> tuple[str | None, dict]:
    """config.yaml verbatim, and parsed (empty when missing or unreadable)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, {}
    import yaml

    text = path.read_text(errors="replace")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        tree = {}
    return text, tree if isinstance(tree, dict) else {}


def _rules(raw: Any) -> dict[str, dict[str, float | None]]:
    return {str(name): {k: _float_or_none(rule.get(k)) for k in ("min", "max", "drop_bottom_pct", "drop_top_pct")}
            for name, rule in (raw if isinstance(raw, dict) else {}).items() if isinstance(rule, dict)}


# ---------------------------------------------------------------- sections

def _stats(run: RunData) -> str:
    s = run.stats
    stats = [("videos", int(s["videos"])), ("clips", int(s["clips"])), ("usable", int(s["usable"])),
             ("kept", int(s["kept"]))]
    seconds = float(s["kept_seconds"])
    items = "".join(f'<li><span class="stat" data-stat="{k}">{v}</span> {k}</li>' for k, v in stats)
    return (f'<ul class="stats">{items}<li><span class="stat" data-stat="kept_duration" data-seconds="{seconds:.3f}">'
            f'{_duration(seconds)}</span> of kept clips</li></ul>')


def _stand_in_warning(run: RunData) -> str:
    roles = [str(m.get("role")) for m in run.models if m.get("random_stand_in")]
    if not roles:
        return ""
    return (f'<p class="stand-ins" data-roles="{_e(" ".join(roles))}">Tiny random-weight models stood in for '
            f'{_e(", ".join(roles))}: their scores and captions mean nothing.</p>')


def _funnel(run: RunData) -> str:
    if not run.funnel:
        return '<p class="empty">no funnel.json in the run folder (re-run <code>lvd curate</code> to write it)</p>'
    steps = [(str(s.get("step", "?")), int(s.get("count") or 0)) for s in run.funnel if isinstance(s, dict)]
    off = {str(s.get("step")): str(s["off"]) for s in run.funnel if isinstance(s, dict) and s.get("off")}
    names = [n for n, _ in steps]
    first_clip_step = names.index("clips") if "clips" in names else 0
    video_base = steps[0][1] if first_clip_step > 0 else 0
    clip_base = steps[first_clip_step][1]
    rows = []
    for i, (name, count) in enumerate(steps):
        unit, base = ("videos", video_base) if i < first_clip_step else ("clips", clip_base)
        pct = 100.0 * count / base if base else 0.0
        width = min(100.0, pct)
        note = (f'<span class="funnel-pct" title="{_e(off[name])}">off in this recipe</span>' if name in off
                else f'<span class="funnel-pct">{pct:.1f}% of {unit}</span>')
        rows.append(
            f'<div class="funnel-step{" off" if name in off else ""}" data-step="{_e(name)}" data-unit="{unit}">'
            f'<span class="funnel-name">{_e(name)}</span>'
            f'<span class="funnel-track"><span class="funnel-bar" style="width:{width:.2f}%"></span></span>'
            f'<span class="funnel-count" data-step="{_e(name)}" data-count="{count}">{count}</span>{note}</div>')
    return '<div class="funnel">' + "".join(rows) + "</div>"


def _off_scores(off: dict[str, str]) -> str:
    if not off:
        return ""
    items = ", ".join(f"{_e(c)} ({_e(stage)})" for c, stage in off.items())
    return f'<p class="off-scores muted" data-off="{_e(" ".join(off))}">off in this recipe: {items}</p>'


def _reasons(groups: list[ClipGroup]) -> str:
    groups = groups[1:]
    if not groups:
        return '<p class="empty">every clip was kept</p>'
    rows = "".join(f'<tr><td class="num">{g.total}</td><td><a href="#group-{_slug(g.key)}">{_e(g.title)}</a></td></tr>'
                   for g in groups)
    return f'<table class="reasons"><tr><th>clips</th><th>reason</th></tr>{rows}</table>'


def _legend() -> str:
    return ('<p class="legend"><span class="swatch kept"></span>kept <span class="swatch dropped"></span>not kept '
            '<span class="swatch threshold"></span>threshold (percentile rules at the value they resolved to '
            'over the usable clips)</p>')


def _histogram(h: Histogram) -> str:
    column, lines = h.column, h.lines
    head = (f'<figure class="histogram" data-column="{_e(column)}" data-n="{h.num_scored}">'
            f'<figcaption><b>{_e(column)}</b> <span class="muted">{h.num_scored} clips scored'
            + (f", {h.num_missing} without a score" if h.num_missing else "") + "</span>")
    if h.has_rule:
        head += '<br><span class="rule">' + _e(", ".join(f"{b.label} {b.value:.4g}" for b in lines)) + "</span>"
    head += "</figcaption>"
    if h.edges is None:
        missing = "".join(f'<span class="threshold-missing" data-kind="{b.kind}">{_e(b.label)} {b.value:.4g}</span>'
                          for b in lines)
        return head + f'<p class="empty">no values {missing}</p></figure>'

    w, h_px, left, right, top, bottom = 420, 180, 40, 12, 26, 34
    edges, kept_counts, drop_counts = h.edges, h.kept, h.dropped
    lo, hi, num_bins = float(edges[0]), float(edges[-1]), len(edges) - 1
    ymax = max(1, int((kept_counts + drop_counts).max()))
    pw, ph = w - left - right, h_px - top - bottom

    def x(v: float) -> float:
        return left + pw * (v - lo) / (hi - lo)

    def y(c: float) -> float:
        return top + ph * (1 - c / ymax)

    svg = [f'<svg viewBox="0 0 {w} {h_px}" width="{w}" height="{h_px}" role="img" aria-label="histogram of {_e(column)}">']
    bw = pw / num_bins
    for i in range(num_bins):
        x0, k, d = left + i * bw, int(kept_counts[i]), int(drop_counts[i])
        rng = f"{edges[i]:.4g} to {edges[i + 1]:.4g}"
        if k:
            svg.append(f'<rect class="bar kept" data-count="{k}" x="{x0 + 0.5:.2f}" y="{y(k):.2f}" '
                       f'width="{max(bw - 1, 0.5):.2f}" height="{ph * k / ymax:.2f}"><title>{k} kept, {rng}</title></rect>')
        if d:
            svg.append(f'<rect class="bar dropped" data-count="{d}" x="{x0 + 0.5:.2f}" y="{y(k + d):.2f}" '
                       f'width="{max(bw - 1, 0.5):.2f}" height="{ph * d / ymax:.2f}"><title>{d} not kept, {rng}</title></rect>')
    base = top + ph
    svg.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{w - right}" y2="{base}"/>')
    svg.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{base}"/>')
    for v, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
        svg.append(f'<text class="tick" x="{x(v):.2f}" y="{base + 14}" text-anchor="{anchor}">{v:.4g}</text>')
    svg.append(f'<text class="tick" x="{left - 4}" y="{top + 4}" text-anchor="end">{ymax}</text>')
    svg.append(f'<text class="tick" x="{left - 4}" y="{base}" text-anchor="end">0</text>')
    for i, line in enumerate(lines):
        v = line.value
        off = v < lo or v > hi
        xv = x(min(max(v, lo), hi))
        text = f"{line.label} {v:.4g}" + (" (off scale)" if off else "")
        anchor = "start" if xv < left + pw / 2 else "end"
        dx = 3 if anchor == "start" else -3
        svg.append(f'<line class="threshold" data-column="{_e(column)}" data-kind="{_e(line.kind)}" data-value="{v!r}" '
                   f'x1="{xv:.2f}" y1="{top - 4}" x2="{xv:.2f}" y2="{base}"><title>{_e(text)}</title></line>')
        svg.append(f'<text class="threshold-label" x="{xv + dx:.2f}" y="{top - 8 + 11 * (i % 2)}" '
                   f'text-anchor="{anchor}">{_e(text)}</text>')
    svg.append(f'<text class="tick" x="{left + pw / 2:.2f}" y="{h_px - 4}" text-anchor="middle">{_e(column)}</text>')
    svg.append("</svg>")
    return head + "".join(svg) + "</figure>"


def _contact_sheet(run: RunData) -> str:
    if not run.stats["clips"]:
        return '<p class="empty">no clips in the ledger</p>'
    out = ['<p class="filters" hidden>show: <button data-filter="all">all</button> '
           '<button data-filter="kept">kept</button> <button data-filter="dropped">not kept</button></p>']
    if not run.has_thumbs:
        out.append('<p class="muted">no clip of this run has a thumbnail (its ledger predates them): re-run '
                   '<code>lvd curate</code> into a new output folder to get them</p>')
    for g in run.groups:
        cls = "kept" if g.key == KEPT else "dropped"
        out.append(f'<div class="clip-group {cls}" id="group-{_slug(g.key)}" data-group="{_e(g.key)}" '
                   f'data-total="{g.total}" data-shown="{len(g.shown)}">'
                   f'<h3>{_e(g.title)} <span class="muted">showing {len(g.shown)} of {g.total}</span></h3>'
                   '<div class="cards">')
        out.extend(_card(run.run_dir, row, run.score_columns, run.has_thumbs) for row in g.shown)
        out.append("</div></div>")
    return "".join(out)


def _card(run_dir: Path, row: dict, columns: list[str], has_thumbs: bool) -> str:
    keep = bool(row.get("keep")) if row.get("keep") is not None else False
    clip_id = str(row.get("clip_id", ""))
    source = str(row.get("source") or "")
    name = source.replace("\\", "/").rsplit("/", 1)[-1]
    thumb = _thumb(run_dir, row.get("thumb_path"), clip_id) if has_thumbs else \
        '<div class="thumb placeholder">no thumbnail</div>'
    when = ""
    if _num(row.get("start_s")) is not None and _num(row.get("end_s")) is not None:
        when = f'{_num(row["start_s"]):.2f}–{_num(row["end_s"]):.2f} s'
    dur = _num(row.get("duration_s"))
    meta = [f'<div class="clip-id">{_e(clip_id)}</div>',
            f'<div class="source" title="{_e(source)}">{_e(name)}'
            + (f' <span class="muted">#{_e(str(row.get("clip_index")))}</span>' if row.get("clip_index") is not None else "")
            + "</div>",
            f'<div class="muted">{_e(when)}' + (f' · <span class="duration">{dur:.2f} s</span>' if dur is not None else "")
            + "</div>"]
    scores = []
    for c in columns:
        v = _num(row.get(c))
        passed = row.get(f"pass_{c}")
        cls = ' class="fail"' if passed is not None and not _isnan(passed) and not bool(passed) else ""
        scores.append(f'<tr{cls}><td>{_e(c)}</td><td class="num" data-score="{_e(c)}">'
                      f'{"–" if v is None else f"{v:.4g}"}</td></tr>')
    if scores:
        meta.append('<table class="scores">' + "".join(scores) + "</table>")
    dup = row.get("dup_of")
    if isinstance(dup, str) and dup:
        sim = _num(row.get("dup_similarity"))
        meta.append(f'<div class="dup">duplicate of <code>{_e(dup)}</code>' + (f" ({sim:.3f})" if sim is not None else "")
                    + "</div>")
    caps = _captions(row.get("captions"))
    if caps:
        meta.append('<ul class="captions">' + "".join(caps) + "</ul>")
    if not keep:
        meta.append(f'<div class="decision">{_e(str(row.get("decision") or row.get("reason") or "not kept"))}</div>')
    return (f'<div class="clip-card {"kept" if keep else "dropped"}" data-clip-id="{_e(clip_id)}" '
            f'data-keep="{str(keep).lower()}">{thumb}<div class="meta">{"".join(meta)}</div></div>')


def _captions(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    out = []
    for cap in list(value):
        if isinstance(cap, dict):
            text, weight, source = cap.get("text"), _num(cap.get("weight")), cap.get("source")
        else:
            text, weight, source = cap, None, None
        if text is None:
            continue
        out.append('<li class="caption">' + (f'<span class="weight">{weight:.2f}</span> ' if weight is not None else "")
                   + f'<span class="caption-text">{_e(str(text))}</span>'
                   + (f' <span class="muted">({_e(str(source))})</span>' if source else "") + "</li>")
    return out


def _thumb(run_dir: Path, rel: Any, clip_id: str) -> str:
    def placeholder(why: str) -> str:
        return f'<div class="thumb placeholder">{_e(why)}</div>'

    if not isinstance(rel, str) or not rel:
        return placeholder("no thumbnail")
    root = run_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):  # the page is mailed around: embed nothing from outside the run
        return placeholder("thumbnail outside the run folder")
    try:
        data = path.read_bytes() if path.stat().st_size <= THUMB_MAX_BYTES else b""
    except OSError:
        return placeholder("thumbnail file missing")
    if data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    else:
        return placeholder("thumbnail unreadable")
    return (f'<img class="thumb" alt="first, middle and last frame of {_e(clip_id)}" '
            f'src="data:{mime};base64,{base64.b64encode(data).decode()}">')


def _failed_videos(run: RunData) -> str:
    total, failed = int(run.stats["videos"]), run.num_failed_videos
    if not total:
        return '<p class="empty">no videos in the ledger</p>'
    if not failed:
        return f'<p class="muted">all {total} videos were decoded</p>'
    rows = "".join(f'<tr><td>{_e(str(r.get("source")))}</td><td>{_e(str(r.get("status")))}</td>'
                   f'<td>{_e(str(r.get("reason") or ""))}</td></tr>' for r in run.failed_videos)
    shown = len(run.failed_videos)
    more = f'<p class="muted">and {failed - shown} more (see ledger/videos/)</p>' if failed > shown else ""
    return f'<table class="videos"><tr><th>source</th><th>status</th><th>reason</th></tr>{rows}</table>{more}'


def _run_info(run: RunData) -> str:
    out = []
    info = run.run_info
    if info:
        keys = ("command", "started", "git_revision", "host", "python", "argv")
        rows = "".join(f"<tr><th>{k}</th><td>{_e(_plain(info[k]))}</td></tr>" for k in keys if k in info)
        pkgs = info.get("packages") if isinstance(info.get("packages"), dict) else {}
        pkg = ", ".join(f"{k} {v}" for k, v in pkgs.items() if v)
        if pkg:
            rows += f"<tr><th>packages</th><td>{_e(pkg)}</td></tr>"
        out.append(f'<table class="run-info">{rows}</table>')
    else:
        out.append('<p class="empty">no run.json in the run folder</p>')
    if run.models:
        rows = "".join(f'<tr><th>{_e(str(m.get("role")))}</th><td>{_e(str(m.get("source")))}</td>'
                       f'<td>{"random stand-in" if m.get("random_stand_in") else ""}</td></tr>' for m in run.models)
        out.append(f'<table class="models"><tr><th>model</th><th>checkpoint</th><th></th></tr>{rows}</table>')
    if run.config_text is not None:
        out.append(f'<details open><summary>config.yaml (the resolved recipe)</summary>'
                   f'<pre class="config">{_e(run.config_text)}</pre></details>')
    else:
        out.append('<p class="empty">no config.yaml in the run folder</p>')
    return "".join(out)


# ---------------------------------------------------------------- helpers

def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in key).strip("-").lower() or "x"


def _plain(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _float_or_none(v: Any) -> float | None:
    return None if v is None else _num(v)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


CSS = f"""
body {{ font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 16px 24px;
       max-width: 1400px; color: #1d1d1f; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
h3 {{ font-size: 15px; margin: 18px 0 8px; }}
.path, .muted {{ color: #666; }} .empty {{ color: #888; font-style: italic; }}
code, .clip-id, pre {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }}
.stats {{ list-style: none; padding: 0; display: flex; gap: 24px; flex-wrap: wrap; }}
.stats .stat {{ font-size: 20px; font-weight: 600; }}
.stand-ins {{ background: #fff4d6; border: 1px solid #e8c66a; padding: 6px 10px; }}
.funnel-step {{ display: grid; grid-template-columns: 220px 1fr 80px 130px; align-items: center; gap: 8px; margin: 3px 0; }}
.funnel-name {{ text-align: right; }}
.funnel-track {{ background: #eef1f5; height: 22px; display: block; }}
.funnel-bar {{ background: {FUNNEL_COLOR}; height: 22px; display: block; }}
.funnel-count {{ text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }}
.funnel-pct {{ color: #666; font-variant-numeric: tabular-nums; }}
.funnel-step.off {{ opacity: 0.45; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 8px; text-align: left; vertical-align: top; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.reasons td, .reasons th, .videos td, .videos th, .run-info td, .run-info th {{ border-bottom: 1px solid #eee; }}
.histograms {{ display: flex; flex-wrap: wrap; gap: 16px; }}
.histogram {{ margin: 0; border: 1px solid #e3e3e3; padding: 8px; }}
.histogram .rule {{ color: {THRESHOLD_COLOR}; }}
.bar.kept, .swatch.kept {{ fill: {KEPT_COLOR}; background: {KEPT_COLOR}; }}
.bar.dropped, .swatch.dropped {{ fill: {DROPPED_COLOR}; background: {DROPPED_COLOR}; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: -1px; }}
.swatch.threshold {{ background: {THRESHOLD_COLOR}; width: 3px; }}
line.axis {{ stroke: #888; stroke-width: 1; }}
line.threshold {{ stroke: {THRESHOLD_COLOR}; stroke-width: 2; stroke-dasharray: 5 3; }}
text.tick {{ font-size: 10px; fill: #555; }} text.threshold-label {{ font-size: 10px; fill: {THRESHOLD_COLOR}; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }}
.clip-card {{ border: 1px solid #ddd; border-left: 4px solid {KEPT_COLOR}; padding: 6px; overflow-wrap: anywhere; }}
.clip-card.dropped {{ border-left-color: {DROPPED_COLOR}; }}
.thumb {{ display: block; max-width: 100%; height: auto; max-height: 96px; margin-bottom: 4px;
          object-fit: contain; object-position: left; }}
.thumb.placeholder {{ height: 60px; background: repeating-linear-gradient(45deg, #f2f2f2, #f2f2f2 8px, #e8e8e8 8px, #e8e8e8 16px);
                      color: #777; display: flex; align-items: center; justify-content: center; font-size: 12px; }}
.scores td {{ padding: 0 6px 0 0; font-size: 12px; }} .scores tr.fail td {{ color: {DROPPED_COLOR}; font-weight: 600; }}
.captions {{ padding-left: 16px; margin: 4px 0; font-size: 12px; }} .weight {{ color: #666; font-variant-numeric: tabular-nums; }}
.decision {{ color: {DROPPED_COLOR}; font-size: 12px; margin-top: 4px; }}
.dup {{ font-size: 12px; }}
pre.config {{ background: #f7f7f7; padding: 8px; overflow-x: auto; }}
body.only-kept .clip-group.dropped, body.only-dropped .clip-group.kept {{ display: none; }}
"""

# Optional: the filter buttons. Without JS they stay hidden and every group is shown.
JS = """
document.querySelectorAll('.filters').forEach(function (p) {
  p.hidden = false;
  p.addEventListener('click', function (ev) {
    var f = ev.target.getAttribute('data-filter');
    if (!f) return;
    document.body.classList.toggle('only-kept', f === 'kept');
    document.body.classList.toggle('only-dropped', f === 'dropped');
  });
});
"""
