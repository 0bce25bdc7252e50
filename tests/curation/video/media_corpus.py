"""A corpus of bad (and awkward but usable) media, generated small and fast, with the outcome each must have.

    write_bad_media_corpus(out_dir) -> {name: path}

`EXPECTED[name]` is "usable" (probes and decodes), "timeout" (blocks forever: only a time limit ends it), or
the `MediaError` reason code the file must be rejected with ("not_a_video" for "not_a_video: ...").
`FACTS[name]` holds what a usable file must come out as. Files are made with PyAV and the ffmpeg that
imageio-ffmpeg ships (argument lists, never a shell), plus plain file operations.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

from curation.testing.synthetic import moving_square, write_video

USABLE = "usable"
TIMEOUT = "timeout"

# The shared base video: 144 x 256, 24 fps, key frame every 24 frames.
BASE_W, BASE_H, BASE_FPS, BASE_FRAMES = 256, 144, 24, 48
CORRUPT_FRAMES = 96
UNICODE_NAME = "clip ünïcødé 映像.mp4"
# Frame times of the variable-frame-rate file: runs at 24 fps with held frames (a gap of two or three
# frame periods), as a phone or screen recorder writes when it drops frames.
VFR_TIMES_S = [round(t, 6) for t in np.cumsum([0.0] + [1 / 24, 1 / 24, 2 / 24, 1 / 24, 3 / 24] * 6)[:30]]
# 6144 x 6144 = 37.7 Mpx > the default max_pixels (8K, 33.2 Mpx), still a legal H.264 size.
HUGE_SIDE = 6144
# High and low frame rates come small: 240 fps for 1.2 s is 288 frames.
SMALL_W, SMALL_H = 128, 72

EXPECTED: dict[str, str] = {
    "valid": USABLE,
    "truncated": "not_a_video",  # moov (the index) is at the end of the file and was cut off
    "truncated_faststart": USABLE,  # index first: the first half of the frames still decodes
    "zero_byte": "zero_byte",
    "not_a_video": "not_a_video",  # text with an .mp4 name
    "audio_only": "no_video_stream",
    "audio_with_cover_art": "no_video_stream",  # a picture stream that is cover art, not video
    "one_frame": "too_few_frames",
    "tiny_1x1": "too_small",
    "huge_resolution": "resolution_too_large",
    "vfr": USABLE,
    "delayed_start": USABLE,  # the video starts 1 s after the container's zero (an empty edit)
    "rotated": USABLE,
    "non_square": USABLE,
    "corrupt_packets": USABLE,  # a few packets fail; they are skipped and counted
    "wrong_extension": USABLE,  # an mp4 named .avi: ffmpeg reads the content, not the name
    "unreadable": "unreadable",  # a dangling symlink (tests run as root: chmod 000 would still read)
    "unicode_path": USABLE,
    "playlist": "not_a_video",  # an ffconcat list naming another file: must not be followed
    "hang": TIMEOUT,  # a FIFO nobody writes to: opening it blocks forever
    # codecs and containers mp4 cannot hold: they decode, and their clips are re-encoded, not lost
    "gif_in_mp4": USABLE,  # a GIF named .mp4
    "qtrle_alpha": USABLE,  # QuickTime Animation (RLE) with an alpha channel, in .mov
    "y4m_huge": "resolution_too_large",  # a YUV4MPEG2 header declaring 16384 x 16384 (ffmpeg says EBUSY)
    "hevc_10bit": USABLE,
    "vp9": USABLE,
    "av1": USABLE,
    "mjpeg": USABLE,
    "two_video_streams": USABLE,  # Matroska with two video streams: the first is curated
    "interlaced_mpeg2": USABLE,
    "fps_240": USABLE,
    "fps_half": USABLE,  # 0.5 fps: too few frames per second for a motion pair, but decodable
    "yuv444p": USABLE,
    "rgb24": USABLE,
    "gray16": USABLE,
    "vp9_alpha": USABLE,
    "edit_list": USABLE,  # an mp4 edit list hiding the first 0.5 s (pre-roll frames with negative times)
    "negative_start": USABLE,  # Matroska with timestamps starting below zero (they read back as none)
    "symlink_loop": "unreadable",  # loop_a.mp4 -> loop_b.mp4 -> loop_a.mp4
    "folder_named_mp4": USABLE,  # a folder named x.mp4 is walked as a folder: the video inside is curated
}
# Kinds whose encoder this ffmpeg build may lack: left out of the corpus (with a note) when it does.
ENCODERS = {"hevc_10bit": "libx265", "vp9": "libvpx-vp9", "vp9_alpha": "libvpx-vp9", "av1": "libsvtav1",
            "rgb24": "libx264rgb"}
# Usable kinds left too short for a clip once decoded; every other usable kind must yield clips.
TOO_SHORT = {"truncated_faststart"}
# The input to give for a kind, when it is not the file itself.
INPUT_IS_PARENT = {"folder_named_mp4"}
# Kinds whose copy into mp4 fails, or would carry broken packets: their clips must come out re-encoded to H.264.
REENCODED = {"gif_in_mp4", "qtrle_alpha", "negative_start", "corrupt_packets"}

# What usable files must come out as (display size, frame count, ...).
FACTS: dict[str, dict] = {
    "valid": {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES, "rotation": 0},
    "truncated_faststart": {"width": BASE_W, "height": BASE_H, "max_frames": BASE_FRAMES - 1},
    "vfr": {"width": BASE_W, "height": BASE_H, "num_frames": len(VFR_TIMES_S), "times_s": VFR_TIMES_S},
    "delayed_start": {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES, "start_time_s": 1.0},
    # ffmpeg's -display_rotation 90 is counterclockwise; upright means turning it 270 clockwise.
    "rotated": {"width": BASE_H, "height": BASE_W, "num_frames": BASE_FRAMES, "rotation": 270},
    "non_square": {"width": round(BASE_W * 16 / 11), "height": BASE_H, "num_frames": BASE_FRAMES, "sar": 16 / 11},
    "corrupt_packets": {"width": BASE_W, "height": BASE_H, "max_frames": CORRUPT_FRAMES - 1},
    "wrong_extension": {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES},
    "unicode_path": {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES},
    "gif_in_mp4": {"width": BASE_W, "height": BASE_H, "num_frames": 50, "fps": 25.0},  # GIF delays are in 1/100 s
    **{name: {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES, "fps": BASE_FPS}
       for name in ("qtrle_alpha", "hevc_10bit", "vp9", "vp9_alpha", "av1", "mjpeg", "two_video_streams",
                    "interlaced_mpeg2", "yuv444p", "rgb24", "gray16", "negative_start", "folder_named_mp4")},
    "edit_list": {"width": BASE_W, "height": BASE_H, "num_frames": BASE_FRAMES - 12},  # 0.5 s hidden
    "fps_240": {"width": SMALL_W, "height": SMALL_H, "num_frames": 288, "fps": 240.0},
    "fps_half": {"width": SMALL_W, "height": SMALL_H, "num_frames": 5, "fps": 0.5},
}


def write_bad_media_corpus(out_dir: Path) -> dict[str, Path]:
    """Writes every file of `EXPECTED` into `out_dir` (about 0.5 MB, a few seconds); returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    valid = write_video(out / "valid.mp4", moving_square(BASE_FRAMES, BASE_H, BASE_W, speed=5), BASE_FPS, gop=24)
    paths["valid"] = valid

    data = valid.read_bytes()
    paths["truncated"] = _write_bytes(out / "truncated.mp4", data[: len(data) // 2])
    faststart = _ffmpeg(out / "faststart_full.mp4", "-i", valid, "-c", "copy", "-movflags", "+faststart")
    fs_data = faststart.read_bytes()
    paths["truncated_faststart"] = _write_bytes(out / "truncated_faststart.mp4", fs_data[: len(fs_data) // 2])
    faststart.unlink()

    paths["zero_byte"] = _write_bytes(out / "zero_byte.mp4", b"")
    paths["not_a_video"] = _write_bytes(out / "not_a_video.mp4", b"This is a text file, not a video.\n" * 30)

    paths["audio_only"] = _ffmpeg(out / "audio_only.mp4", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                                  "-c:a", "aac")
    cover = _ffmpeg(out / "cover.png", "-f", "lavfi", "-i", "color=c=orange:s=64x64", "-frames:v", "1")
    paths["audio_with_cover_art"] = _ffmpeg(
        out / "audio_with_cover_art.m4a", "-i", paths["audio_only"], "-i", cover, "-map", "0", "-map", "1",
        "-c", "copy", "-disposition:v:0", "attached_pic")
    cover.unlink()

    paths["one_frame"] = write_video(out / "one_frame.mp4", moving_square(1, BASE_H, BASE_W), BASE_FPS)
    # H.264 cannot code odd sizes; FFV1 in Matroska can code 1 x 1.
    paths["tiny_1x1"] = _ffmpeg(out / "tiny_1x1.mkv", "-f", "lavfi", "-i", "color=c=red:s=1x1:r=24:d=0.5",
                                "-c:v", "ffv1")
    # One flat frame: ~0.1 MB on disk, 37.7 Mpx once decoded.
    paths["huge_resolution"] = _ffmpeg(
        out / "huge_resolution.mp4", "-f", "lavfi", "-i", f"color=c=blue:s={HUGE_SIDE}x{HUGE_SIDE}:r=1",
        "-frames:v", "1", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")

    paths["vfr"] = _write_vfr(out / "vfr.mp4")
    paths["delayed_start"] = _ffmpeg(out / "delayed_start.mp4", "-itsoffset", "1.0", "-i", valid, "-c", "copy")
    paths["rotated"] = _ffmpeg(out / "rotated.mp4", "-display_rotation", "90", "-i", valid, "-c", "copy")
    paths["non_square"] = _ffmpeg(out / "non_square.mp4", "-i", valid, "-c", "copy",
                                  "-bsf:v", "h264_metadata=sample_aspect_ratio=16/11")
    paths["corrupt_packets"] = _write_corrupt(out / "corrupt_packets.mp4")

    paths["wrong_extension"] = Path(shutil.copyfile(valid, out / "wrong_extension.avi"))
    paths["unreadable"] = _symlink(out / "unreadable.mp4", out / "does_not_exist.mp4")
    paths["unicode_path"] = Path(shutil.copyfile(valid, out / UNICODE_NAME))
    paths["playlist"] = _write_bytes(out / "playlist.mp4",
                                     f"ffconcat version 1.0\nfile '{valid.resolve()}'\n".encode())

    _write_codecs(out, valid, paths)

    hang = out / "hang.mp4"
    if hang.exists() or hang.is_symlink():
        hang.unlink()
    os.mkfifo(hang)
    paths["hang"] = hang

    absent = set(EXPECTED) - set(paths)
    assert absent <= set(ENCODERS) and set(paths) <= set(EXPECTED), f"corpus and EXPECTED disagree: {set(paths) ^ set(EXPECTED)}"
    return paths


def corpus_input(name: str, path: Path) -> Path:
    """What a run is given for a kind: the file, or the folder that holds it."""
    return path.parent if name in INPUT_IS_PARENT else path


def _write_codecs(out: Path, valid: Path, paths: dict[str, Path]) -> None:
    """Codecs, pixel formats, frame rates and containers beyond H.264 in mp4, each transcoded from `valid`."""
    available = _encoders()
    made = {
        "gif_in_mp4": ("gif_in_mp4.mp4", "-i", valid, "-r", "25", "-f", "gif"),
        "qtrle_alpha": ("qtrle_alpha.mov", "-i", valid, "-vf", "format=argb,colorchannelmixer=aa=0.5", "-c:v", "qtrle"),
        "hevc_10bit": ("hevc_10bit.mp4", "-i", valid, "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt",
                       "yuv420p10le", "-x265-params", "log-level=error", "-tag:v", "hvc1"),
        "vp9": ("vp9.webm", "-i", valid, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k"),
        "vp9_alpha": ("vp9_alpha.webm", "-i", valid, "-vf", "format=yuva420p", "-c:v", "libvpx-vp9", "-deadline",
                      "realtime", "-cpu-used", "8", "-b:v", "200k"),
        "av1": ("av1.mp4", "-i", valid, "-c:v", "libsvtav1", "-preset", "12", "-svtav1-params", "log-level=0"),
        "mjpeg": ("mjpeg.avi", "-i", valid, "-c:v", "mjpeg", "-q:v", "5"),
        "two_video_streams": ("two_video_streams.mkv", "-i", valid, "-i", valid, "-map", "0:v", "-map", "1:v",
                              "-c", "copy"),
        "interlaced_mpeg2": ("interlaced_mpeg2.mpg", "-i", valid, "-vf", "setfield=tff", "-c:v", "mpeg2video",
                             "-flags", "+ilme+ildct", "-b:v", "1M"),
        "yuv444p": ("yuv444p.mp4", "-i", valid, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"),
        "rgb24": ("rgb24.mkv", "-i", valid, "-c:v", "libx264rgb", "-preset", "ultrafast", "-pix_fmt", "rgb24"),
        "gray16": ("gray16.mkv", "-i", valid, "-c:v", "ffv1", "-pix_fmt", "gray16le"),
        # copy from 0.5 s: the mov muxer keeps the GOP's earlier frames and hides them behind an edit list
        "edit_list": ("edit_list.mp4", "-ss", "0.5", "-i", valid, "-c", "copy"),
        "negative_start": ("negative_start.mkv", "-i", valid, "-c", "copy", "-output_ts_offset", "-0.5",
                           "-avoid_negative_ts", "disabled"),
    }
    for name, (file_name, *args) in made.items():
        encoder = ENCODERS.get(name)
        if encoder is not None and encoder not in available:
            print(f"media corpus: {name} left out: this ffmpeg has no {encoder} encoder", file=sys.stderr)
            continue
        paths[name] = _ffmpeg(out / file_name, *args)
    paths["fps_240"] = write_video(out / "fps_240.mp4", moving_square(288, SMALL_H, SMALL_W, speed=1), 240, gop=240)
    paths["fps_half"] = write_video(out / "fps_half.mp4", moving_square(5, SMALL_H, SMALL_W, speed=8), 0.5, gop=5)
    # a header declaring 16384 x 16384 and a few bytes of picture
    paths["y4m_huge"] = _write_bytes(out / "y4m_huge.y4m",
                                     b"YUV4MPEG2 W16384 H16384 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096))
    paths["symlink_loop"] = _symlink(out / "loop_a.mp4", out / "loop_b.mp4")
    _symlink(out / "loop_b.mp4", out / "loop_a.mp4")
    folder = out / "x.mp4"
    folder.mkdir(exist_ok=True)
    paths["folder_named_mp4"] = Path(shutil.copyfile(valid, folder / "inside.mp4"))


def _encoders() -> set[str]:
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True,
                            text=True, timeout=60)
    return {line.split()[1] for line in result.stdout.splitlines() if len(line.split()) > 1 and line.startswith(" V")}


def _ffmpeg(out_path: Path, *args: str | Path) -> Path:
    """Runs the bundled ffmpeg with `args`, writing `out_path` (overwritten)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           *map(str, args), str(out_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making {out_path.name}: {result.stderr.strip()[-500:]}")
    return out_path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _symlink(path: Path, target: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.symlink(target, path)
    return path


def _write_vfr(path: Path) -> Path:
    """H.264 in mp4 with the frame times of VFR_TIMES_S (millisecond time base)."""
    time_base = Fraction(1, 1000)
    frames = list(moving_square(len(VFR_TIMES_S), BASE_H, BASE_W, speed=5, color_index=3))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=BASE_FPS)
        stream.width, stream.height, stream.pix_fmt = BASE_W, BASE_H, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        stream.options = {"g": "12", "preset": "veryfast", "crf": "20"}
        for t, rgb in zip(VFR_TIMES_S, frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _write_corrupt(path: Path) -> Path:
    """A valid video with random bytes over three small spans inside the media data: a few packets fail."""
    write_video(path, moving_square(CORRUPT_FRAMES, BASE_H, BASE_W, speed=5, color_index=2, seed=2), BASE_FPS, gop=24)
    data = bytearray(path.read_bytes())
    start, size = _mp4_box(data, b"mdat")
    rng = np.random.default_rng(0)
    for fraction in (0.3, 0.5, 0.7):
        offset = start + int(size * fraction)
        data[offset : offset + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _mp4_box(data: bytes | bytearray, kind: bytes) -> tuple[int, int]:
    """(offset, size) of the first top-level box of that kind in an mp4 (32-bit sizes, as PyAV writes)."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == kind:
            return pos, size
        if size < 8:
            break
        pos += size
    raise ValueError(f"no {kind!r} box in the mp4")


if __name__ == "__main__":  # python tests/curation/video/media_corpus.py OUT_DIR
    for name, p in write_bad_media_corpus(Path(sys.argv[1])).items():
        print(f"{name:22s} {EXPECTED[name]:22s} {p}")
