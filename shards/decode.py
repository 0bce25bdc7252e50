"""Decoding for shards: a clip's first and last frames (writer), a window of frames at a target rate and
size (loader), a stored jpg frame (loader). PyAV, from bytes in memory, sequentially.

Frames come out in display orientation (the stream's rotation applied) and display aspect (the size given
is the display size, so non-square pixels are stretched as players do).
"""

from __future__ import annotations

import io
import math

import av
import cv2
import numpy as np


class DecodeError(ValueError):
    """Media that does not decode (corrupt, truncated, no video stream)."""


def _rotation_k(frame: av.VideoFrame) -> int:
    # PyAV reports the display matrix's rotation in degrees (counter-clockwise negative); np.rot90 by
    # rotation/90 turns the stored picture upright (checked against ffmpeg's autorotate).
    return int(round(getattr(frame, "rotation", 0) or 0) // 90) % 4


def frame_rgb(frame: av.VideoFrame, size_wh: tuple[int, int] | None = None) -> np.ndarray:
    """H x W x 3 uint8 in display orientation; `size_wh` is the display size wanted (swscale does the resize)."""
    k = _rotation_k(frame)
    if size_wh is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        w, h = size_wh if k % 2 == 0 else size_wh[::-1]
        rgb = frame.to_ndarray(format="rgb24", width=max(1, w), height=max(1, h),
                               interpolation=av.video.reformatter.Interpolation.AREA)
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _open(data: bytes | memoryview):
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(f"cannot open media: {e}") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    return container


def _first_frame(container, stream):
    """The stream's frame iterator and its first frame; a clip with no decodable frame is an error."""
    frames = container.decode(stream)
    first = next(frames, None)
    if first is None:
        raise DecodeError("no decodable frame")
    return frames, first


def first_last_frames(data: bytes | memoryview, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The clip's first and last frames (RGB), sized to `max_side` when given. The last frame is found by
    seeking to a key frame shortly before the end; a full decode is the fallback."""
    with _open(data) as c:
        stream = c.streams.video[0]
        try:
            frames, first = _first_frame(c, stream)
            size = _fit(first, max_side)
            first_rgb = frame_rgb(first, size)
            last = first
            duration = float(stream.duration * stream.time_base) if stream.duration else None
            if duration and duration > 2.0 and first.pts is not None:
                try:
                    c.seek(first.pts + int((duration - 1.5) / stream.time_base), stream=stream, backward=True)
                    frames = c.decode(stream)
                except av.FFmpegError:
                    pass  # keep decoding sequentially from where we are
            for frame in frames:
                last = frame
            return first_rgb, frame_rgb(last, size)
        except av.FFmpegError as e:
            raise DecodeError(f"decode failed: {e}") from None


def _fit(frame: av.VideoFrame, max_side: int | None) -> tuple[int, int] | None:
    w, h = frame.width, frame.height
    if _rotation_k(frame) % 2:
        w, h = h, w
    if max_side is None or max(w, h) <= max_side:
        return None
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def cover_size(display_wh: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the display picture scaled to just cover `out_hw`, keeping its aspect."""
    dw, dh = display_wh
    oh, ow = out_hw
    s = max(oh / dh, ow / dw)
    return max(ow, math.ceil(dw * s - 1e-6)), max(oh, math.ceil(dh * s - 1e-6))


def centre_crop(rgb: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    oh, ow = out_hw
    h, w = rgb.shape[:2]
    y, x = (h - oh) // 2, (w - ow) // 2
    return rgb[y : y + oh, x : x + ow]


def decode_window(data: bytes | memoryview, start_s: float, num_frames: int, fps: float,
                  out_hw: tuple[int, int], display_wh: tuple[int, int] | None = None) -> np.ndarray:
    """num_frames x H x W x 3 uint8: the frame shown at start_s + i / fps (times from the clip's first frame),
    resized to cover `out_hw` and centre-cropped. Past the clip's end the last frame repeats."""
    targets = start_s + np.arange(num_frames) / fps
    chosen: list[av.VideoFrame | None] = [None] * num_frames
    with _open(data) as c:
        stream = c.streams.video[0]
        try:
            frames, first = _first_frame(c, stream)
            t0 = first.time or 0.0
            prev, i = first, 0
            if start_s > 1.0 and first.pts is not None:
                # skip the decode of what comes before the window: seek to the key frame before it
                try:
                    c.seek(first.pts + int(start_s / stream.time_base), stream=stream, backward=True)
                    frames = c.decode(stream)
                except av.FFmpegError:
                    pass
            for frame in frames:
                t = (frame.time if frame.time is not None else t0) - t0
                while i < num_frames and targets[i] < t - 1e-6:  # the frame before this one is on screen
                    chosen[i] = prev
                    i += 1
                if i == num_frames:
                    break
                prev = frame
            while i < num_frames:
                chosen[i] = prev
                i += 1
        except av.FFmpegError as e:
            raise DecodeError(f"decode failed: {e}") from None
        if display_wh is None:
            k = _rotation_k(first)
            display_wh = (first.height, first.width) if k % 2 else (first.width, first.height)
        size = cover_size(display_wh, out_hw)
        out = np.empty((num_frames, *out_hw, 3), np.uint8)
        cache: dict[int, np.ndarray] = {}
        for j, frame in enumerate(chosen):
            rgb = cache.get(id(frame))
            if rgb is None:
                rgb = cache[id(frame)] = centre_crop(frame_rgb(frame, size), out_hw)
            out[j] = rgb
        return out


def decode_image(data: bytes | memoryview, out_hw: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 from a jpg/png, resized to cover `out_hw` and centre-cropped."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("image does not decode")
    h, w = bgr.shape[:2]
    cw, ch = cover_size((w, h), out_hw)
    resized = cv2.resize(bgr, (cw, ch), interpolation=cv2.INTER_AREA if cw < w else cv2.INTER_LINEAR)
    return np.ascontiguousarray(centre_crop(resized, out_hw)[..., ::-1])


def encode_jpg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DecodeError("jpg encoding failed")
    return buf.tobytes()
