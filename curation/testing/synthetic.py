"""Synthetic videos with known facts, for the demo, the tests and the benchmark.

Each generator yields RGB uint8 frames (H x W x 3). `write_video` encodes them with PyAV (libx264 by
default). The facts are exact: a hard cut at frame 12 is a cut at frame 12.

    python -m curation.testing.synthetic OUT_DIR      # writes the demo set
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

# Distinct hues so every scene change is a large colour change, as a real cut is.
PALETTE = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (160, 40, 200), (40, 200, 200)]


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 24.0, codec: str = "libx264",
                pix_fmt: str = "yuv420p", gop: int = 24, options: dict[str, str] | None = None) -> Path:
    """Encodes RGB frames to `path`; H.264 needs even sizes, so odd ones are padded by one pixel."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                if codec == "libx264":
                    h, w = h + h % 2, w + w % 2
                stream = out.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
                if codec == "libx264":
                    stream.options = {"g": str(gop), "preset": "veryfast", "crf": "20", **(options or {})}
            if frame.shape[:2] != (stream.height, stream.width):
                frame = cv2.copyMakeBorder(frame, 0, stream.height - frame.shape[0], 0,
                                           stream.width - frame.shape[1], cv2.BORDER_REPLICATE)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)
    return path


def _textured(color: tuple[int, int, int], h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.empty((h, w, 3), np.float32)
    base[:] = color
    noise = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 1)).astype(np.float32), (0, 0), 3)[..., None]
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def moving_square(num_frames: int, h: int = 144, w: int = 256, speed: float = 4.0, color_index: int = 0,
                  seed: int = 0) -> Iterator[np.ndarray]:
    """A bright square crossing a textured background at `speed` pixels per frame (bouncing)."""
    bg = _textured(PALETTE[color_index % len(PALETTE)], h, w, seed)
    side = max(4, h // 4)
    span = max(1, w - side)
    for i in range(num_frames):
        pos = int(i * speed) % (2 * span)
        x = pos if pos < span else 2 * span - pos
        y = (h - side) // 2
        frame = bg.copy()
        frame[y : y + side, x : x + side] = (250, 250, 250)
        frame[y + side // 3 : y + 2 * side // 3, x + side // 3 : x + 2 * side // 3] = (10, 10, 10)
        yield frame


def static_frame(num_frames: int, h: int = 144, w: int = 256, color_index: int = 1, seed: int = 1) -> Iterator[np.ndarray]:
    """The same textured frame repeated: zero motion."""
    frame = _textured(PALETTE[color_index % len(PALETTE)], h, w, seed)
    for _ in range(num_frames):
        yield frame


def hard_cuts(cut_frames: list[int], num_frames: int, h: int = 144, w: int = 256, speed: float = 3.0) -> Iterator[np.ndarray]:
    """Scenes of moving squares on different colours; scene k starts at cut_frames[k-1]."""
    starts = [0, *cut_frames, num_frames]
    for k in range(len(starts) - 1):
        yield from moving_square(starts[k + 1] - starts[k], h, w, speed=speed, color_index=k, seed=k)


def fade_through_black(scene_len: int, fade_len: int, h: int = 144, w: int = 256) -> Iterator[np.ndarray]:
    """Scene A, fade out to black over `fade_len`, fade in from black to scene B over `fade_len`."""
    a = list(moving_square(scene_len + fade_len, h, w, color_index=0, seed=0))
    b = list(moving_square(scene_len + fade_len, h, w, color_index=2, seed=2))
    yield from a[:scene_len]
    for i in range(fade_len):
        yield (a[scene_len + i] * (1 - (i + 1) / fade_len)).astype(np.uint8)
    for i in range(fade_len):
        yield (b[i] * ((i + 1) / fade_len)).astype(np.uint8)
    yield from b[fade_len:]


def rendered_text(num_frames: int, h: int = 144, w: int = 256, lines: tuple[str, ...] = ("BREAKING NEWS", "LIVE 24/7"),
                  scroll: float = 0.0) -> Iterator[np.ndarray]:
    """Large black text on a light background: a large text area. `scroll` moves the text down by that
    many pixels per frame (wrapping), so the clip has motion too."""
    frame = np.full((h, w, 3), 235, np.uint8)
    scale = w / 260
    for i, line in enumerate(lines):
        y = int(h * (i + 1) / (len(lines) + 1)) + int(10 * scale)
        cv2.putText(frame, line, (int(8 * scale), y), cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale, (0, 0, 0),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    for i in range(num_frames):
        yield np.roll(frame, int(i * scroll), axis=0) if scroll else frame


def flat_grey(num_frames: int, h: int = 144, w: int = 256, level: int = 128) -> Iterator[np.ndarray]:
    frame = np.full((h, w, 3), level, np.uint8)
    for _ in range(num_frames):
        yield frame


def dissolve(scene_len: int, dissolve_len: int, h: int = 144, w: int = 256,
             levels: tuple[int, int] = (70, 170)) -> Iterator[np.ndarray]:
    """Scene A, a cross-fade to scene B over `dissolve_len` frames, scene B: blended frames are
    [scene_len, scene_len + dissolve_len). The scenes are grey (a textured level and a moving white square)
    so that hue and saturation stay constant: the change is spread evenly over the dissolve, as in real
    footage, with no jump in the first blended frame for a frame-to-frame detector to catch."""
    def scene(level: int, seed: int) -> list[np.ndarray]:
        bg = _textured((level, level, level), h, w, seed)
        side = max(4, h // 4)
        frames = []
        for i in range(scene_len + dissolve_len):
            frame = bg.copy()
            x = (10 + 2 * i) % max(1, w - side)
            frame[(h - side) // 2 : (h + side) // 2, x : x + side] = 250
            frames.append(frame)
        return frames

    a, b = scene(levels[0], seed=0), scene(levels[1], seed=1)
    yield from a[:scene_len]
    for i in range(dissolve_len):
        t = (i + 1) / (dissolve_len + 1)
        yield (a[scene_len + i] * (1 - t) + b[i] * t).round().astype(np.uint8)
    yield from b[dissolve_len:]


def write_demo_set(out_dir: str | Path, fps: float = 24.0) -> list[Path]:
    """The demo's inputs: motion, a static shot, cuts, text, a fade and a flat clip."""
    out = Path(out_dir)
    n = int(fps * 4)
    return [
        write_video(out / "moving_square.mp4", moving_square(n, speed=5), fps),
        write_video(out / "static.mp4", static_frame(n), fps),
        write_video(out / "three_shots.mp4", hard_cuts([int(fps * 3), int(fps * 6)], int(fps * 9)), fps),
        write_video(out / "news_text.mp4", rendered_text(n, h=288, w=512, scroll=2.0), fps),
        write_video(out / "fade.mp4", fade_through_black(int(fps * 3), int(fps // 2)), fps),
        write_video(out / "flat_grey.mp4", flat_grey(n), fps),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the demo videos into")
    parser.add_argument("--fps", type=float, default=24.0)
    args = parser.parse_args()
    for path in write_demo_set(args.out_dir, args.fps):
        print(path)


if __name__ == "__main__":
    main()
