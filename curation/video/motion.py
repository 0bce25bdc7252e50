"""Motion score from dense optical flow, as in Stable Video Diffusion's curation.

SVD computes Farneback optical flow at 2 fps and keeps the mean flow magnitude per clip; the score
drops near-static clips and becomes the motion-bucket conditioning. Here the video is decoded once and
streamed through `MotionAnalyzer`: clip boundaries are only known after the whole video was seen, so the
analyzer samples frame pairs over the whole video, keeps only the previous sampled frame (bounded
memory), and records one magnitude per pair. `clip_motion` then scores a clip from the pairs that lie
entirely inside it, so a pair never straddles a cut.

Units of `FlowSamples.magnitude` and of the clip score: short sides per second. The mean flow magnitude
of a pair (pixels of the working frame) is divided by the working short side (resolution-independent)
and by the actual time between the two sampled frames (frame-rate-independent, safe for variable frame
rate). A score of 0.1 means the average pixel moves a tenth of the frame's short side per second.

Large motion: at 2 fps a fast pan moves a frame by a good part of its size between the two frames of a
pair, beyond what a pyramid of a 64-128 px frame can reach (OpenCV's Farneback stops its pyramid at 32
px), so plain flow scores a fast pan *lower* than a slow one. `large_motion_assist` estimates the
dominant translation by phase correlation, reruns the flow from it, and keeps per pixel whichever flow
explains the second frame better. Measured on a synthetic pan (short_side 96): plain Farneback is exact
up to ~0.11 short sides per pair and then collapses to ~0.1 short sides per second however fast the pan;
with the assist it reads 3% low at 0.11 per pair, 8% at 0.22 and 15-20% at 0.44.
The assist follows the dominant motion only: a fast mover covering less than about half the frame
(phase correlation then locks onto the still part) is still underestimated, several-fold at 0.3 short
sides per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import pydantic

from common.config import Config

_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# Frame times come from pts * time_base; sums like 12 * (1/24) land a hair below the tick.
_TICK_TOLERANCE_S = 1e-6
# The assist reruns flow only when the dominant shift is at least this fraction of the short side per pair
# (below it plain flow is already exact) and phase correlation found a clear peak.
_ASSIST_MIN_SHIFT = 0.02
_ASSIST_MIN_RESPONSE = 0.05
# A pixel takes the assisted flow only when it explains the second frame better by this many grey levels,
# so flat regions (where both flows fit equally) keep the zero-initialised flow instead of inheriting a shift.
_ASSIST_MARGIN_GREY = 1.0
BUCKET_MAX = 255  # SVD's motion_bucket_id is an embedding of 0..255
SVD_DEFAULT_BUCKET = 127  # what SVD conditions on when no motion is given


class MotionConfig(Config):
    """How frame pairs are sampled, how flow is computed, and how a score maps to SVD's motion bucket."""

    fps: float = 2.0
    """Sampling rate of frame pairs; SVD computes flow at 2 fps."""
    method: Literal["farneback", "dis"] = "farneback"
    """farneback: OpenCV Farneback, as SVD. dis: OpenCV DIS, several times faster (see dis_preset)."""
    dis_preset: Literal["ultrafast", "fast", "medium"] = "fast"
    short_side: int = 96
    """Working size: every frame is resized so its short side is this many px, so a score does not depend
    on the decode's size. 96 keeps a person-sized mover several px wide and DIS's 8 px patches under a
    tenth of the frame, at less than half the cost of 128 (Farneback ~6 ms vs ~13 ms per pair on one
    core); 64 is cheaper still (~2 ms) but Farneback's window then smears small movers over more of the
    frame, so their scores read ~25% higher than at 96 or 128."""
    large_motion_assist: bool = True
    """Phase-correlation start for fast global motion (see the module docstring); False is plain flow as
    in SVD, which underestimates motion faster than ~0.2 short sides per second at 2 fps."""
    bucket_reference: float = 0.04
    """The score that maps to SVD's default motion bucket 127. 0.04 short sides per second is about the
    median whole-video score of the real test videos with motion (talking heads ~0.01, street footage and
    action trailers 0.1-0.13, slides ~0.002)."""
    bucket_exponent: float = 0.5
    """bucket = 127 * (score / bucket_reference) ** bucket_exponent, rounded and clipped to 0..255. Scores
    of real clips spread over two decades, so the square root (0.5) spreads them over the buckets where a
    linear map (1.0) would crowd most clips into the lowest few dozen; at the defaults 0.01 -> 64,
    0.1 -> 201, and from 0.162 up -> 255."""

    @pydantic.field_validator("fps")
    @classmethod
    def _fps_in_range(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 30):
            raise ValueError(f"fps ({v}) must be in (0, 30] frame pairs per second; use 2 as in SVD")
        return v

    @pydantic.field_validator("short_side")
    @classmethod
    def _short_side_in_range(cls, v: int) -> int:
        if not 32 <= v <= 512:
            raise ValueError(f"short_side ({v}) must be between 32 and 512 px (flow needs at least one 32 px "
                             f"pyramid level); use 64 to 128")
        return v

    @pydantic.field_validator("bucket_reference")
    @classmethod
    def _bucket_reference_positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"bucket_reference ({v}) must be a positive score (short sides per second) that "
                             f"maps to bucket 127; use e.g. 0.04, or the median score of your kept clips")
        return v

    @pydantic.field_validator("bucket_exponent")
    @classmethod
    def _bucket_exponent_positive(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 4):
            raise ValueError(f"bucket_exponent ({v}) must be in (0, 4] so the bucket grows with the score; "
                             f"use 0.5 (square root) or 1 (linear)")
        return v


@dataclass
class FlowSamples:
    """One entry per sampled frame pair of a video: frames `index_a[i]` -> `index_b[i]` and their mean
    flow `magnitude[i]` in short sides per second (see the module docstring)."""

    index_a: np.ndarray  # int64
    index_b: np.ndarray  # int64
    magnitude: np.ndarray  # float32
    short_side: int  # working short side the flow was computed at

    def __len__(self) -> int:
        return len(self.magnitude)


class FlowEstimator:
    """Dense flow between two grey frames of the working size: H x W x 2 float32, in working pixels."""

    def __init__(self, config: MotionConfig) -> None:
        self.config = config
        # OpenCV's reference Farneback settings, with the 15 px window (meant for ~128 px frames here)
        # scaled to the working size so a mover's flow spreads over the same fraction of the frame at
        # any short_side.
        winsize = max(5, round(15 * config.short_side / 128) | 1)
        self._farneback = dict(pyr_scale=0.5, levels=3, winsize=winsize, iterations=3, poly_n=5,
                               poly_sigma=1.2)
        self._dis = (cv2.DISOpticalFlow_create(_DIS_PRESETS[config.dis_preset])
                     if config.method == "dis" else None)
        self._shape: tuple[int, int] | None = None
        self._window: np.ndarray | None = None  # Hann window for phase correlation
        self._grid: tuple[np.ndarray, np.ndarray] | None = None  # pixel coordinates for warping

    def __call__(self, grey_a: np.ndarray, grey_b: np.ndarray) -> np.ndarray:
        flow = self._flow(grey_a, grey_b, None)
        if not self.config.large_motion_assist:
            return flow
        self._prepare(grey_a.shape)
        (dx, dy), response = cv2.phaseCorrelate(grey_a.astype(np.float32), grey_b.astype(np.float32), self._window)
        if response < _ASSIST_MIN_RESPONSE or math.hypot(dx, dy) < _ASSIST_MIN_SHIFT * min(grey_a.shape):
            return flow
        start = np.empty((*grey_a.shape, 2), np.float32)
        start[..., 0], start[..., 1] = dx, dy
        assisted = self._flow(grey_a, grey_b, start)
        better = self._residual(grey_a, grey_b, assisted) + _ASSIST_MARGIN_GREY < self._residual(grey_a, grey_b, flow)
        return np.where(better[..., None], assisted, flow)

    def _flow(self, grey_a: np.ndarray, grey_b: np.ndarray, start: np.ndarray | None) -> np.ndarray:
        if self._dis is not None:
            return self._dis.calc(grey_a, grey_b, start)  # DIS starts from `flow` when one is given
        flags = cv2.OPTFLOW_USE_INITIAL_FLOW if start is not None else 0
        return cv2.calcOpticalFlowFarneback(grey_a, grey_b, start, flags=flags, **self._farneback)

    def _residual(self, grey_a: np.ndarray, grey_b: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """How badly `flow` explains frame a by frame b, per pixel, smoothed over 5 x 5 px (grey levels)."""
        xs, ys = self._grid
        warped = cv2.remap(grey_b, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        return cv2.blur(cv2.absdiff(grey_a, warped).astype(np.float32), (5, 5))

    def _prepare(self, shape: tuple[int, int]) -> None:
        if self._shape == shape:
            return
        h, w = shape
        self._shape = shape
        self._window = cv2.createHanningWindow((w, h), cv2.CV_32F)
        self._grid = tuple(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))


class MotionAnalyzer:
    """Streams a video's frames (a `curation.stages.base.FrameAnalyzer`): samples the first frame at or after
    each 1/fps tick, computes flow between consecutive samples, and keeps only the last sampled frame."""

    def __init__(self, config: MotionConfig, fps: float) -> None:
        self.config = config
        self.video_fps = fps  # only used when a frame has no timestamp: time = index / fps
        self._flow = FlowEstimator(config)
        self._period_s = 1.0 / config.fps
        self._first_time_s: float | None = None
        self._next_tick_s = -math.inf
        self._working_wh: tuple[int, int] | None = None
        self._prev: tuple[int, float, np.ndarray] | None = None  # index, time, grey working frame
        self._last_index = -1
        self._index_a: list[int] = []
        self._index_b: list[int] = []
        self._magnitude: list[float] = []

    def push(self, index: int, time_s: float, frame: np.ndarray) -> None:
        assert index > self._last_index, f"frames must arrive in decode order: {index} after {self._last_index}"
        self._last_index = index
        if not math.isfinite(time_s):
            if not (self.video_fps and math.isfinite(self.video_fps) and self.video_fps > 0):
                raise ValueError(f"frame {index} has no timestamp and the video no average fps "
                                 f"({self.video_fps}); pass the stream's fps or decode with timestamps")
            time_s = index / self.video_fps
        if self._first_time_s is None:
            self._first_time_s = time_s  # ticks start at the first frame (streams may not start at 0)
        if time_s < self._next_tick_s - _TICK_TOLERANCE_S:
            return
        grey = self._to_working_grey(frame)
        if self._prev is not None:
            prev_index, prev_time_s, prev_grey = self._prev
            flow = self._flow(prev_grey, grey)
            mean_px = float(cv2.magnitude(flow[..., 0], flow[..., 1]).mean())
            self._index_a.append(prev_index)
            self._index_b.append(index)
            self._magnitude.append(mean_px / min(grey.shape) / (time_s - prev_time_s))
        self._prev = (index, time_s, grey)
        # The next tick on the grid t0 + k/fps strictly after this frame: a grid (rather than "this time +
        # 1/fps") keeps the average rate at fps although each sample lands a little after its tick.
        ticks_passed = math.floor((time_s - self._first_time_s + _TICK_TOLERANCE_S) / self._period_s)
        self._next_tick_s = self._first_time_s + (ticks_passed + 1) * self._period_s

    def finish(self) -> FlowSamples:
        self._prev = None  # release the frame
        return FlowSamples(index_a=np.asarray(self._index_a, np.int64), index_b=np.asarray(self._index_b, np.int64),
                           magnitude=np.asarray(self._magnitude, np.float32), short_side=self.config.short_side)

    def _to_working_grey(self, frame: np.ndarray) -> np.ndarray:
        assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8, \
            f"frames must be RGB uint8 H x W x 3, got {frame.dtype} {frame.shape}"
        if self._working_wh is None:
            # Up or down to exactly short_side: flow windows are in pixels, so only a fixed working size
            # makes scores of small and large decodes comparable.
            h, w = frame.shape[:2]
            scale = self.config.short_side / min(h, w)
            self._working_wh = (max(self.config.short_side, round(w * scale)),
                                max(self.config.short_side, round(h * scale)))
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if grey.shape[::-1] != self._working_wh:  # also absorbs a mid-stream size change
            grey = cv2.resize(grey, self._working_wh, interpolation=cv2.INTER_AREA)
        return grey


def clip_motion(samples: FlowSamples, start: int, end: int) -> tuple[float | None, int]:
    """(mean magnitude, num_pairs) over the pairs with both frames in the clip [start, end); (None, 0)
    when none fits, i.e. the clip holds fewer than two sampled frames (shorter than 1-2 sampling periods)."""
    inside = (samples.index_a >= start) & (samples.index_b < end)
    num_pairs = int(inside.sum())
    if num_pairs == 0:
        return None, 0
    return float(samples.magnitude[inside].mean(dtype=np.float64)), num_pairs


def motion_bucket(score: float, config: MotionConfig) -> int:
    """SVD's motion_bucket_id for a motion score: 127 at `bucket_reference`, growing as a power of the
    score (monotonic), clipped to 0..255."""
    if math.isnan(score):
        raise ValueError("motion score is NaN; score clips with clip_motion and give clips it returns None "
                         "for the default bucket 127 or drop them")
    ratio = max(0.0, score) / config.bucket_reference
    bucket = SVD_DEFAULT_BUCKET * ratio ** config.bucket_exponent if math.isfinite(ratio) else math.inf
    return round(min(float(BUCKET_MAX), bucket))
