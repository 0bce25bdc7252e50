"""The ffmpeg that cuts clip files reads a video only with the demuxer the probe opened it with, under the probe's
allow-lists: a file that turns out to be a concat list or a playlist (swapped after the probe, or probed
differently by ffmpeg's own libraries) is not followed to the files named inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.testing.synthetic import moving_square, write_video

CONCAT_LIST = "ffconcat version 1.0\nfile other.mp4\n"
HLS_PLAYLIST = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nother.ts\n#EXT-X-ENDLIST\n"


def _clip_row(clip_id: str) -> dict:
    return {"status": "ok", "clip_id": clip_id, "start_s": 0.5, "end_s": 1.5, "duration_s": 1.0, "num_frames": 12,
            "start_frame": 6, "end_frame": 18, "fps": 12.0}


@pytest.mark.parametrize("mode", ["copy", "reencode"])
def test_clip_ffmpeg_uses_the_probed_demuxer_and_does_not_follow_lists(tmp_path, mode):
    from curation.config import CurationConfig
    from curation.video.media import ALLOWED_DEMUXERS, ffmpeg_input_args, probe
    from curation.video.task import _write_clip_files

    video = write_video(tmp_path / "v.mp4", moving_square(48, h=48, w=64), 12)
    # what a list inside the "video" would pull in: other videos next to it, readable by ffmpeg
    write_video(tmp_path / "other.mp4", moving_square(48, h=48, w=64, speed=2), 12)
    write_video(tmp_path / "other.ts", moving_square(48, h=48, w=64, speed=2), 12)
    info = probe(str(video))
    args = ffmpeg_input_args(str(video), info)
    assert args == ["-protocol_whitelist", "file", "-format_whitelist", ALLOWED_DEMUXERS, "-f", "mov",
                    "-i", f"file:{video}"]
    config = CurationConfig.model_validate({"output": str(tmp_path), "clips": {"mode": mode}})
    out = tmp_path / "clips"

    rows = [_clip_row("real")]
    _write_clip_files(str(video), info, rows, out, config)
    assert rows[0]["status"] == "ok", rows[0]
    # 1 s at 12 fps; a copy starts at the keyframe at or before 0.5 s (frame 0 here)
    assert probe(rows[0]["clip_path"]).num_frames in (range(12, 21) if mode == "copy" else [12])

    for name, text in (("concat", CONCAT_LIST), ("hls", HLS_PLAYLIST)):
        video.write_text(text)  # same name, same probe result: only its content changed
        rows = [_clip_row(name)]
        _write_clip_files(str(video), info, rows, out, config)
        assert rows[0]["status"] == "failed", (name, rows[0])
        assert rows[0]["reason"].startswith("clip_file: ffmpeg failed")
        assert not (out / f"{name}.mp4").exists()
    assert sorted(p.name for p in out.iterdir()) == ["real.mp4"]  # no temporary file left either


def test_every_allowed_container_cuts_with_its_probed_demuxer(tmp_path):
    """The demuxer name the probe keeps is one ffmpeg's -f accepts, for the containers lvd writes in tests."""
    from curation.config import CurationConfig
    from curation.video.media import probe
    from curation.video.task import _write_clip_files

    config = CurationConfig.model_validate({"output": str(tmp_path), "clips": {"mode": "reencode"}})
    for suffix, codec, demuxer in ((".mkv", "libx264", "matroska"), (".ts", "libx264", "mpegts"),
                                   (".avi", "mjpeg", "avi"), (".y4m", "rawvideo", "yuv4mpegpipe")):
        pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        video = write_video(tmp_path / f"v{suffix}", moving_square(24, h=48, w=64), 12, codec=codec, pix_fmt=pix_fmt)
        info = probe(str(video))
        assert info.demuxer == demuxer
        rows = [_clip_row(f"c{suffix[1:]}")]
        _write_clip_files(str(video), info, rows, tmp_path / "clips", config)
        assert rows[0]["status"] == "ok", (suffix, rows[0])
        assert Path(rows[0]["clip_path"]).stat().st_size > 0
