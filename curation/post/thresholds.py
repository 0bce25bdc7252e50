"""Keep/drop decisions derived from stored scores.

A threshold never looks at a frame: it reads a score column of the ledger. Rules are fixed bounds
(`min`, `max`) or SVD-style percentiles (`drop_bottom_pct`, `drop_top_pct`, computed over every scored
clip of the run). Rules apply in recipe order; the funnel counts the clips left after each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pydantic

from common.config import Config


class Threshold(Config):
    min: float | None = None
    max: float | None = None
    drop_bottom_pct: float | None = None
    drop_top_pct: float | None = None

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Threshold":
        if all(v is None for v in (self.min, self.max, self.drop_bottom_pct, self.drop_top_pct)):
            raise ValueError("a threshold needs at least one of min, max, drop_bottom_pct, drop_top_pct")
        for name in ("drop_bottom_pct", "drop_top_pct"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 100:
                raise ValueError(f"{name} ({v}) is a percentage of clips; use a value in [0, 100)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max}); swap them")
        return self


@dataclass
class FunnelStep:
    name: str
    count: int


@dataclass(frozen=True)
class Bound:
    """One resolved bound of a rule: a percentile turned into the value it stands for."""

    kind: str      # "min" | "max" | "drop_bottom_pct" | "drop_top_pct"
    label: str     # as the decision text shows it: "min", "bottom 10%"
    value: float
    lower: bool    # a lower bound (values below it fail)

    @property
    def code(self) -> str:  # the reason-code suffix: "below_min", "above_top_pct"
        side = "below" if self.lower else "above"
        return f"{side}_{self.kind.removeprefix('drop_').removesuffix('_pct')}{'_pct' if 'pct' in self.kind else ''}"


def percentile_points(rule: Threshold) -> list[float]:
    """The percentiles (0-100, linear interpolation as numpy's default) a rule needs of its score."""
    out = []
    if rule.drop_bottom_pct is not None:
        out.append(rule.drop_bottom_pct)
    if rule.drop_top_pct is not None:
        out.append(100 - rule.drop_top_pct)
    return out


def resolve_bounds(rule: Threshold, percentiles: dict[float, float | None]) -> list[Bound]:
    """The rule's bounds, given its `percentile_points` computed over the usable, scored clips (None when
    no clip has the score: a percentile rule then drops nothing)."""
    bounds: list[Bound] = []
    if rule.min is not None:
        bounds.append(Bound("min", "min", float(rule.min), True))
    if rule.max is not None:
        bounds.append(Bound("max", "max", float(rule.max), False))
    if rule.drop_bottom_pct is not None and percentiles.get(rule.drop_bottom_pct) is not None:
        bounds.append(Bound("drop_bottom_pct", f"bottom {rule.drop_bottom_pct:g}%",
                            float(percentiles[rule.drop_bottom_pct]), True))
    if rule.drop_top_pct is not None and percentiles.get(100 - rule.drop_top_pct) is not None:
        bounds.append(Bound("drop_top_pct", f"top {rule.drop_top_pct:g}%",
                            float(percentiles[100 - rule.drop_top_pct]), False))
    return bounds


def apply_thresholds(clips: pd.DataFrame, thresholds: dict[str, Threshold]) -> tuple[pd.DataFrame, list[FunnelStep]]:
    """Returns `clips` with `keep`, `decision` (why not kept, "" when kept), `reason_code` and one
    `pass_<score>` column per rule, and the funnel from usable clips through each rule. In memory: the
    reference for small frames and tests; runs decide file by file (curation/post/decisions.py)."""
    check_names(thresholds, [c for c in clips.columns if clips[c].dtype.kind == "f"], clips.columns)
    _check_comparable(clips, thresholds)
    usable = (clips["status"] == "ok").to_numpy()
    bounds = {}
    for name, rule in thresholds.items():
        values = pd.to_numeric(clips[name], errors="coerce").to_numpy(dtype=float)
        scored = values[usable & ~np.isnan(values)]
        bounds[name] = resolve_bounds(rule, {p: float(np.percentile(scored, p)) if scored.size else None
                                             for p in percentile_points(rule)})
    out, funnel = decide_block(clips, bounds)
    return out, funnel


def check_names(thresholds: dict[str, Threshold], score_columns: list[str], columns) -> None:
    missing = [name for name in thresholds if name not in columns]
    if missing:
        raise ValueError(f"thresholds name scores the ledger does not have: {missing}; "
                         f"available score columns: {sorted(score_columns)}")


def decide_block(clips: pd.DataFrame, bounds: dict[str, list[Bound]]) -> tuple[pd.DataFrame, list[FunnelStep]]:
    """Applies resolved bounds (rules in order) to one block of clips: keep, decision, reason_code,
    reason_detail and pass_<score>; the funnel counts are this block's."""
    out = clips.copy()
    usable = (out["status"] == "ok").to_numpy()
    decision = np.where(usable, "", out["status"].astype(str) + ": " + out["reason"].fillna("").astype(str))
    code = np.where(usable, None, out["reason_code"].to_numpy(dtype=object)) if "reason_code" in out.columns \
        else np.full(len(out), None, dtype=object)
    keep = usable.copy()
    funnel = [FunnelStep("usable clips", int(usable.sum()))]
    for name, rule_bounds in bounds.items():
        values = pd.to_numeric(out[name], errors="coerce").to_numpy(dtype=float)
        passed, why, why_code = _evaluate(name, values, rule_bounds)
        out[f"pass_{name}"] = passed
        newly_dropped = keep & ~passed
        decision = np.where(newly_dropped, why, decision)
        code = np.where(newly_dropped, why_code, code)
        keep &= passed
        funnel.append(FunnelStep(name, int(keep.sum())))
    out["keep"] = keep
    out["decision"] = decision
    out["reason_code"] = code
    detail = out["reason_detail"].to_numpy(dtype=object) if "reason_detail" in out.columns else np.full(len(out), None)
    out["reason_detail"] = np.where(keep, None, np.where(usable, decision, detail))
    return out, funnel


def _evaluate(name: str, values: np.ndarray, bounds: list[Bound]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    present = ~np.isnan(values)
    passed = present.copy()
    why = np.where(present, "", f"{name}: missing score")
    code = np.where(present, None, f"{name}_missing").astype(object)
    for b in bounds:
        # strict comparisons: a value equal to the bound passes, so "drop bottom 0%" drops nothing
        with np.errstate(invalid="ignore"):
            fail = present & ((values < b.value) if b.lower else (values > b.value))
        sign = "<" if b.lower else ">"
        first = fail & passed
        if first.any():
            text = np.array([f"{name} {v:.4g} {sign} {b.label} {b.value:.4g}" if f else "" for v, f in zip(values, first)],
                            dtype=object)
            why = np.where(first, text, why)
            code = np.where(first, f"{name}_{b.code}", code)
        passed &= ~fail
    return passed, why, code


def _check_comparable(clips: pd.DataFrame, thresholds: dict[str, Threshold]) -> None:
    # Text-area scores from different OCR engines are on different scales: a threshold set for one
    # engine means something else for the other.
    if "text_area" in thresholds and "text_engine" in clips.columns:
        engines = sorted(e for e in clips.loc[clips["status"] == "ok", "text_engine"].dropna().unique() if e)
        if len(engines) > 1:
            raise ValueError(f"text_area scores come from several OCR engines {engines}; thresholds are per "
                             "engine: re-score the run with one engine (text.engine) before thresholding")
    # Aesthetic and similarity scores of different CLIP models (or heads) are not comparable either.
    clip_scores = [n for n in ("aesthetic", "caption_similarity") if n in thresholds]
    if clip_scores and "clip_model" in clips.columns:
        models = sorted(m for m in clips.loc[clips["status"] == "ok", "clip_model"].dropna().unique() if m)
        if len(models) > 1:
            raise ValueError(f"{', '.join(clip_scores)} scores come from several CLIP models {models}; thresholds "
                             "are per model: re-score the run with one clip.checkpoint before thresholding")
