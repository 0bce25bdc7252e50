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


def apply_thresholds(clips: pd.DataFrame, thresholds: dict[str, Threshold]) -> tuple[pd.DataFrame, list[FunnelStep]]:
    """Returns `clips` with `keep`, `decision` (why not kept, "" when kept) and one `pass_<score>` column
    per rule, and the funnel from usable clips through each rule."""
    missing = [name for name in thresholds if name not in clips.columns]
    if missing:
        scores = sorted(c for c in clips.columns if clips[c].dtype.kind == "f")
        raise ValueError(f"thresholds name scores the ledger does not have: {missing}; "
                         f"available score columns: {scores}")
    _check_comparable(clips, thresholds)
    out = clips.copy()
    usable = (out["status"] == "ok").to_numpy()
    decision = np.where(usable, "", out["status"].astype(str) + ": " + out["reason"].fillna("").astype(str))
    keep = usable.copy()
    funnel = [FunnelStep("usable clips", int(usable.sum()))]
    for name, rule in thresholds.items():
        values = pd.to_numeric(out[name], errors="coerce").to_numpy(dtype=float)
        passed, why = _evaluate(name, values, rule, usable)
        out[f"pass_{name}"] = passed
        newly_dropped = keep & ~passed
        decision = np.where(newly_dropped, why, decision)
        keep &= passed
        funnel.append(FunnelStep(name, int(keep.sum())))
    out["keep"] = keep
    out["decision"] = decision
    return out, funnel


def _evaluate(name: str, values: np.ndarray, rule: Threshold, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    present = ~np.isnan(values)
    passed = present.copy()
    why = np.where(present, "", f"{name}: missing score")
    scored = values[usable & present]
    bounds: list[tuple[str, float, bool]] = []  # (label, value, is_lower)
    if rule.min is not None:
        bounds.append(("min", rule.min, True))
    if rule.max is not None:
        bounds.append(("max", rule.max, False))
    if rule.drop_bottom_pct is not None and scored.size:
        bounds.append((f"bottom {rule.drop_bottom_pct:g}%", float(np.percentile(scored, rule.drop_bottom_pct)), True))
    if rule.drop_top_pct is not None and scored.size:
        bounds.append((f"top {rule.drop_top_pct:g}%", float(np.percentile(scored, 100 - rule.drop_top_pct)), False))
    for label, bound, lower in bounds:
        # strict comparisons: a value equal to the bound passes, so "drop bottom 0%" drops nothing
        with np.errstate(invalid="ignore"):
            fail = present & ((values < bound) if lower else (values > bound))
        sign = "<" if lower else ">"
        text = np.array([f"{name} {v:.4g} {sign} {label} {bound:.4g}" for v in values], dtype=object)
        why = np.where(fail & passed, text, why)
        passed &= ~fail
    return passed, why


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
