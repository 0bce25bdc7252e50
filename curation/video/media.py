"""Probing and decoding untrusted media.

A video is probed (`probe`), then decoded once, sequentially, at low resolution for the frame analyzers
(`decode_frames`); afterwards only a few key frames are decoded a second time at a higher resolution
(`read_frames`). Memory never grows with the video's length: `decode_frames` is a generator that keeps one
frame at a time and a float per frame (its time).

Anything wrong with a file becomes a `MediaError` whose `reason` starts with a short code
("zero_byte", "not_a_video: ...") for the ledger; no other exception type escapes for bad media. Hangs
(a FIFO, a stalled network mount) are not handled here: the pipeline decodes in worker processes with a
time limit.

Frames come out RGB uint8, H x W x 3, upright and with square pixels: the sample aspect ratio is applied
(the width is stretched, as players do) and then the display rotation. Scaling happens in swscale on the
decoded YUV frame (area filter, one thread: at these output sizes swscale's threads cost more than they
save, 690 vs 410 fps), 4-5x faster than converting the full frame to RGB and resizing it with cv2
(1080p to short side 128, decode included: ~170 vs ~35 fps).

Times are in seconds from the first video frame (`VideoInfo.start_time_s`), so frame 0 is at 0.0 even in
a stream that starts late; they come from the frames' own timestamps, so variable frame rate is exact.
"""

from __future__ import annotations

import bisect
import os
import stat
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error
import numpy as np

from curation.video.isolation import heartbeat

# 8K UHD: anything larger is far beyond what training uses, and a huge declared size in a tiny file is
# how a decompression bomb asks for gigabytes per frame.
DEFAULT_MAX_PIXELS = 7680 * 4320
# Below this a video carries too little picture to score or train on.
DEFAULT_MIN_SIDE = 32
# A clip needs motion; a single picture is not a video.
DEFAULT_MIN_FRAMES = 2
# The second pass seeks only when the next wanted frame is at least this far ahead of where sequential
# decoding is and the key frame a seek would land on is at least half of it ahead: a seek lands on that
# key frame and decodes forward from there anyway, so short gaps are as cheap to decode through. On the
# real videos, seeking was neutral for densely clipped videos and 3.6x faster for sparse clips of a
# 2-minute 1080p video; see `read_frames`.
DEFAULT_SEEK_MIN_GAP_S = 2.0

# Demuxers an untrusted file may be opened with. Playlists and concat lists (hls, concat, ...) are left
# out on purpose: they make ffmpeg open other files named inside the "video".
ALLOWED_DEMUXERS = ("mov,matroska,avi,flv,mpegts,mpeg,ogg,asf,nut,ivf,h264,hevc,m4v,mpegvideo,obu,gif,"
                    "yuv4mpegpipe,mxf,rm,dv,mjpeg")
_CONTAINER_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ALLOWED_DEMUXERS}


def ffmpeg_input_args(path: str, info: VideoInfo) -> list[str]:
    """The input of an ffmpeg command line that reads a probed video: the probe's demuxer, forced, under the
    probe's allow-lists. ffmpeg would otherwise probe the file again on its own, with another build of the
    libraries than PyAV's, and could pick a demuxer that opens files named inside it (a concat list renamed
    .mp4, or a file swapped after the probe). `file:` keeps a name like `concat:a|b` a plain path."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ALLOWED_DEMUXERS, "-f", info.demuxer,
            "-i", f"file:{path}"]

# Probe gives up looking for a first frame after this many packets (a real stream needs a handful).
_PROBE_MAX_PACKETS = 256
# decode_frames judges the corrupt fraction only once it has seen this many packets, so one bad packet
# at the start of a video does not end it.
_MIN_PACKETS_FOR_CORRUPT_CHECK = 16
# Two frame times are the same frame when they agree this closely; both come from the same pts through
# the same float arithmetic, so in practice they are bit-identical.
_SAME_TIME_S = 1e-6


class MediaError(Exception):
    """Untrusted media that cannot be used; `reason` is a short code plus detail for the ledger."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def kind(self) -> str:
        """The code before the first colon ("not_a_video"), for counting reasons."""
        return self.reason.split(":", 1)[0]


@dataclass
class VideoInfo:
    """What a video is, from its container, codec parameters and first decoded frame."""

    codec: str
    coded_width: int  # as stored
    coded_height: int
    width: int  # display size: sample aspect ratio applied, then rotation
    height: int
    rotation: int  # degrees clockwise the stored frames are turned to display upright (0/90/180/270)
    sar: float  # sample (pixel) aspect ratio, 1.0 when square
    fps: float  # average frame rate
    duration_s: float
    num_frames: int  # estimate from the container (the exact count comes from the decode)
    start_time_s: float  # first video frame's timestamp in the container
    variable_frame_rate: bool  # from the container (average vs nominal rate); DecodeStats refines it
    has_audio: bool
    size_bytes: int
    demuxer: str  # ffmpeg's name of the demuxer that opened it (one of ALLOWED_DEMUXERS), for ffmpeg_input_args

    def size_for_short_side(self, short_side: int) -> tuple[int, int]:
        """(width, height) in display orientation with the short side `short_side`; never upscaled."""
        scale = min(1.0, short_side / min(self.width, self.height))
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    def size_for_long_side(self, max_side: int) -> tuple[int, int]:
        """(width, height) in display orientation with the long side at most `max_side`; never upscaled."""
        scale = min(1.0, max_side / max(self.width, self.height))
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))


@dataclass
class DecodeStats:
    """Filled in by `decode_frames` as it goes; complete once the generator is exhausted."""

    num_frames: int = 0
    num_packets: int = 0
    num_corrupt: int = 0  # packets that failed to decode and were skipped
    num_concealed: int = 0  # frames the decoder flagged as damaged (errors concealed); still yielded
    num_retimed: int = 0  # frames without a usable timestamp (missing or not increasing), given prev + 1/fps
    first_error: str = ""  # the first decode error's message, for the ledger
    times_s: array = field(default_factory=lambda: array("d"))  # per frame, from VideoInfo.start_time_s

    @property
    def variable_frame_rate(self) -> bool:
        """True when frame intervals vary: some differ from the median by more than 25% (a dropped or
        held frame counts), in at least 0.5% of the intervals."""
        if len(self.times_s) < 3:
            return False
        intervals = np.diff(np.frombuffer(self.times_s, dtype=np.float64))
        median = float(np.median(intervals))
        if median <= 0:
            return True
        num_off = int(np.count_nonzero(np.abs(intervals - median) > 0.25 * median))
        return num_off >= max(1, int(0.005 * len(intervals)))

    @property
    def seek_safe(self) -> bool:
        """Whether `read_frames` may seek and still return exactly the frames this decode saw. Not after
        decode errors (error concealment depends on what was decoded before: after a seek the damaged
        frames come out differently) nor with missing or repeated timestamps (frames are recognised by
        their timestamp after a seek)."""
        return self.num_corrupt == 0 and self.num_concealed == 0 and self.num_retimed == 0

    @property
    def corrupt_fraction(self) -> float:
        return self.num_corrupt / self.num_packets if self.num_packets else 0.0


# ---------------------------------------------------------------------------------------------------------
# probe


def probe(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
          min_frames: int = DEFAULT_MIN_FRAMES) -> VideoInfo:
    """Reads what a video is and checks it is usable: raises `MediaError` otherwise.

    Decodes the first frame (and only it), because the display rotation and the first frame's timestamp
    live on decoded frames, and because a file whose first frame does not decode is not worth queueing.
    """
    size_bytes = _check_readable(path)
    with _open(path, max_pixels) as container:
        stream = _video_stream(container)
        cc = stream.codec_context
        coded_w, coded_h = int(cc.width or 0), int(cc.height or 0)
        if coded_w <= 0 or coded_h <= 0:
            raise MediaError(f"not_a_video: video stream has no picture size ({coded_w}x{coded_h})")
        _check_size(coded_w, coded_h, max_pixels, min_side)

        fps = _average_fps(stream)
        duration_s = _duration_s(container, stream, fps)
        num_frames = int(stream.frames or 0) or round(duration_s * fps)
        if 0 < num_frames < min_frames and (stream.frames or duration_s > 0):
            raise MediaError(f"too_few_frames: {num_frames} frame{'s' if num_frames != 1 else ''}")

        first = _first_frame(container, stream)
        # The codec parameters can disagree with the frames (a resolution change, a lying header): the
        # decoded frame is the truth, and the limits apply to it.
        if (first.width, first.height) != (coded_w, coded_h):
            coded_w, coded_h = first.width, first.height
            _check_size(coded_w, coded_h, max_pixels, min_side)
        rotation = _clockwise_rotation(first)
        sar = _sample_aspect_ratio(stream)
        width, height = max(1, round(coded_w * sar)), coded_h
        if rotation in (90, 270):
            width, height = height, width
        start_time_s = first.time if first.time is not None else float((stream.start_time or 0) * stream.time_base)

        return VideoInfo(
            codec=cc.name, coded_width=coded_w, coded_height=coded_h, width=width, height=height,
            rotation=rotation, sar=sar, fps=fps, duration_s=duration_s, num_frames=num_frames,
            start_time_s=float(start_time_s), variable_frame_rate=_container_says_vfr(stream),
            has_audio=len(container.streams.audio) > 0, size_bytes=size_bytes,
            demuxer=container.format.name.split(",")[0],
        )


def _check_readable(path: str) -> int:
    """The file's size; `MediaError` when it is missing, unreadable, a folder or empty.

    Only regular files are read here: a FIFO or device is left for av.open (which may block; the
    pipeline's time limit handles that).
    """
    try:
        st = os.stat(path)  # follows symlinks: a dangling one fails here
    except OSError as e:
        raise MediaError(f"unreadable: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError("unreadable: is a directory")
    if stat.S_ISREG(st.st_mode):
        if st.st_size == 0:
            raise MediaError("zero_byte")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise MediaError(f"unreadable: {e.strerror or e}") from None
    return int(st.st_size)


@contextmanager
def _open(path: str, max_pixels: int) -> Iterator[av.container.InputContainer]:
    # max_pixels goes to every decoder, including the one av.open runs to fill in stream parameters:
    # without it, opening a 16k x 16k "video" of a few kB decodes a frame of hundreds of MB.
    try:
        container = av.open(str(path), "r", container_options=_CONTAINER_OPTIONS,
                            options={"max_pixels": str(max_pixels)}, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        # ffmpeg refuses some huge declared sizes with an unrelated error (a 16384 x 16384 y4m header gives
        # EBUSY); a size the header states in plain text is judged by our own limits first.
        declared = _y4m_size(path)
        if declared is not None:
            _check_size(*declared, max_pixels, DEFAULT_MIN_SIDE)
        # The file was readable (checked before), so whatever ffmpeg says means it is not a video it can use.
        raise MediaError(f"not_a_video: {_message(e)}") from None
    try:
        yield container
    finally:
        container.close()


def _y4m_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a YUV4MPEG2 header (text: "YUV4MPEG2 W640 H480 ..."), None for other files."""
    try:
        with open(path, "rb") as f:
            head = f.read(256).split(b"\n", 1)[0]
    except OSError:
        return None
    if not head.startswith(b"YUV4MPEG2 "):
        return None
    fields = {t[:1]: t[1:] for t in head.split(b" ")[1:] if t}
    try:
        return int(fields[b"W"]), int(fields[b"H"])
    except (KeyError, ValueError):
        return None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) is not video."""
    streams = [s for s in container.streams.video
               if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        has_audio = len(container.streams.audio) > 0
        if container.streams.video:
            what = "audio with cover art" if has_audio else "cover art only"
        else:
            what = "audio only" if has_audio else "no streams"
        raise MediaError(f"no_video_stream: {what}")
    stream = streams[0]
    if stream.codec_context is None:
        raise MediaError(f"unsupported_codec: no decoder for stream {stream.index}")
    return stream


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise MediaError(f"resolution_too_large: {width}x{height} > max_pixels {max_pixels}")
    if min(width, height) < min_side:
        raise MediaError(f"too_small: {width}x{height}")


def _average_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) <= 1000:
            return float(rate)
    return 25.0  # no rate anywhere (a raw stream); only used to space frames without timestamps


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: float) -> float:
    if stream.duration and stream.time_base:
        return max(0.0, float(stream.duration * stream.time_base))
    if container.duration:
        return max(0.0, container.duration / av.time_base)
    return (stream.frames or 0) / fps


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> av.VideoFrame:
    num_failed, last_error = 0, ""
    for num_packets, packet in enumerate(_packets(container, stream)):
        if num_packets >= _PROBE_MAX_PACKETS:
            break
        try:
            frames = stream.decode(packet)
        except av.error.FFmpegError as e:
            num_failed, last_error = num_failed + 1, _message(e)
            continue
        if frames:
            return frames[0]
    detail = f"{num_failed} packets failed: {last_error}" if num_failed else "no packet gave a frame"
    raise MediaError(f"decode_error: no frame decodes ({detail})")


def _clockwise_rotation(frame: av.VideoFrame) -> int:
    # PyAV reports the display matrix's rotation counterclockwise (ffmpeg's av_display_rotation_get);
    # players turn the picture the other way. Odd angles snap to the nearest quarter turn.
    ccw = float(frame.rotation or 0)
    return int(round(-ccw / 90.0)) % 4 * 90


def _sample_aspect_ratio(stream: av.video.stream.VideoStream) -> float:
    # The container's value wins over the codec's, as in ffmpeg's av_guess_sample_aspect_ratio.
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar and sar > 0:
            # An absurd ratio is a broken header, not a real anamorphic format; ignore it.
            return float(sar) if Fraction(1, 4) <= sar <= 4 else 1.0
    return 1.0


def _container_says_vfr(stream: av.video.stream.VideoStream) -> bool:
    avg, nominal = stream.average_rate, stream.base_rate
    if not avg or not nominal:
        return False
    return abs(float(avg) - float(nominal)) > 0.015 * float(nominal)


# ---------------------------------------------------------------------------------------------------------
# decoding


def decode_frames(path: str, info: VideoInfo, short_side: int, stats: DecodeStats,
                  max_corrupt_fraction: float = 0.2, min_frames: int = DEFAULT_MIN_FRAMES, threads: int = 1,
                  on_sample: Callable[[int, float, np.ndarray], None] | None = None,
                  sample_every_s: float = 0.5, sample_max_side: int = 768,
                  ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decodes every frame once, in order: yields (index, time_s, RGB frame with short side `short_side`).

    Frames are upright with square pixels; videos smaller than `short_side` come out at their own size
    (never upscaled: it adds no information and costs the analyzers time). Packets that fail to decode are
    skipped and counted in `stats`; `MediaError("decode_error: ...")` when more than
    `max_corrupt_fraction` of the packets fail or nothing decodes, `MediaError("too_few_frames: ...")`
    when fewer than `min_frames` decode. Both can come after frames were yielded: the caller drops the
    partial analysis.

    `threads`: 1 (the default) decodes on one core: the pipeline runs one decode per core, a frame costs
    15-25% less CPU than with threads, and damaged streams decode the same way every time (with frame
    threads, error concealment depends on thread timing, so concealed frames differ from run to run).
    0 lets ffmpeg use frame and slice threads on every core, for one video on an otherwise idle machine.
    Measured on 1080p H.264 at short side 128 on 2 shared, busy cores: threads=1 3.4-3.6 ms CPU per
    frame, 210-220 fps; threads=0 (thread_type AUTO) 4.1-4.5 ms, 140-170 fps.

    `on_sample(index, time_s, frame)` additionally receives one frame every `sample_every_s` (the first
    frame at or after each tick from the first frame's time) at long side <= `sample_max_side`, as
    `read_frames` would return it: the model stages' key frames without a second decode.
    """
    out_w, out_h = info.size_for_short_side(short_side)
    sample_w, sample_h = info.size_for_long_side(sample_max_side)
    next_tick: float | None = None
    with _open(path, _decode_max_pixels(info)) as container:
        stream = _video_stream(container)
        _set_threads(stream, threads)
        for index, (time_s, _, frame) in enumerate(_decoded(container, stream, info, stats, max_corrupt_fraction)):
            if on_sample is not None and (next_tick is None or time_s >= next_tick - 1e-6):
                on_sample(index, time_s, _to_rgb(frame, sample_w, sample_h, info.rotation))
                next_tick = time_s if next_tick is None else next_tick
                while next_tick <= time_s + 1e-6:  # after a gap (VFR), the next tick still lies ahead
                    next_tick += sample_every_s
            yield index, time_s, _to_rgb(frame, out_w, out_h, info.rotation)
    if stats.num_frames == 0:
        detail = f"{stats.num_corrupt} of {stats.num_packets} packets failed: {stats.first_error}" \
            if stats.num_corrupt else "no packet gave a frame"
        raise MediaError(f"decode_error: no frame decodes ({detail})")
    if stats.num_frames < min_frames:
        raise MediaError(f"too_few_frames: {stats.num_frames} frame{'s' if stats.num_frames != 1 else ''}")


def read_frames(path: str, info: VideoInfo, indices: Sequence[int], times_s: Sequence[float], max_side: int,
                seek: bool = True, seek_min_gap_s: float = DEFAULT_SEEK_MIN_GAP_S, threads: int = 1,
                ) -> dict[int, np.ndarray]:
    """The second pass: the frames with these decode indices, RGB upright, long side <= `max_side`.

    `times_s` is the first decode's `DecodeStats.times_s`. Decoding is sequential, converting only the
    wanted frames and stopping after the last one; when the next wanted frame lies beyond a key frame that
    is more than `seek_min_gap_s` ahead, it seeks to that key frame instead and recognises frames by their
    timestamp (bit-identical to the first pass's), counting on from there. If a seek lands somewhere that
    cannot be matched (no or repeated timestamps), it reads sequentially from the start instead, so the
    frames returned are always the ones `decode_frames` yielded at those indices. The same happens when
    a decode error follows a seek (error concealment differs after a seek); passing
    `seek=stats.seek_safe` skips the doomed seeking attempt for files the first pass found damaged.

    Measured (2 shared cores): seeking pays off for long videos with sparse key frames, e.g. 12 frames
    of a 2-minute 1080p video in 2 s instead of 6.5 s; for short or densely clipped videos both ways
    cost about the same.
    """
    wanted = sorted({int(i) for i in indices})
    if wanted and not (0 <= wanted[0] and wanted[-1] < len(times_s)):
        raise ValueError(f"frame indices must be in [0, {len(times_s)}) (the decode's frame count), "
                         f"got {wanted[0]}..{wanted[-1]}; pass indices from the same decode as times_s")
    out_w, out_h = info.size_for_long_side(max_side)
    found: dict[int, np.ndarray] = {}
    if wanted:
        gap_s = seek_min_gap_s if seek else float("inf")
        _KeyFrameReader(path, info, times_s, out_w, out_h, gap_s, threads).read(wanted, found)
    if len(found) < len(wanted):
        missing = [i for i in wanted if i not in found]
        raise MediaError(f"decode_error: second read found {len(found)} of {len(wanted)} frames "
                         f"(first missing: index {missing[0]})")
    return found


class _KeyFrameReader:
    """One second pass over a video, for `read_frames`."""

    def __init__(self, path: str, info: VideoInfo, times_s: Sequence[float], out_w: int, out_h: int,
                 seek_min_gap_s: float, threads: int = 1):
        self.path, self.info, self.times_s = path, info, times_s
        self.threads = threads
        self.out_w, self.out_h = out_w, out_h
        self.seek_min_gap_s = seek_min_gap_s
        self.num_seeks = 0  # for tests and benchmarks
        self.num_fallbacks = 0  # seek passes discarded for a sequential one

    def read(self, wanted: list[int], found: dict[int, np.ndarray]) -> None:
        if self.seek_min_gap_s != float("inf"):
            with_seeks: dict[int, np.ndarray] = {}
            if self._read(wanted, with_seeks, allow_seek=True):
                found.update(with_seeks)
                return
            self.num_fallbacks += 1
        self._read(wanted, found, allow_seek=False)

    def _read(self, wanted: list[int], found: dict[int, np.ndarray], allow_seek: bool) -> bool:
        """Fills `found`; False when a seek made the result doubtful (the caller then reads sequentially):
        it landed on a frame it cannot place, or decode errors followed it (concealment after a seek
        differs from concealment in a continuous decode)."""
        pending = list(reversed(wanted))  # pop() gives the next wanted index
        after_seek = DecodeStats()  # errors since the first seek
        sought = -1  # the target of the last seek: one seek per target, even if it lands short
        with _open(self.path, _decode_max_pixels(self.info)) as container:
            stream = _video_stream(container)
            _set_threads(stream, self.threads)
            frames = _decoded(container, stream, self.info, DecodeStats(), max_corrupt_fraction=1.0)
            index: int | None = -1  # the index of the last frame seen; None right after a seek
            while pending:
                target = pending[-1]
                if allow_seek and index is not None and target != sought and self._should_seek(stream, index, target):
                    self.num_seeks += 1
                    ts = round((self.times_s[target] + self.info.start_time_s) / stream.time_base)
                    try:
                        container.seek(ts, stream=stream, backward=True)
                    except (av.error.FFmpegError, OSError):
                        return False
                    frames = _decoded(container, stream, self.info, after_seek, max_corrupt_fraction=1.0)
                    index, sought = None, target
                try:
                    _, raw_time_s, frame = next(frames)
                except StopIteration:
                    break
                if after_seek.num_corrupt or after_seek.num_concealed:
                    return False
                if index is None:
                    # Frames before the key frame a seek landed on are leading pictures of an open GOP:
                    # they lack their references now, so they cannot stand for the first pass's frames.
                    if not frame.key_frame:
                        continue
                    index = self._match(raw_time_s)
                    # Unplaceable, or past the target (a seek lands at or before it unless the container
                    # index lies, and then frames in between would be skipped).
                    if index is None or index > target:
                        return False
                else:
                    index += 1
                while pending and pending[-1] < index:  # passed without seeing it: the file changed
                    pending.pop()
                if pending and pending[-1] == index:
                    found[index] = _to_rgb(frame, self.out_w, self.out_h, self.info.rotation)
                    pending.pop()
        if sought >= 0 and pending:  # ran out of frames after a seek: let the sequential read decide
            return False
        return not (after_seek.num_corrupt or after_seek.num_concealed)

    def _should_seek(self, stream: av.video.stream.VideoStream, index: int, target: int) -> bool:
        now_s = self.times_s[index] if index >= 0 else -1.0
        target_s = self.times_s[target]
        if target_s - now_s < self.seek_min_gap_s:
            return False
        # Seeking only pays when it skips frames: the key frame it lands on must be ahead of us. Without
        # a container index (raw streams) seeking is a guess, so do not.
        entries = stream.index_entries
        if len(entries) == 0:
            return False
        ts = round((target_s + self.info.start_time_s) / stream.time_base)
        i = entries.search_timestamp(ts, backward=True)
        if i < 0:
            return False
        keyframe_s = float(entries[i].timestamp * stream.time_base) - self.info.start_time_s
        return keyframe_s - now_s > self.seek_min_gap_s / 2

    def _match(self, raw_time_s: float | None) -> int | None:
        """The decode index whose time is exactly `raw_time_s`, or None."""
        if raw_time_s is None:
            return None
        i = bisect.bisect_left(self.times_s, raw_time_s - _SAME_TIME_S)
        if i < len(self.times_s) and abs(self.times_s[i] - raw_time_s) <= _SAME_TIME_S:
            return i
        return None


def _decode_max_pixels(info: VideoInfo) -> int:
    """The decoders' frame size limit after probing: the probed size passed, so allow it (a caller may
    have probed with a larger max_pixels), but stop a stream that grows beyond it mid-way."""
    return max(DEFAULT_MAX_PIXELS, info.coded_width * info.coded_height)


def _decoded(container: av.container.InputContainer, stream: av.video.stream.VideoStream, info: VideoInfo,
             stats: DecodeStats, max_corrupt_fraction: float,
             ) -> Iterator[tuple[float, float | None, av.VideoFrame]]:
    """Every frame that decodes, in presentation order: (time_s, raw_time_s, frame).

    time_s is relative to `info.start_time_s` and strictly increasing (a missing or non-increasing
    timestamp becomes the previous one plus 1/fps); raw_time_s is the frame's own timestamp on the same
    scale, or None when it has none, and only a repeated or missing one differs from time_s. Both passes
    go through here, so they skip and count exactly the same frames.
    """
    frame_interval_s = 1.0 / info.fps
    prev_s: float | None = None
    for packet in _packets(container, stream, stats):
        if packet is not None and packet.size:
            stats.num_packets += 1
        try:
            frames = stream.decode(packet)
        except av.error.EOFError:  # a second flush after the decoder already drained: nothing lost
            continue
        except av.error.FFmpegError as e:
            stats.num_corrupt += 1
            stats.first_error = stats.first_error or _message(e)
            if (stats.num_packets >= _MIN_PACKETS_FOR_CORRUPT_CHECK
                    and stats.corrupt_fraction > max_corrupt_fraction):
                raise MediaError(f"decode_error: {stats.num_corrupt} of {stats.num_packets} packets failed "
                                 f"(more than {max_corrupt_fraction:.0%}): {stats.first_error}") from None
            continue
        for frame in frames:
            raw_s = frame.time - info.start_time_s if frame.time is not None else None
            if raw_s is not None and (prev_s is None or raw_s > prev_s):
                time_s = raw_s
            else:
                time_s = prev_s + frame_interval_s if prev_s is not None else 0.0
                stats.num_retimed += 1
            prev_s = time_s
            stats.num_frames += 1
            stats.num_concealed += bool(frame.is_corrupt)
            stats.times_s.append(time_s)
            heartbeat()  # progress for the isolated worker's stall limit
            yield time_s, raw_s, frame
    if stats.num_packets and stats.corrupt_fraction > max_corrupt_fraction:
        raise MediaError(f"decode_error: {stats.num_corrupt} of {stats.num_packets} packets failed "
                         f"(more than {max_corrupt_fraction:.0%}): {stats.first_error}")


def _packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
             stats: DecodeStats | None = None) -> Iterator[av.Packet | None]:
    """The stream's packets (demux ends with empty ones that flush the decoder). A container that breaks
    mid-file ends the stream there, counted as one corrupt packet, with None to flush the decoder, so
    the frames already read are kept."""
    packets = container.demux(stream)
    num_restarts = 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except IndexError:
            # A stream that appears mid-file (MPEG-TS can announce one late) is unknown to PyAV's demux
            # loop, which then fails on its packet; a fresh demux loop knows the stream count again and
            # goes on from the same position.
            num_restarts += 1
            if num_restarts > 16:
                raise MediaError("decode_error: demux: streams keep appearing mid-file") from None
            packets = container.demux(stream)
            continue
        except (av.error.FFmpegError, OSError) as e:
            if stats is not None:
                stats.num_corrupt += 1
                stats.first_error = stats.first_error or f"demux: {_message(e)}"
            yield None
            return
        yield packet


def _set_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    """Before the first decode: 0 = frame and slice threads on all cores, n = that many threads."""
    if threads != 1:
        stream.thread_type = "AUTO"
    stream.codec_context.thread_count = max(0, threads)


def _to_rgb(frame: av.VideoFrame, width: int, height: int, rotation: int) -> np.ndarray:
    """RGB uint8 at (width, height) in display orientation; swscale scales before rotating, so the costly
    work is on the small picture."""
    if rotation in (90, 270):
        width, height = height, width
    try:
        rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA", threads=1)
    except (av.error.FFmpegError, ValueError) as e:  # a pixel format swscale cannot convert
        fmt = frame.format.name if frame.format is not None else "unknown"
        raise MediaError(f"unsupported_pixel_format: {fmt} {frame.width}x{frame.height}: {_message(e)}") from None
    if rotation:
        rgb = np.rot90(rgb, k=-(rotation // 90))  # np.rot90 turns counterclockwise for positive k
    return np.ascontiguousarray(rgb)


def _message(e: BaseException) -> str:
    """ffmpeg's words without the file name (the ledger has the path; reasons should group)."""
    if isinstance(e, av.error.FFmpegError):
        text = e.strerror or str(e)
        if e.log and len(e.log) >= 3 and e.log[2]:
            text = f"{text} ({str(e.log[2]).strip()})"
        return text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
