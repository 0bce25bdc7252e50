import numpy as np
import pandas as pd
import pytest

from common.config import ConfigError, validate
from curation.post.thresholds import Threshold, apply_thresholds


def _clips(motion, text, status=None):
    n = len(motion)
    return pd.DataFrame({
        "clip_id": [f"c{i}" for i in range(n)],
        "status": status or ["ok"] * n,
        "reason": [None] * n,
        "motion_score": np.array(motion, dtype=float),
        "text_area": np.array(text, dtype=float),
        "text_engine": ["easyocr"] * n,
    })


def test_fixed_bounds_in_order_with_funnel_and_first_failing_reason():
    clips = _clips([0.0, 0.05, 0.2, 0.5, np.nan], [0.0, 0.2, 0.01, 0.0, 0.0])
    rules = {"motion_score": Threshold(min=0.01, max=0.3), "text_area": Threshold(max=0.07)}
    out, funnel = apply_thresholds(clips, rules)
    assert out["keep"].tolist() == [False, False, True, False, False]
    assert [(s.name, s.count) for s in funnel] == [("usable clips", 5), ("motion_score", 2), ("text_area", 1)]
    assert out["decision"][0] == "motion_score 0 < min 0.01"
    assert out["decision"][1] == "text_area 0.2 > max 0.07"
    assert out["decision"][3] == "motion_score 0.5 > max 0.3"
    assert out["decision"][4] == "motion_score: missing score"
    assert out["pass_text_area"].tolist() == [True, False, True, True, True]


def test_bottom_percent_drops_that_share_of_scored_clips_and_ignores_unusable_ones():
    motion = np.arange(100, dtype=float)
    status = ["ok"] * 100
    clips = _clips(list(motion) + [-5.0], [0.0] * 101, status + ["dropped"])
    clips.loc[100, "reason"] = "too_short: 1.0 s < clip_min_s 2.0"
    out, _ = apply_thresholds(clips, {"motion_score": Threshold(drop_bottom_pct=30)})
    assert int(out["keep"].sum()) == 70 and not out["keep"][:30].any()
    assert out["decision"][100] == "dropped: too_short: 1.0 s < clip_min_s 2.0"
    # changing a threshold is a pure function of the stored scores
    out2, _ = apply_thresholds(out, {"motion_score": Threshold(drop_bottom_pct=50)})
    assert int(out2["keep"].sum()) == 50


def test_unknown_score_and_mixed_engines_are_clear_errors():
    clips = _clips([0.1], [0.1])
    with pytest.raises(ValueError, match="available score columns"):
        apply_thresholds(clips, {"aesthetics": Threshold(min=5)})
    mixed = _clips([0.1, 0.1], [0.1, 0.1])
    mixed["text_engine"] = ["easyocr", "rapidocr"]
    with pytest.raises(ValueError, match="per engine"):
        apply_thresholds(mixed, {"text_area": Threshold(max=0.07)})
    two_clips = _clips([0.1, 0.1], [0.1, 0.1]).assign(aesthetic=[5.0, 6.0], clip_model=["a", "b"])
    with pytest.raises(ValueError, match="several CLIP models"):
        apply_thresholds(two_clips, {"aesthetic": Threshold(min=5.5)})
    one_model = two_clips.assign(clip_model=["a", "a"])
    assert apply_thresholds(one_model, {"aesthetic": Threshold(min=5.5)})[0]["keep"].tolist() == [False, True]


@pytest.mark.parametrize("tree, fix", [
    ({}, "at least one of"),
    ({"min": 2, "max": 1}, "swap them"),
    ({"drop_bottom_pct": 120}, r"\[0, 100\)"),
])
def test_bad_rules_name_the_fix(tree, fix):
    with pytest.raises(ConfigError, match=fix):
        validate(Threshold, tree)
