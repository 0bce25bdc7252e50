"""Everything done to one video, inside the isolated worker process.

probe -> one sequential low-resolution decode feeding the frame analyzers (cuts, optical flow) ->
clip spans -> the clips' key frames (a second, targeted decode) -> clip files. The returned rows go
to the ledger; key frames go on to the model stages.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from curation.config import CurationConfig
from curation.video.cuts import CutDetector, clip_spans
from curation.inputs import is_url
from curation.video.isolation import heartbeat
from curation.video.media import (DecodeStats, MediaError, VideoInfo, decode_frames, ffmpeg_input_args, probe,
                            read_frames)
from curation.video.motion import MotionAnalyzer, clip_motion, motion_bucket


@dataclass
class Prepared:
    local_path: str
    info: VideoInfo | None
    reason: str | None         # why the video cannot be used (probe failed)
    temp_dir: str | None = None  # where a remote source was fetched; removed after processing


@dataclass
class VideoOutput:
    video: dict
    clips: list[dict] = field(default_factory=list)
    key_frames: dict[str, list[bytes]] = field(default_factory=dict)  # clip_id -> first/middle/last as JPEG
    clip_frames: dict[str, list[bytes]] = field(default_factory=dict)  # clip_id -> evenly spaced frames (JPEG)


def prepare(source: str, max_pixels: int) -> Prepared:
    """Fetches a remote source to a local temporary file and probes it."""
    temp_dir = None
    local = source
    if is_url(source):
        import fsspec

        temp_dir = tempfile.mkdtemp(prefix="lvd-fetch-")
        local = os.path.join(temp_dir, "video" + os.path.splitext(source)[1])
        try:
            with fsspec.open(source, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except Exception as e:  # noqa: BLE001 - the reason goes to the ledger
            shutil.rmtree(temp_dir, ignore_errors=True)
            return Prepared(local, None, f"fetch_error: {type(e).__name__}: {e}")
    try:
        return Prepared(local, probe(local, max_pixels=max_pixels), None, temp_dir)
    except MediaError as e:
        return Prepared(local, None, e.reason, temp_dir)


def process_video(source: str, video_id: str, prepared: Prepared, config: CurationConfig, run_dir: str) -> VideoOutput:
    """Decodes the video once and returns its row, its clip rows and each usable clip's key frames (JPEG).
    Clip files go to `run_dir`/clips/<video_id>/, thumbnail strips to `run_dir`/thumbs/<video_id>/."""
    info = prepared.info
    assert info is not None
    cv2.setNumThreads(1)  # one worker process per CPU already; OpenCV's own threads would oversubscribe
    t0 = time.monotonic()
    video = video_row(source, video_id, info)
    cuts = CutDetector(config.cuts, info.fps)
    motion = MotionAnalyzer(config.motion, info.fps)
    stats = DecodeStats()
    decode = config.decode
    sampled = SampledKeyFrames() if decode.key_frames == "sampled" else None
    try:
        for index, time_s, frame in decode_frames(prepared.local_path, info, decode.short_side, stats,
                                                  on_sample=sampled.add if sampled else None,
                                                  sample_every_s=1.0 / decode.key_frame_fps,
                                                  sample_max_side=decode.key_frame_max_side):
            cuts.push(index, time_s, frame)
            motion.push(index, time_s, frame)
    except MediaError as e:
        return VideoOutput({**video, "status": "failed", "reason": e.reason, "num_corrupt": stats.num_corrupt})
    times = np.asarray(stats.times_s, dtype=np.float64)
    video.update(num_frames=stats.num_frames, num_corrupt=stats.num_corrupt)
    if stats.num_frames < 2:
        return VideoOutput({**video, "status": "failed", "reason": f"too_few_frames: {stats.num_frames} decoded"})

    fps = _effective_fps(times, info.fps)
    spans = clip_spans(cuts.finish(), fps, config.cuts)
    samples = motion.finish()
    usable = [s for s in spans if s.drop_reason is None]
    keys_of: dict[int, tuple[int, ...]] = {}  # span index -> the frames its key frames come from
    for n, span in enumerate(spans):
        if span.drop_reason is None:
            picked = sampled.pick(span.start, span.end) if sampled else None
            keys_of[n] = picked if picked is not None else key_frame_indices(span.start, span.end)
    # evenly spaced frames for a stage that looks at the clip as a video (caption.video.num_frames)
    num_clip_frames = config.clip_frames_per_clip()
    spread_of: dict[int, tuple[int, ...]] = {}
    if num_clip_frames:
        for n in keys_of:
            span = spans[n]
            picked = sampled.pick_evenly(span.start, span.end, num_clip_frames) if sampled else None
            spread_of[n] = picked if picked else evenly_spaced(span.start, span.end, num_clip_frames)
    # exact mode, and clips too short to hold a sample, read their frames in a second pass
    wanted = sorted({i for keys in (*keys_of.values(), *spread_of.values()) for i in keys
                     if not (sampled and sampled.has(i))})
    frames: dict[int, np.ndarray] = {}
    key_frame_error = "key_frames: could not decode the clip's first/middle/last frame"
    if wanted:
        try:
            frames = read_frames(prepared.local_path, info, wanted, stats.times_s, decode.key_frame_max_side,
                                 seek=stats.seek_safe)
        except MediaError as e:
            key_frame_error = f"key_frames: {e.reason}"

    # dropped clips (too short, transitions) get a strip too, so the report shows what each cut and fade
    # decision looked like; their frames come from the same samples, else from a read that cannot fail the
    # usable clips
    thumb_of = {n: (sampled.pick(s.start, s.end) if sampled else None) or key_frame_indices(s.start, s.end)
                for n, s in enumerate(spans) if s.drop_reason is not None and s.end > s.start}
    extra = sorted({i for keys in thumb_of.values() for i in keys
                    if not (sampled and sampled.has(i)) and i not in frames})
    if extra:
        try:
            frames.update(read_frames(prepared.local_path, info, extra, stats.times_s, decode.key_frame_max_side,
                                      seek=stats.seek_safe))
        except MediaError:
            pass  # those dropped clips show a placeholder; nothing else depends on their frames

    out = VideoOutput(video)
    for n, span in enumerate(spans):
        heartbeat()
        clip_id = f"{video_id}-{n:04d}"
        row = clip_row(clip_id, video_id, source, n, span, times, fps, info)
        if span.drop_reason is None:
            score, num_pairs = clip_motion(samples, span.start, span.end)
            row.update(motion_score=score, motion_pairs=num_pairs,
                       motion_bucket=motion_bucket(score, config.motion) if score is not None else None)
            row["key_frame_indices"] = list(keys_of[n])
            keys = [sampled.jpeg(i) if sampled and sampled.has(i) else
                    (encode_jpeg(frames[i]) if i in frames else None) for i in keys_of[n]]
            if any(k is None for k in keys):
                row.update(status="failed", reason=key_frame_error)
            else:
                out.key_frames[clip_id] = keys
                spread = [sampled.jpeg(i) if sampled and sampled.has(i) else
                          (encode_jpeg(frames[i]) if i in frames else None) for i in spread_of.get(n, ())]
                if spread and all(f is not None for f in spread):  # else the stage falls back to the key frames
                    out.clip_frames[clip_id] = spread
                row["content_hash"] = content_hash(keys, row["num_frames"])
                row["thumb_path"] = _write_thumbnail(keys, Path(run_dir), video_id, clip_id)
                if score is None:
                    row.update(status="failed", reason="motion: no frame pair at the motion fps inside the clip")
        else:
            row.update(status="dropped", reason=span.drop_reason)
            keys = [sampled.jpeg(i) if sampled and sampled.has(i) else
                    (encode_jpeg(frames[i]) if i in frames else None) for i in thumb_of.get(n, ())]
            if keys and all(k is not None for k in keys):
                row["thumb_path"] = _write_thumbnail(keys, Path(run_dir), video_id, clip_id)
        out.clips.append(row)

    if config.clips.mode != "none":
        _write_clip_files(prepared.local_path, info, out.clips, Path(run_dir) / "clips" / video_id, config,
                          damaged=stats.num_corrupt > 0 or stats.num_concealed > 0)
    video.update(status="ok" if usable else "no_clips",
                 reason=None if usable else (spans[0].drop_reason if spans else "no_clips: no frames"),
                 num_clips=len(spans), num_usable_clips=len(usable), process_s=round(time.monotonic() - t0, 3))
    return out


class SampledKeyFrames:
    """Frames sampled during the one decode, kept as JPEG in an unnamed temporary file: memory holds
    only their positions, however long the video."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="lvd-keys-")
        self._index: list[int] = []          # frame indices, increasing
        self._where: dict[int, tuple[int, int]] = {}  # frame index -> (offset, length)

    def add(self, index: int, time_s: float, frame_rgb: np.ndarray) -> None:
        data = encode_jpeg(frame_rgb)
        self._where[index] = (self._file.seek(0, os.SEEK_END), len(data))
        self._file.write(data)
        self._index.append(index)

    def has(self, index: int) -> bool:
        return index in self._where

    def jpeg(self, index: int) -> bytes:
        offset, length = self._where[index]
        self._file.seek(offset)
        return self._file.read(length)

    def pick(self, start: int, end: int) -> tuple[int, int, int] | None:
        """The samples inside [start, end) nearest the clip's first, middle and last frame; None when
        no sample lies inside (a clip shorter than the sampling interval)."""
        lo, hi = bisect.bisect_left(self._index, start), bisect.bisect_left(self._index, end)
        inside = self._index[lo:hi]
        if not inside:
            return None
        return tuple(min(inside, key=lambda i: (abs(i - target), i)) for target in key_frame_indices(start, end))

    def pick_evenly(self, start: int, end: int, count: int) -> tuple[int, ...] | None:
        """The distinct samples inside [start, end) nearest `count` evenly spaced frames of it, in order;
        None when no sample lies inside."""
        lo, hi = bisect.bisect_left(self._index, start), bisect.bisect_left(self._index, end)
        inside = self._index[lo:hi]
        if not inside:
            return None
        return tuple(sorted({min(inside, key=lambda i: (abs(i - t), i)) for t in evenly_spaced(start, end, count)}))


def evenly_spaced(start: int, end: int, count: int) -> tuple[int, ...]:
    """`count` frames of [start, end) evenly spaced from its first to its last frame (fewer, all distinct,
    when the clip is shorter than that)."""
    return tuple(sorted({int(round(x)) for x in np.linspace(start, end - 1, count)}))


def key_frame_indices(start: int, end: int) -> tuple[int, int, int]:
    """First, middle and last frame of the clip [start, end)."""
    return start, (start + end - 1) // 2, end - 1


def video_row(source: str, video_id: str, info: VideoInfo | None) -> dict:
    row = {"video_id": video_id, "source": source, "status": "ok", "reason": None}
    if info is not None:
        row.update(codec=info.codec, width=info.width, height=info.height, coded_width=info.coded_width,
                   coded_height=info.coded_height, rotation=info.rotation, sar=info.sar, fps=info.fps,
                   duration_s=info.duration_s, variable_frame_rate=info.variable_frame_rate,
                   has_audio=info.has_audio, size_bytes=info.size_bytes)
    return row


def clip_row(clip_id: str, video_id: str, source: str, index: int, span, times: np.ndarray, fps: float, info: VideoInfo) -> dict:
    start_s = float(times[span.start])
    # the clip ends where its last frame stops being shown: the next frame's time, or one frame later
    end_s = float(times[span.end]) if span.end < len(times) else float(times[span.end - 1]) + 1.0 / fps
    return {
        "clip_id": clip_id, "video_id": video_id, "source": source, "clip_index": index,
        "start_frame": span.start, "end_frame": span.end, "num_frames": span.end - span.start,
        "start_s": round(start_s, 6), "end_s": round(end_s, 6), "duration_s": round(end_s - start_s, 6),
        "fps": fps, "width": info.width, "height": info.height, "boundary": span.boundary,
        "status": "ok", "reason": None, "clip_path": None,
    }


def _effective_fps(times: np.ndarray, declared: float) -> float:
    if len(times) > 1 and times[-1] > times[0]:
        return float((len(times) - 1) / (times[-1] - times[0]))
    return declared


def encode_jpeg(frame_rgb: np.ndarray, quality: int = 95) -> bytes:
    """Key frames travel as JPEG: a 1-hour video has hundreds of clips, and raw frames would make the
    per-video result (and the traffic to model stages on other nodes) grow 20x faster with length."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "JPEG encoding of a decoded frame cannot fail"
    return buf.tobytes()


def decode_jpegs(images: list[bytes]) -> np.ndarray:
    """K JPEGs -> K x H x W x 3 RGB uint8."""
    frames = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for b in images]
    return np.stack(frames)


def content_hash(key_frames_jpeg: list[bytes], num_frames: int) -> str:
    """Exact-duplicate key of a clip: its frame count and key frames (the JPEG encoding of equal pixels is
    equal). Two uploads of one video give equal hashes; a re-encode does not (near-dedup finds those)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(num_frames).encode())
    for jpeg in key_frames_jpeg:
        h.update(len(jpeg).to_bytes(8, "little"))
        h.update(jpeg)
    return h.hexdigest()


THUMB_HEIGHT = 96


def _write_thumbnail(key_frames_jpeg: list[bytes], run_dir: Path, video_id: str, clip_id: str) -> str:
    """The clip's key frames side by side, THUMB_HEIGHT high, for the report; returns its path relative to
    the run folder."""
    frames = decode_jpegs(key_frames_jpeg)
    h, w = frames.shape[1:3]
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    strip = np.hstack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
    rel = Path("thumbs") / video_id / f"{clip_id}.jpg"
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / rel.with_name(f".{clip_id}.tmp.jpg")
    tmp.write_bytes(encode_jpeg(strip, quality=85))
    os.replace(tmp, run_dir / rel)
    return rel.as_posix()


def _write_clip_files(local_path: str, info: VideoInfo, clips: list[dict], out_dir: Path, config: CurationConfig,
                      damaged: bool = False) -> None:
    """One ffmpeg per usable clip; written under a temporary name, then renamed, so a killed run
    leaves no half-written clip behind under a final name. Clips are always H.264-or-copied .mp4: a codec mp4
    cannot hold (GIF, QuickTime RLE, ...) makes a copy fail, and that clip is re-encoded instead, so no
    decodable video loses its clips and shards always carry real mp4. A `damaged` video (packets that failed
    to decode) is re-encoded too: a copy would hand its broken packets to every reader of the clip."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    source = ffmpeg_input_args(local_path, info)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in clips:
        if row["status"] != "ok":
            continue
        heartbeat()
        final = out_dir / f"{row['clip_id']}.mp4"
        tmp = out_dir / f".{row['clip_id']}.tmp.mp4"
        # each next mode is the fallback for media the one before cannot cut (see _clip_args)
        modes = ("copy", "reencode", "frames") if config.clips.mode == "copy" and not damaged else ("reencode", "frames")
        errors = []
        # the clip's real (decoded) length sets the limit, as the video's declared one does for the decode
        limit_s = config.decode.timeout_s + config.decode.timeout_per_video_s * row["end_s"]
        for mode in modes:
            code, stderr = _run_ffmpeg(_clip_args(ffmpeg, source, row, mode, config, tmp), limit_s)
            if code == 0 and _has_frames(tmp):
                break
            tmp.unlink(missing_ok=True)
            errors.append(f"{mode}: {stderr.strip()[-200:] or 'no video frames written'}")
        else:
            row.update(status="failed", reason=f"clip_file: ffmpeg failed: {'; '.join(errors)}")
            continue
        os.replace(tmp, final)
        row["clip_path"] = str(final)


def _run_ffmpeg(args: list[str], limit_s: float) -> tuple[int, str]:
    """(exit code, stderr) of one ffmpeg run, ended after `limit_s`; it counts as progress for the isolated
    worker's stall limit while it runs (the video was decoded whole already: this cut is bounded here)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + limit_s
    while True:
        heartbeat()
        try:
            _, stderr = proc.communicate(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            return proc.returncode, stderr
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                return -1, f"timeout: no clip within {limit_s:.0f} s"


def _has_frames(path: Path) -> bool:
    """Whether a clip file ffmpeg wrote holds video frames: a stream copy can exit 0 and write none (timestamps
    it cannot place, e.g. a start below zero)."""
    import av

    if not path.exists() or path.stat().st_size == 0:
        return False
    try:
        with av.open(str(path)) as clip:
            return any((s.frames or 0) > 0 for s in clip.streams.video)
    except (av.error.FFmpegError, OSError):
        return False


def _clip_args(ffmpeg: str, source: list[str], row: dict, mode: str, config: CurationConfig, out: Path) -> list[str]:
    """The ffmpeg command (a list, never a shell string) cutting one clip to `out`. copy: packets from the key
    frame at or before the start; reencode: exactly the clip's frames, found by a seek to its start time; frames:
    the clip's frames by decode index from the file's start (slow, for timestamps a seek cannot use). `source` is
    the input as ffmpeg_input_args gives it: the probed demuxer under the allow-lists."""
    even = "scale=trunc(iw/2)*2:trunc(ih/2)*2"  # H.264 in 4:2:0 needs even sides
    encode = ["-c:v", "libx264", "-preset", config.clips.preset, "-crf", str(config.clips.crf), "-pix_fmt", "yuv420p",
              "-an", "-sn", "-dn", str(out)]
    if mode == "frames":
        pick = f"select=between(n\\,{row['start_frame']}\\,{row['end_frame'] - 1}),setpts=N/({row['fps']:.6f})/TB"
        return [ffmpeg, "-v", "error", "-y", *source, "-map", "0:v:0", "-vf", f"{pick},{even}",
                "-fps_mode", "passthrough", "-frames:v", str(row["num_frames"]), *encode]
    if mode == "copy":
        # input seeking with stream copy starts at the keyframe at or before start_s (SVD's cut)
        return [ffmpeg, "-v", "error", "-y", "-ss", f"{row['start_s']:.6f}", *source,
                "-t", f"{row['duration_s']:.6f}", "-map", "0:v:0", "-c", "copy", "-an", "-sn", "-dn",
                "-avoid_negative_ts", "make_zero", str(out)]
    return [ffmpeg, "-v", "error", "-y", "-ss", f"{row['start_s']:.6f}", *source,
            "-map", "0:v:0", "-frames:v", str(row["num_frames"]), "-vf", even, *encode]
