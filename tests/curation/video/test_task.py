"""The per-video task: one decode whose memory does not grow with the video's length."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from curation.testing.synthetic import moving_square, write_video

REPO = Path(__file__).resolve().parents[3]

PEAK_RSS = """
import resource, sys
from curation.config import CurationConfig
from curation.video.task import prepare, process_video
cfg = CurationConfig.model_validate({"output": sys.argv[2], "clips": {"mode": "none"}})
out = process_video(sys.argv[1], "v", prepare(sys.argv[1], cfg.decode.max_pixels), cfg, sys.argv[2])
assert out.video["status"] == "ok", out.video
print(out.video["num_frames"], len(out.clips), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak(video: Path, tmp: Path) -> tuple[int, int, int]:
    res = subprocess.run([sys.executable, "-c", PEAK_RSS, str(video), str(tmp)], capture_output=True, text=True,
                         cwd=REPO, check=True)
    frames, clips, peak_mb = map(int, res.stdout.split())
    return frames, clips, peak_mb


def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    short = write_video(tmp_path / "short.mp4", moving_square(240, speed=3), 24)      # 10 s
    long = write_video(tmp_path / "long.mp4", moving_square(240 * 12, speed=3), 24)   # 2 min
    f_short, c_short, mb_short = _peak(short, tmp_path)
    f_long, c_long, mb_long = _peak(long, tmp_path)
    assert (f_short, f_long) == (240, 2880)
    assert c_long > c_short  # over-long scenes were split into clips
    # holding the 2880 working frames (128 x 228 RGB) would take ~250 MB more
    assert mb_long - mb_short < 40, (mb_short, mb_long)


def test_sampled_key_frames_are_the_decoded_frames_inside_each_clip_near_first_middle_last(tmp_path):
    import numpy as np

    from curation.config import CurationConfig
    from curation.video.media import DecodeStats, decode_frames, probe
    from curation.testing.synthetic import hard_cuts
    from curation.video.task import decode_jpegs, key_frame_indices, prepare, process_video

    path = write_video(tmp_path / "shots.mp4", hard_cuts([40, 90], 150), 24)
    outs = {}
    for mode in ("sampled", "exact"):
        cfg = CurationConfig.model_validate({"output": str(tmp_path), "clips": {"mode": "none"},
                                             "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0},
                                             "decode": {"key_frames": mode, "key_frame_fps": 4}})
        outs[mode] = process_video(str(path), "v", prepare(str(path), cfg.decode.max_pixels), cfg, str(tmp_path))
    # the same frames as a plain decode at key-frame size: nothing was decoded a second time
    stats = DecodeStats()
    reference = {i: f for i, _, f in decode_frames(str(path), probe(str(path)), 768, stats)}
    usable = [c for c in outs["sampled"].clips if c["status"] == "ok"]
    assert len(usable) == 3
    for clip, exact in zip(usable, [c for c in outs["exact"].clips if c["status"] == "ok"]):
        start, end = clip["start_frame"], clip["end_frame"]
        picked = clip["key_frame_indices"]
        assert exact["key_frame_indices"] == list(key_frame_indices(start, end))
        assert all(start <= i < end for i in picked)
        assert all(abs(i - j) < 6 for i, j in zip(picked, exact["key_frame_indices"]))  # < 24 fps / 4
        frames = decode_jpegs(outs["sampled"].key_frames[clip["clip_id"]])
        for frame, index in zip(frames, picked):
            assert np.abs(frame.astype(int) - reference[index].astype(int)).mean() < 3  # JPEG q95


def test_clip_frames_for_the_video_captioner_are_evenly_spaced_inside_each_clip(tmp_path):
    import numpy as np

    from curation.config import CurationConfig
    from curation.testing.synthetic import hard_cuts
    from curation.video.task import decode_jpegs, evenly_spaced, prepare, process_video

    assert evenly_spaced(0, 100, 5) == (0, 25, 50, 74, 99)
    assert evenly_spaced(10, 13, 8) == (10, 11, 12)  # a short clip gives fewer, distinct frames
    path = write_video(tmp_path / "shots.mp4", hard_cuts([40, 90], 150), 24)
    for mode in ("sampled", "exact"):
        tree = {"output": str(tmp_path), "clips": {"mode": "none"}, "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0},
                "decode": {"key_frames": mode, "key_frame_fps": 8},
                "caption": {"video": {"num_frames": 5}, "image": {"enabled": False}, "summary": {"enabled": False}}}
        cfg = CurationConfig.model_validate(tree)
        assert cfg.clip_frames_per_clip() == 5
        out = process_video(str(path), "v", prepare(str(path), cfg.decode.max_pixels), cfg, str(tmp_path))
        usable = [c for c in out.clips if c["status"] == "ok"]
        assert len(usable) == 3
        for clip in usable:
            frames = decode_jpegs(out.clip_frames[clip["clip_id"]])
            assert len(frames) == 5 and frames.shape[1:] == decode_jpegs(out.key_frames[clip["clip_id"]]).shape[1:]
            # the moving square advances between the frames: they are distinct moments of the clip
            assert all(np.abs(frames[k].astype(int) - frames[k + 1].astype(int)).mean() > 0.5 for k in range(4))
        # nothing extra when no stage asks for more than the key frames
        off = CurationConfig.model_validate({**tree, "caption": {**tree["caption"], "video": {"num_frames": 3}}})
        assert off.clip_frames_per_clip() == 0


def test_a_clip_cut_is_bounded_and_counts_as_progress(monkeypatch):
    """ffmpeg cutting a clip beats for the stall limit while it runs, and is ended by the clip's own limit."""
    import time

    import curation.video.task as video_task

    beats = []
    monkeypatch.setattr(video_task, "heartbeat", lambda: beats.append(time.monotonic()))
    t = time.monotonic()
    code, stderr = video_task._run_ffmpeg(["sleep", "30"], limit_s=2.5)
    assert (code, stderr) == (-1, "timeout: no clip within 2 s") and time.monotonic() - t < 10
    assert len(beats) >= 2 and max(b - a for a, b in zip(beats, beats[1:])) < 1.5
    assert video_task._run_ffmpeg(["sh", "-c", "echo bad >&2; exit 3"], limit_s=10) == (3, "bad\n")


def test_dropped_clips_get_a_thumbnail_strip_of_their_own_frames(tmp_path):
    """A half-second shot between two cuts is dropped as too short; its strip still shows that shot (the
    report lets a user check the cut decision), in both key-frame modes, also when no sample (every 48
    frames) lies inside it."""
    import cv2
    import numpy as np

    from curation.config import CurationConfig
    from curation.video.media import DecodeStats, decode_frames, probe
    from curation.testing.synthetic import hard_cuts
    from curation.video.task import prepare, process_video

    path = write_video(tmp_path / "shots.mp4", hard_cuts([50, 62], 120), 24)
    stats = DecodeStats()
    frames = {i: f for i, _, f in decode_frames(str(path), probe(str(path)), 128, stats)}
    shot_colour = {k: frames[i].reshape(-1, 3).mean(0) for k, i in ((0, 20), (1, 56), (2, 90))}
    for mode in ("sampled", "exact"):
        cfg = CurationConfig.model_validate({"output": str(tmp_path / mode), "clips": {"mode": "none"},
                                             "cuts": {"clip_min_s": 1.0, "clip_max_s": 4.0},
                                             "decode": {"key_frames": mode, "key_frame_fps": 0.5}})
        out = process_video(str(path), "v", prepare(str(path), cfg.decode.max_pixels), cfg, str(tmp_path / mode))
        dropped = [c for c in out.clips if c["status"] == "dropped"]
        assert [(c["start_frame"], c["end_frame"]) for c in dropped] == [(52, 60)], out.clips
        assert all(c.get("thumb_path") for c in out.clips), mode
        strip = cv2.imread(str(tmp_path / mode / dropped[0]["thumb_path"]))[..., ::-1]
        colour = strip.reshape(-1, 3).mean(0)
        nearest = min(shot_colour, key=lambda k: np.abs(shot_colour[k] - colour).sum())
        assert nearest == 1, (mode, colour, shot_colour)
