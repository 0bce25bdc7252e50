"""The curation report: one static, self-contained HTML page per run, to read and to mail around.

    lvd report runs/cur1                # -> runs/cur1/report.html

What the page shows, all read from the run folder (nothing is decoded or scored again):

1. the funnel (funnel.json) as horizontal bars, as in SVD's data-curation figure: video steps as a
   share of the input videos, clip steps as a share of all clips;
2. a histogram of every score column (see `score_columns`), kept and not-kept clips stacked, with the
   recipe's thresholds drawn as lines; a percentile rule (drop_bottom_pct / drop_top_pct) is drawn at
   the value it resolved to, computed as curation/thresholds.py does (over the usable clips);
3. a contact sheet: kept clips, then not-kept clips grouped by reason kind (`pipeline.reason_kind`),
   each with its thumbnail strip (first | middle | last key frame), scores, captions and decision; at
   most `max_clips` clips per side, picked deterministically and spread over videos and reasons;
4. the resolved recipe (config.yaml, verbatim) and run.json's basics.

The file has no external references: CSS is inline, thumbnails are data: URIs, and the few lines of
JavaScript (filter buttons) are optional, the page renders fully without them. Every string from the
ledger (captions, file names, reasons) is HTML-escaped: they come from untrusted inputs.

DOM hooks (stable, used by the tests): `.funnel-step[data-step]` with `.funnel-count[data-step][data-count]`;
`.stat[data-stat]` (videos, clips, usable, kept, from the ledger); `figure.histogram[data-column]` holding
`rect.bar.kept|.bar.dropped[data-count]` and `line.threshold[data-column][data-kind][data-value]`;
`.clip-group[data-group][data-total][data-shown]` holding `.clip-card[data-clip-id][data-keep]`, each
with `img.thumb` or `.thumb.placeholder`, `.caption` and `.decision`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curation.pipeline import reason_kind

REPORT_NAME = "report.html"
DEFAULT_MAX_CLIPS = 60
# Score columns shown even when no threshold names them (the stages' outputs).
KNOWN_SCORES = ("motion_score", "text_area", "aesthetic", "caption_similarity", "dup_similarity")
# Float columns that describe a clip or its decoding rather than score it.
BOOKKEEPING = {"start_s", "end_s", "duration_s", "fps", "width", "height", "num_frames", "start_frame",
               "end_frame", "clip_index", "sar", "process_s", "coded_width", "coded_height", "rotation",
               "size_bytes", "num_corrupt", "motion_pairs"}
THUMB_MAX_BYTES = 1 << 20  # a larger "thumbnail" is not one; it would bloat a page meant for mailing
# Colours the tests look for in the screenshot.
FUNNEL_COLOR = "#2f6db5"
KEPT_COLOR = "#3a9d5d"
DROPPED_COLOR = "#d0644a"
THRESHOLD_COLOR = "#7b2cbf"


class NoLedger(FileNotFoundError):
    """The folder holds no consolidated ledger; the message says which command writes one."""


@dataclass
class RunData:
    run_dir: Path
    videos: pd.DataFrame
    clips: pd.DataFrame
    funnel: list[dict] | None
    config_text: str | None
    thresholds: dict[str, dict[str, float | None]]
    run_info: dict[str, Any] | None
    models: list[dict[str, Any]] = field(default_factory=list)  # models.json: the weights that scored the run


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    ledger = run_dir / "ledger"
    if not (ledger / "clips.parquet").is_file():
        if not run_dir.is_dir():
            raise NoLedger(f"{run_dir} does not exist; pass the output folder of a curation run "
                           f"(lvd curate RECIPE --set output={run_dir})")
        if (ledger / "parts").is_dir():
            raise NoLedger(f"{run_dir} has ledger parts but no consolidated ledger (the run was interrupted): "
                           "re-run the same `lvd curate` command to finish it, then `lvd report` again")
        raise NoLedger(f"no ledger in {run_dir}: run `lvd curate RECIPE --set output={run_dir}` first")
    videos = pd.read_parquet(ledger / "videos.parquet") if (ledger / "videos.parquet").is_file() else pd.DataFrame()
    clips = _read_clips(ledger / "clips.parquet")
    funnel = _read_json(run_dir / "funnel.json")
    run_info = _read_json(run_dir / "run.json")
    config_text, thresholds = None, {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config_text = (run_dir / "config.yaml").read_text(errors="replace")
        try:
            tree = yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            tree = {}
        raw = tree.get("thresholds") if isinstance(tree, dict) else None
        for name, rule in (raw or {}).items():
            if isinstance(rule, dict):
                thresholds[str(name)] = {k: _float_or_none(rule.get(k))
                                         for k in ("min", "max", "drop_bottom_pct", "drop_top_pct")}
    models = _read_json(run_dir / "models.json")
    return RunData(run_dir, videos, clips, funnel if isinstance(funnel, list) else None, config_text,
                   thresholds, run_info if isinstance(run_info, dict) else None,
                   [m for m in models if isinstance(m, dict)] if isinstance(models, list) else [])


def score_columns(clips: pd.DataFrame, thresholds: dict[str, Any]) -> list[str]:
    """Columns named by a threshold (any numeric type), then the known stage scores, then any other
    float column that is not bookkeeping: the columns a histogram is drawn for, in that order."""
    def numeric(c: str) -> bool:
        return c in clips.columns and clips[c].dtype.kind in "iuf"

    out = [c for c in thresholds if numeric(c)]
    out += [c for c in KNOWN_SCORES if numeric(c) and c not in out]
    out += [c for c in clips.columns if c not in out and c not in BOOKKEEPING and clips[c].dtype.kind == "f"]
    return out


def threshold_bounds(clips: pd.DataFrame, column: str, rule: dict[str, float | None]) -> list[tuple[str, str, float]]:
    """(kind, label, value) of each bound of a rule; percentiles resolve over the usable clips' scores
    exactly as curation.thresholds._evaluate resolves them."""
    values = pd.to_numeric(clips[column], errors="coerce").to_numpy(dtype=float)
    usable = (clips["status"] == "ok").to_numpy() if "status" in clips.columns else np.ones(len(clips), bool)
    scored = values[usable & ~np.isnan(values)]
    out = []
    if rule.get("min") is not None:
        out.append(("min", "min", float(rule["min"])))
    if rule.get("max") is not None:
        out.append(("max", "max", float(rule["max"])))
    if rule.get("drop_bottom_pct") is not None and scored.size:
        pct = rule["drop_bottom_pct"]
        out.append(("drop_bottom_pct", f"bottom {pct:g}%", float(np.percentile(scored, pct))))
    if rule.get("drop_top_pct") is not None and scored.size:
        pct = rule["drop_top_pct"]
        out.append(("drop_top_pct", f"top {pct:g}%", float(np.percentile(scored, 100 - pct))))
    return out


@dataclass
class ClipGroup:
    key: str        # "kept" or the reason kind
    title: str
    total: int      # clips in the group
    shown: pd.DataFrame


def select_clips(clips: pd.DataFrame, max_clips: int = DEFAULT_MAX_CLIPS) -> list[ClipGroup]:
    """Kept clips, then not-kept ones by reason kind (largest first). At most `max_clips` kept and
    `max_clips` not kept are shown: evenly spaced over the (video, clip index) order, and for the
    not-kept ones dealt round robin over the reason kinds, largest first (so every kind shows clips
    while there are slots, and a small kind's unused share goes to the others)."""
    if max_clips < 0:
        raise ValueError(f"max_clips ({max_clips}) must be 0 or more")
    order = [c for c in ("video_id", "clip_index", "clip_id") if c in clips.columns]
    clips = clips.sort_values(order, kind="stable") if order else clips
    keep = clips["keep"].fillna(False).astype(bool) if "keep" in clips.columns else pd.Series(False, clips.index)
    groups = [ClipGroup("kept", "kept", int(keep.sum()), _spread(clips[keep], max_clips))]
    dropped = clips[~keep]
    if "decision" in dropped.columns:
        why = dropped["decision"].fillna("").astype(str)
    else:
        why = pd.Series("", index=dropped.index)
    kinds = why.map(lambda d: reason_kind(d) if d else "not kept (no decision recorded)")
    sizes = kinds.value_counts()
    ordered = sorted(sizes.index, key=lambda k: (-sizes[k], k))
    # round robin, largest kind first: one clip per kind and round until the slots run out
    quota, left = dict.fromkeys(ordered, 0), max_clips
    while left and any(quota[k] < sizes[k] for k in ordered):
        for kind in ordered:
            if left and quota[kind] < sizes[kind]:
                quota[kind] += 1
                left -= 1
    for kind in ordered:
        members = dropped[kinds == kind]
        groups.append(ClipGroup(kind, kind, len(members), _spread(members, quota[kind])))
    return groups


def _spread(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    n = len(frame)
    if k >= n:
        return frame
    return frame.iloc[[i * n // k for i in range(k)]]


def write_report(run_dir: str | Path, out: str | Path | None = None, max_clips: int = DEFAULT_MAX_CLIPS) -> Path:
    """Writes the report of a curation run and returns its path (default RUN_DIR/report.html)."""
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.run_dir / REPORT_NAME
    page = render(run, max_clips)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def render(run: RunData, max_clips: int = DEFAULT_MAX_CLIPS) -> str:
    clips = run.clips
    columns = score_columns(clips, run.thresholds)
    groups = select_clips(clips, max_clips) if not clips.empty else []
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
        '<section id="reasons"><h2>Why clips were not kept</h2>', _reasons(run, groups), "</section>",
        '<section id="scores"><h2>Scores</h2>', _legend(), '<div class="histograms">',
        *(_histogram(clips, c, run.thresholds.get(c)) for c in columns),
        "</div>" + ("" if columns else '<p class="empty">no score columns in the ledger</p>') + "</section>",
        '<section id="clips"><h2>Clips</h2>', _contact_sheet(run, columns, groups), "</section>",
        '<section id="videos"><h2>Videos not decoded</h2>', _failed_videos(run.videos), "</section>",
        '<section id="run"><h2>Run</h2>', _run_info(run), "</section>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------- sections

def _stats(run: RunData) -> str:
    clips = run.clips
    usable = int((clips["status"] == "ok").sum()) if "status" in clips.columns else len(clips)
    kept = int(clips["keep"].fillna(False).astype(bool).sum()) if "keep" in clips.columns else 0
    stats = [("videos", len(run.videos)), ("clips", len(clips)), ("usable", usable), ("kept", kept)]
    seconds = float(clips.loc[clips["keep"].fillna(False).astype(bool), "duration_s"].sum()) \
        if {"keep", "duration_s"} <= set(clips.columns) else 0.0
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
    names = [n for n, _ in steps]
    first_clip_step = names.index("clips") if "clips" in names else 0
    video_base = steps[0][1] if first_clip_step > 0 else 0
    clip_base = steps[first_clip_step][1]
    rows = []
    for i, (name, count) in enumerate(steps):
        unit, base = ("videos", video_base) if i < first_clip_step else ("clips", clip_base)
        pct = 100.0 * count / base if base else 0.0
        width = min(100.0, pct)
        rows.append(
            f'<div class="funnel-step" data-step="{_e(name)}" data-unit="{unit}">'
            f'<span class="funnel-name">{_e(name)}</span>'
            f'<span class="funnel-track"><span class="funnel-bar" style="width:{width:.2f}%"></span></span>'
            f'<span class="funnel-count" data-step="{_e(name)}" data-count="{count}">{count}</span>'
            f'<span class="funnel-pct">{pct:.1f}% of {unit}</span></div>')
    return '<div class="funnel">' + "".join(rows) + "</div>"


def _reasons(run: RunData, groups: list[ClipGroup]) -> str:
    if "keep" not in run.clips.columns:
        return '<p class="empty">the ledger has no decisions</p>'
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


def _histogram(clips: pd.DataFrame, column: str, rule: dict | None) -> str:
    values = pd.to_numeric(clips[column], errors="coerce").to_numpy(dtype=float)
    keep = clips["keep"].fillna(False).to_numpy(dtype=bool) if "keep" in clips.columns else np.zeros(len(clips), bool)
    finite = np.isfinite(values)
    bounds = threshold_bounds(clips, column, rule) if rule else []
    head = (f'<figure class="histogram" data-column="{_e(column)}" data-n="{int(finite.sum())}">'
            f'<figcaption><b>{_e(column)}</b> <span class="muted">{int(finite.sum())} clips scored'
            + (f", {len(values) - int(finite.sum())} without a score" if not finite.all() else "") + "</span>")
    if rule:
        head += '<br><span class="rule">' + _e(", ".join(f"{lab} {val:.4g}" for _, lab, val in bounds)) + "</span>"
    head += "</figcaption>"
    if not finite.any():
        lines = "".join(f'<span class="threshold-missing" data-kind="{k}">{_e(lab)} {v:.4g}</span>'
                        for k, lab, v in bounds)
        return head + f'<p class="empty">no values {lines}</p></figure>'

    w, h, left, right, top, bottom = 420, 180, 40, 12, 26, 34
    data = values[finite]
    lo, hi = float(data.min()), float(data.max())
    span = hi - lo
    for _, _, v in bounds:  # widen the axis to a threshold unless it would squash the data to a sliver
        nlo, nhi = min(lo, v), max(hi, v)
        if span == 0 or (hi - lo) >= 0.25 * (nhi - nlo):
            lo, hi = nlo, nhi
    if hi == lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    num_bins = int(np.clip(2 * math.ceil(math.sqrt(data.size)), 5, 40))
    edges = np.linspace(lo, hi, num_bins + 1)
    kept_counts, _ = np.histogram(values[finite & keep], edges)
    drop_counts, _ = np.histogram(values[finite & ~keep], edges)
    ymax = max(1, int((kept_counts + drop_counts).max()))
    pw, ph = w - left - right, h - top - bottom

    def x(v: float) -> float:
        return left + pw * (v - lo) / (hi - lo)

    def y(c: float) -> float:
        return top + ph * (1 - c / ymax)

    svg = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="histogram of {_e(column)}">']
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
    for i, (kind, label, v) in enumerate(bounds):
        off = v < lo or v > hi
        xv = x(min(max(v, lo), hi))
        text = f"{label} {v:.4g}" + (" (off scale)" if off else "")
        anchor = "start" if xv < left + pw / 2 else "end"
        dx = 3 if anchor == "start" else -3
        svg.append(f'<line class="threshold" data-column="{_e(column)}" data-kind="{kind}" data-value="{v!r}" '
                   f'x1="{xv:.2f}" y1="{top - 4}" x2="{xv:.2f}" y2="{base}"><title>{_e(text)}</title></line>')
        svg.append(f'<text class="threshold-label" x="{xv + dx:.2f}" y="{top - 8 + 11 * (i % 2)}" '
                   f'text-anchor="{anchor}">{_e(text)}</text>')
    svg.append(f'<text class="tick" x="{left + pw / 2:.2f}" y="{h - 4}" text-anchor="middle">{_e(column)}</text>')
    svg.append("</svg>")
    return head + "".join(svg) + "</figure>"


def _contact_sheet(run: RunData, columns: list[str], groups: list[ClipGroup]) -> str:
    clips = run.clips
    if clips.empty:
        return '<p class="empty">no clips in the ledger</p>'
    has_thumbs = "thumb_path" in clips.columns
    out = ['<p class="filters" hidden>show: <button data-filter="all">all</button> '
           '<button data-filter="kept">kept</button> <button data-filter="dropped">not kept</button></p>']
    if not has_thumbs:
        out.append('<p class="muted">this run has no thumbnails (its ledger predates them): re-run '
                   '<code>lvd curate</code> into a new output folder to get them</p>')
    for g in groups:
        cls = "kept" if g.key == "kept" else "dropped"
        out.append(f'<div class="clip-group {cls}" id="group-{_slug(g.key)}" data-group="{_e(g.key)}" '
                   f'data-total="{g.total}" data-shown="{len(g.shown)}">'
                   f'<h3>{_e(g.title)} <span class="muted">showing {len(g.shown)} of {g.total}</span></h3>'
                   '<div class="cards">')
        out.extend(_card(run.run_dir, row, columns, has_thumbs) for row in g.shown.to_dict("records"))
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


def _failed_videos(videos: pd.DataFrame, limit: int = 200) -> str:
    if videos.empty or "status" not in videos.columns:
        return '<p class="empty">no videos in the ledger</p>'
    bad = videos[~videos["status"].isin(["ok", "no_clips"])]
    if bad.empty:
        return f'<p class="muted">all {len(videos)} videos were decoded</p>'
    rows = "".join(f'<tr><td>{_e(str(r.get("source")))}</td><td>{_e(str(r.get("status")))}</td>'
                   f'<td>{_e(str(r.get("reason") or ""))}</td></tr>' for r in bad.head(limit).to_dict("records"))
    more = f'<p class="muted">and {len(bad) - limit} more (see ledger/videos.parquet)</p>' if len(bad) > limit else ""
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


def _read_clips(path: Path) -> pd.DataFrame:
    """The clip ledger without its list columns (embeddings, per-frame scores): the page shows none of
    them, and on a large run they are most of the memory. Captions are the exception."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    columns = [f.name for f in schema if f.name == "captions" or not pa.types.is_list(f.type)
               and not pa.types.is_large_list(f.type) and not pa.types.is_fixed_size_list(f.type)]
    return pq.read_table(path, columns=columns).to_pandas()


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
