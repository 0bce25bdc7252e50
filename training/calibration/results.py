"""What a calibration concludes: the table of arms, the suggested thresholds, the HTML page.

A filter arm wins when its held-out loss is below both the baseline's and the random control's of the same
fraction (lower is better); per score the suggestion is the winning fraction with the lowest loss, written as
a curation `thresholds:` block (`drop_bottom_pct` / `drop_top_pct`) that `lvd curate --rethreshold` applies
without decoding. A score with no winning fraction gets no rule.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import yaml

from training.calibration.arms import Arm
from training.calibration.config import CalibrateConfig
from training.calibration.runner import DONE

METRIC = "eval_loss"
CAVEAT = ("Tiny random-init proxies trained for a few steps say nothing about real quality: the numbers show the "
          "mechanics. At real scale SVD's proxies trained 40k steps at batch 256 on 8x256x256 clips per arm.")
FVD_NOT_RUN = "not run: no VideoMAE feature extractor configured (calibration recipe key fvd)"


def collect(config: CalibrateConfig, arms: list[Arm]) -> list[dict[str, Any]]:
    """One row per arm: its definition, and its held-out losses when it has finished."""
    rows = []
    for arm in arms:
        row: dict[str, Any] = {"arm": arm.name, "kind": arm.kind, "score": arm.score, "direction": arm.direction,
                               "fraction": arm.fraction, "num_samples": arm.num_samples, "rule": arm.rule,
                               "finished": False, METRIC: None, "clip_similarity": None, "fvd": None}
        done = arm.folder(config.output) / DONE
        if done.is_file():
            record = json.loads(done.read_text())
            row.update(finished=True, steps=record["steps"], train_loss=record["final_loss"],
                       clip_similarity=record.get("clip_similarity"), fvd=record.get("fvd"),
                       **{k: v for k, v in record["eval"].items() if k.startswith("eval_loss")})
        rows.append(row)
    baseline = next((r[METRIC] for r in rows if r["kind"] == "baseline"), None)
    random = {r["fraction"]: r[METRIC] for r in rows if r["kind"] == "random"}
    for r in rows:
        loss = r[METRIC]
        r["vs_baseline"] = None if loss is None or baseline is None or r["kind"] == "baseline" else loss - baseline
        control = random.get(r["fraction"]) if r["kind"] == "filter" else None
        r["vs_random"] = None if loss is None or control is None else loss - control
    return rows


def suggest(config: CalibrateConfig, rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(thresholds block, why per score). A fraction wins when it beats the baseline and its random control."""
    thresholds: dict[str, dict[str, float]] = {}
    why: dict[str, str] = {}
    for score, spec in config.scores.items():
        arms = [r for r in rows if r["kind"] == "filter" and r["score"] == score]
        if any(r[METRIC] is None for r in arms):
            why[score] = "not every arm of this score has finished"
            continue
        wins = [r for r in arms if (r["vs_baseline"] is None or r["vs_baseline"] < 0)
                and (r["vs_random"] is None or r["vs_random"] < 0)]
        if not wins:
            why[score] = "no fraction beat both the baseline and the random control: no rule"
            continue
        best = min(wins, key=lambda r: r[METRIC])
        thresholds[score] = {f"drop_{spec.direction}_pct": best["fraction"]}
        why[score] = (f"dropping the {spec.direction} {best['fraction']:g}% gave the lowest held-out loss "
                      f"({best[METRIC]:.4f}) of the {len(wins)} fraction(s) that beat the baseline and the random control")
    return thresholds, why


def check_thresholds(thresholds: dict[str, dict[str, float]]) -> None:
    """The block validates as curation's thresholds do (so `--rethreshold` takes it)."""
    from common.config import validate
    from curation.post.thresholds import Threshold

    for score, rule in thresholds.items():
        validate(Threshold, rule, source=f"suggested threshold {score}")


def write_outputs(config: CalibrateConfig, arms: list[Arm], num_heldout: int) -> dict[str, Path]:
    out = Path(config.output)
    rows = collect(config, arms)
    thresholds, why = suggest(config, rows)
    check_thresholds(thresholds)
    finished = sum(r["finished"] for r in rows)
    clip = (f"ran: CLIP text-video similarity of samples for {len(config.clip.prompts)} fixed prompt(s) "
            f"({config.clip.checkpoint}; higher is better; reported, not used for the suggestion)"
            if config.clip is not None else "not run: no CLIP checkpoint configured (calibration recipe key clip)")
    fvd = (f"ran: FVD of samples for the held-out captions vs the held-out clips, VideoMAE features "
           f"({config.fvd.checkpoint}; lower is better; meaningful only with a real extractor and hundreds of "
           "samples; reported, not used for the suggestion)" if config.fvd is not None else FVD_NOT_RUN)
    metrics = {METRIC: "ran: validation denoising loss (held-out clips, fixed EDM sigmas and noise seeds); "
                       "lower is better, the suggestion's metric", "clip_similarity": clip, "fvd": fvd}
    result = {"name": config.name, "shards": config.shard_folder, "num_heldout": num_heldout,
              "sigmas": config.heldout.sigmas,
              "arms": rows, "finished": finished, "suggested_thresholds": thresholds, "why": why,
              "metrics": metrics, "caveat": CAVEAT}
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "results.md",
             "thresholds": out / "thresholds.yaml", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(result, indent=1))
    columns = ["arm", "kind", "score", "direction", "fraction", "num_samples", METRIC, "vs_baseline", "vs_random",
               "clip_similarity", "fvd", "finished", "rule"]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["table"].write_text(markdown_table(rows, columns) + "\n")
    sets = " ".join(f"--set thresholds.{s}.{k}={v:g}" for s, r in thresholds.items() for k, v in r.items())
    apply = (f"# Apply without decoding: lvd curate RECIPE --set output=RUN --rethreshold {sets}\n" if sets
             else "# No filter beat the baseline and its random control: nothing to apply.\n")
    header = (f"# lvd calibrate {config.name}: suggested curation thresholds ({finished}/{len(rows)} arms finished).\n"
              + apply + "".join(f"# {s}: {w}\n" for s, w in why.items()))
    paths["thresholds"].write_text(header + yaml.safe_dump({"thresholds": thresholds}, sort_keys=False))
    paths["html"].write_text(render(config, result))
    return paths


def _fmt(v: Any, column: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}" if column == "fraction" else f"{v:+.4f}" if column.startswith("vs_") else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the page

def render(config: CalibrateConfig, result: dict[str, Any]) -> str:
    from curation.post.report import CSS

    e = html.escape
    title = f"calibration report: {config.name}"
    rows = result["arms"]
    columns = ["arm", "num_samples", METRIC, "vs_baseline", "vs_random", "clip_similarity", "fvd", "rule"]
    table = ["<table class=\"arms\"><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"]
    for r in rows:
        cells = "".join(f"<td class=\"{'num' if c != 'arm' and c != 'rule' else ''}\">{e(_fmt(r.get(c), c))}</td>"
                        for c in columns)
        table.append(f"<tr>{cells}</tr>")
    table.append("</table>")
    metrics = "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in result["metrics"].items())
    why = "".join(f"<li><code>{e(s)}</code>: {e(w)}</li>" for s, w in result["why"].items())
    block = yaml.safe_dump({"thresholds": result["suggested_thresholds"]}, sort_keys=False)
    plots = "".join(plot_svg(score, rows) for score in config.scores)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
        f"<style>{CSS}\n.arms td, .arms th {{ border-bottom: 1px solid #eee; }}</style></head><body>",
        f"<header><h1>{e(title)}</h1><p class=\"path\">{e(str(Path(config.output).absolute()))}</p>",
        f"<p class=\"stand-ins\">{e(CAVEAT)}</p>",
        f"<p>{result['finished']}/{len(rows)} arms finished; {result['num_heldout']} held-out clips from "
        f"<code>{e(config.shard_folder)}</code>; lower loss is better.</p></header>",
        f'<section id="metrics"><h2>Metrics</h2><ul>{metrics}</ul></section>',
        '<section id="plots"><h2>Held-out loss vs fraction dropped</h2><div class="histograms">', plots, "</div></section>",
        '<section id="arms"><h2>Arms</h2>', *table, "</section>",
        f'<section id="suggestion"><h2>Suggested thresholds</h2><ul>{why}</ul><pre>{e(block)}</pre></section>',
        "</body></html>"])


def plot_svg(score: str, rows: list[dict[str, Any]], width: int = 360, height: int = 220) -> str:
    """Loss vs fraction dropped: the score's arms (solid), the random control (dashed), the baseline (flat)."""
    e = html.escape
    filt = sorted((r["fraction"], r[METRIC]) for r in rows if r["score"] == score and r[METRIC] is not None)
    rand = sorted((r["fraction"], r[METRIC]) for r in rows if r["kind"] == "random" and r[METRIC] is not None)
    base = next((r[METRIC] for r in rows if r["kind"] == "baseline" and r[METRIC] is not None), None)
    if base is not None:  # dropping 0% is the baseline: both curves start there
        filt, rand = ([(0.0, base)] + filt if filt else filt), ([(0.0, base)] + rand if rand else rand)
    ys = [y for _, y in filt + rand] + ([base] if base is not None else [])
    if not ys:
        return f'<figure class="histogram"><figcaption>{e(score)}</figcaption><p class="empty">no finished arms</p></figure>'
    xs = [x for x, _ in filt + rand] + [0.0]
    x_hi = max(xs) or 1.0
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.1 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, right, top, bottom = 48, 10, 10, 30

    def px(x: float) -> float:
        return left + x / x_hi * (width - left - right)

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    def line(points: list[tuple[float, float]], cls: str, colour: str, dash: str = "") -> str:
        if not points:
            return ""
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"><title>{x:g}%: {y:.4f}'
                       f"</title></circle>" for x, y in points)
        return (f'<polyline class="{cls}" points="{pts}" fill="none" stroke="{colour}" stroke-width="2" '
                f'{f"stroke-dasharray={dash!r}" if dash else ""}/>{dots}')

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{e(score)}">',
             f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>']
    for x in sorted({x for x, _ in filt + rand} | {0.0}):
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:g}%</text>')
    for y in (y_lo + pad, y_hi - pad):
        parts.append(f'<text class="tick" x="{left - 4}" y="{py(y) + 3:.1f}" text-anchor="end">{y:.3g}</text>')
    if base is not None:
        parts.append(f'<line class="threshold" x1="{left}" y1="{py(base):.1f}" x2="{width - right}" y2="{py(base):.1f}"/>')
    parts.append(line(rand, "random", "#888", "4 3"))
    parts.append(line(filt, "filter", "#2a7ab0"))
    parts.append("</svg>")
    legend = ('<span class="swatch" style="background:#2a7ab0"></span>drop by score'
              '<span class="swatch" style="background:#888"></span>random control'
              '<span class="swatch threshold"></span>baseline')
    return f'<figure class="histogram"><figcaption><code>{e(score)}</code></figcaption>{"".join(parts)}<br>{legend}</figure>'


def summary_lines(paths: dict[str, Path], result_json: Path) -> list[str]:
    result = json.loads(result_json.read_text())
    lines = [f"{r['arm']:<32} {r['num_samples']:>7} clips  held-out loss "
             + (f"{r[METRIC]:.4f}" if r[METRIC] is not None else "(not trained)")
             + (f"  vs random {r['vs_random']:+.4f}" if r.get("vs_random") is not None else "")
             + (f"  CLIP similarity {r['clip_similarity']:.4f}" if r.get("clip_similarity") is not None else "")
             for r in result["arms"]]
    lines.append(f"suggested thresholds: {json.dumps(result['suggested_thresholds']) if result['suggested_thresholds'] else 'none'}")
    lines += [f"  {s}: {w}" for s, w in result["why"].items()]
    lines.append(CAVEAT)
    lines.append(f"table {paths['table']}, {paths['csv']}, {paths['json']}; thresholds {paths['thresholds']}; "
                 f"page {paths['html']}")
    return lines
