"""Frames in and out of the sampler: image files to tensors, tensors to an mp4 and a contact sheet.

Shapes: T frames, C = 3 (RGB), H x W pixels; tensors are in [-1, 1], arrays are uint8 H x W x 3.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file -> C H W in [-1, 1], centre-cropped to the target aspect, then resized."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw = round(h * target)
        img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    else:
        ch = round(w / target)
        img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(frames_TCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] frames -> T x H x W x 3 uint8."""
    x = ((frames_TCHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def write_mp4(path: str | Path, frames_THWC: np.ndarray, fps: float) -> Path:
    """H.264 (libx264, yuv420p) with PyAV; odd sides are padded by one pixel, as yuv420p needs even ones."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w = frames_THWC.shape[:3]
    pad_h, pad_w = h % 2, w % 2
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames_THWC:
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


SHEET_MIN_SIDE = 128   # frames are scaled up (nearest, whole multiples) until their short side reaches this
SHEET_LABEL_PX = 14


def write_contact_sheet(path: str | Path, frames_THWC: np.ndarray, columns: int, gap: int = 4,
                        title: list[str] = ()) -> Path:
    """Every frame in a grid, `columns` per row (one row per clip when columns = frames per clip), each
    labelled with its frame index, under `title` lines (prompt, seed, ...). Small frames are enlarged by a
    whole factor with nearest-neighbour pixels, so a 32 px model's output is readable and unblurred."""
    from PIL import ImageDraw, ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w = frames_THWC.shape[:3]
    scale = max(1, -(-SHEET_MIN_SIDE // min(h, w)))
    fh, fw = h * scale, w * scale
    columns = max(1, min(columns, t))
    rows = -(-t // columns)
    font = ImageFont.load_default(size=SHEET_LABEL_PX)
    line_h = SHEET_LABEL_PX + 4
    width = max(columns * fw + (columns + 1) * gap, 320)
    lines = [piece for text in title for piece in _wrap(text, font, width - 2 * gap)]
    top = gap + len(lines) * line_h
    cell_h = line_h + fh
    sheet = Image.new("RGB", (width, top + rows * (cell_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(lines):
        draw.text((gap, gap + k * line_h), text, fill="black", font=font)
    for i, frame in enumerate(frames_THWC):
        r, c = divmod(i, columns)
        x, y = gap + c * (fw + gap), top + r * (cell_h + gap)
        draw.text((x, y), f"frame {i}", fill="#444444", font=font)
        sheet.paste(Image.fromarray(frame).resize((fw, fh), Image.NEAREST), (x, y + line_h))
    sheet.save(path)
    return path


def _wrap(text: str, font, max_px: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > max_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]
