"""Cut detection and clip spans, as in Stable Video Diffusion's curation.

SVD cuts raw videos with a cascade of PySceneDetect detectors at several frame rates: a hard cut is one
large difference between neighbouring frames, while a gradual transition (a dissolve, a fade) only stands
out between frames further apart. `CutDetector` streams the single low-resolution decode through

    native rate        ContentDetector (fixed threshold) + AdaptiveDetector (relative to neighbours)
    each of slow_fps   the same pair on every k-th frame (k = fps / slow_fps), for gradual transitions
    native rate        ThresholdDetector, for fades to and from black

and merges what they find: detections within `merge_within_s` are one cut. It keeps no frame beyond the
detectors' own previous one, only two numbers per frame (8 bytes): the mean intensity, for the dark spans
of fades, and the mean absolute change from the previous frame, to place and delimit gradual transitions.

`clip_spans` then turns the cuts into clips: frames next to each cut or transition are trimmed,
transitions are dropped, short segments are dropped and long scenes split into near-equal parts. Every
frame that is not trimmed lies in exactly one span, and every span (dropped ones too) is returned, so
the ledger accounts for the whole video.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import pydantic
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from common.config import Config

Boundary = Literal["video_start", "cut", "fade", "split"]


class CutsConfig(Config):
    """Detector settings (PySceneDetect's defaults unless noted) and how cuts become clips."""

    content_threshold: float = 27.0
    """ContentDetector: mean change of hue, saturation and value between frames (0-255) that is a cut."""
    adaptive_threshold: float = 3.0
    """AdaptiveDetector: a frame's change must be this many times the mean change of its neighbours..."""
    adaptive_min_content: float = 15.0
    """...and at least this large (on content_threshold's scale)."""
    adaptive_window: int = 2
    """AdaptiveDetector: neighbours on each side that make the reference mean."""
    min_shot_s: float = 0.3
    """Detectors ignore a cut sooner than this after the previous one (flash frames). Kept well below
    clip_min_s (PySceneDetect uses 15 frames): a shot shorter than this is merged into its neighbour, and
    the clip then contains a cut; a short shot that is detected merely becomes a dropped span."""
    slow_fps: list[float] = [4.0, 1.0]
    """Rates of the subsampled passes (every k-th frame, k = round(fps / rate), at least 2). A pass sees a
    transition that lasts about k frames or less as one large change; with the native rate these are
    SVD's three levels. Between frames this far apart steady motion also changes much, so a subsampled
    pass counts a cut only where its content and adaptive detectors agree. [] switches them off."""
    dark_threshold: float = 12.0
    """ThresholdDetector: a frame whose mean intensity (over R, G, B, 0-255) is below this is dark."""
    ramp_step: float = 1.0
    """Frames before (after) a dark span whose mean intensity falls (rises) by at least this much per
    frame are the fade's ramp and belong to the transition."""
    transition_max_s: float = 2.0
    """Longest fade ramp, or longest widening of a gradual transition, on each side."""
    merge_within_s: float = 0.25
    """Detections this close to each other are one cut."""
    clip_min_s: float = 2.0
    """Shorter segments are kept in the result but marked dropped."""
    clip_max_s: float = 10.0
    """Longer scenes are split into the fewest near-equal parts no longer than this."""
    trim_s: float = 0.1
    """Frames this close to a cut or transition are in neither neighbouring clip (nothing is trimmed at
    the start or end of the video): an encoder smears a cut over a frame, and a cut may be one frame off."""

    @pydantic.field_validator("content_threshold", "adaptive_min_content", "dark_threshold")
    @classmethod
    def _intensity(cls, v: float, info: pydantic.ValidationInfo) -> float:
        if not (math.isfinite(v) and 0 < v < 255):
            raise ValueError(f"{info.field_name} ({v}) is an 8-bit intensity (difference); use a value in "
                             f"(0, 255), e.g. {cls.model_fields[info.field_name].default}")
        return v

    @pydantic.field_validator("adaptive_threshold", "ramp_step", "clip_min_s", "clip_max_s", "transition_max_s",
                              "merge_within_s", "min_shot_s")
    @classmethod
    def _positive(cls, v: float, info: pydantic.ValidationInfo) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name} ({v}) must be a positive number; use e.g. "
                             f"{cls.model_fields[info.field_name].default}")
        return v

    @pydantic.field_validator("adaptive_window")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"adaptive_window ({v}) must be at least 1 frame on each side; use 2")
        return v

    @pydantic.field_validator("slow_fps")
    @classmethod
    def _slow_fps(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(f"slow_fps ({v}) must list positive rates such as [4, 1], or be [] to switch the "
                             f"subsampled passes off; remove {bad}")
        return v

    @pydantic.field_validator("trim_s")
    @classmethod
    def _trim(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"trim_s ({v}) must be zero or a positive time in seconds; use e.g. 0.1")
        return v

    @pydantic.model_validator(mode="after")
    def _lengths(self) -> "CutsConfig":
        if self.clip_min_s >= self.clip_max_s:
            raise ValueError(f"clip_min_s ({self.clip_min_s:g}) must be below clip_max_s ({self.clip_max_s:g}); "
                             f"lower clip_min_s or raise clip_max_s")
        # A scene just over clip_max_s is split into two halves of just over clip_max_s / 2, which must
        # still be long enough to keep.
        if 2 * self.clip_min_s > self.clip_max_s:
            raise ValueError(f"clip_min_s ({self.clip_min_s:g}) must be at most half of clip_max_s "
                             f"({self.clip_max_s:g}), or a scene just over clip_max_s splits into parts shorter "
                             f"than clip_min_s; lower clip_min_s or raise clip_max_s")
        if 2 * self.trim_s >= self.clip_min_s:
            raise ValueError(f"trim_s ({self.trim_s:g}) must be below half of clip_min_s ({self.clip_min_s:g}), "
                             f"as a clip is trimmed at both ends; lower trim_s")
        return self


@dataclass
class CutResult:
    """Shot boundaries of one video, in frame indices of the decode."""

    cuts: list[int]
    """Frames where a new shot starts (never 0), sorted; one per cut however many detectors found it."""
    transitions: list[tuple[int, int]]
    """[first, last] frames (inclusive) that belong to no shot: fades through black, dark spans and
    gradual transitions; sorted and disjoint. A fade's cut lies inside it; a fade at the start or the
    end of the video has none."""
    num_frames: int
    found_by: dict[int, list[str]] = field(default_factory=dict)
    """cut -> the detectors that found it: "content", "adaptive", "threshold", "content@4fps", ...;
    "dark" for a dark span that the threshold detector let pass (too soon after the previous cut)."""
    transition_kinds: list[str] = field(default_factory=list)
    """One per transition: "dark" (a fade through or a span of near-black frames) or "gradual"."""


@dataclass
class ClipSpan:
    """Frames [start, end) of one segment; `drop_reason` is None for a usable clip."""

    start: int
    end: int
    drop_reason: str | None
    boundary: Boundary
    """How the span's start came about."""

    @property
    def num_frames(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Hit:
    """One detector's cut. A subsampled pass only knows the change lies in (frame - stride, frame]."""

    frame: int
    name: str
    stride: int = 1


class _Pass:
    """A ContentDetector + AdaptiveDetector pair that looks at every `stride`-th frame."""

    def __init__(self, config: CutsConfig, stride: int, min_shot: int, label: str):
        self.stride = stride
        self.names = (f"content{label}", f"adaptive{label}")
        # Timecodes keep the frame numbers of the full-rate video, so min_scene_len counts full-rate frames.
        self.detectors = (
            ContentDetector(threshold=config.content_threshold, min_scene_len=min_shot),
            AdaptiveDetector(adaptive_threshold=config.adaptive_threshold, min_scene_len=min_shot,
                             window_width=config.adaptive_window, min_content_val=config.adaptive_min_content),
        )
        self.found: tuple[set[int], set[int]] = (set(), set())

    def process(self, timecode: FrameTimecode, frame_bgr: np.ndarray) -> None:
        for detector, found in zip(self.detectors, self.found):
            found.update(tc.frame_num for tc in detector.process_frame(timecode, frame_bgr))

    def post_process(self, timecode: FrameTimecode) -> None:
        for detector, found in zip(self.detectors, self.found):
            found.update(tc.frame_num for tc in detector.post_process(timecode))

    def hits(self) -> list[_Hit]:
        if self.stride == 1:
            return [_Hit(f, name) for name, found in zip(self.names, self.found) for f in found]
        agreed = self.found[0] & self.found[1]
        return [_Hit(f, name, self.stride) for f in agreed for name in self.names]


def slow_strides(fps: float, slow_fps: list[float]) -> dict[float, int]:
    """slow rate -> every how many frames its pass looks; rates that give the same stride run once."""
    strides: dict[float, int] = {}
    for rate in slow_fps:
        stride = max(2, round(fps / rate))
        if stride not in strides.values():
            strides[rate] = stride
    return strides


class CutDetector:
    """Streams frames through SVD's detector cascade; `finish` merges their cuts. A `FrameAnalyzer`."""

    def __init__(self, config: CutsConfig, fps: float):
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps ({fps}) must be a positive frame rate; pass the stream's average rate")
        self.config = config
        self.fps = fps
        min_shot = max(1, round(config.min_shot_s * fps))
        self._passes = [_Pass(config, 1, min_shot, "")] + [
            _Pass(config, stride, min_shot, f"@{rate:g}fps")
            for rate, stride in slow_strides(fps, config.slow_fps).items()]
        self._threshold = ThresholdDetector(threshold=config.dark_threshold, min_scene_len=min_shot)
        self._fades: set[int] = set()
        # Two numbers per frame, never the frames themselves.
        self._brightness = array("f")
        self._change = array("f")
        self._prev_bgr: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self._brightness)

    def push(self, index: int, time_s: float, frame: np.ndarray) -> None:
        # Positions are frame indices (time_s is not needed): a variable frame rate only changes how
        # long a clip lasts, which clip_spans computes with the average fps.
        assert index == self.num_frames, f"frames must come in decode order: expected {self.num_frames}, got {index}"
        assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3, "frames are RGB uint8 H x W x 3"
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)  # PySceneDetect expects OpenCV's channel order
        timecode = FrameTimecode(index, fps=self.fps)
        for p in self._passes:
            if index % p.stride == 0:
                p.process(timecode, bgr)
        self._fades.update(tc.frame_num for tc in self._threshold.process_frame(timecode, bgr))
        change = 0.0 if self._prev_bgr is None else cv2.norm(bgr, self._prev_bgr, cv2.NORM_L1) / bgr.size
        self._prev_bgr = bgr
        self._change.append(change)
        self._brightness.append(sum(cv2.mean(frame)[:3]) / 3)  # the ThresholdDetector's measure

    def finish(self) -> CutResult:
        n = self.num_frames
        if n == 0:
            return CutResult(cuts=[], transitions=[], num_frames=0)
        last = FrameTimecode(n - 1, fps=self.fps)
        for p in self._passes:
            p.post_process(last)
        self._fades.update(tc.frame_num for tc in self._threshold.post_process(last))
        hits = [h for p in self._passes for h in p.hits()] + [_Hit(f, "threshold") for f in self._fades]
        return merge_cuts(hits, np.frombuffer(self._brightness, np.float32),
                          np.frombuffer(self._change, np.float32), self.fps, self.config)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last] of each run of True."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    return list(zip(idx[np.r_[0, breaks + 1]].tolist(), idx[np.r_[breaks, len(idx) - 1]].tolist()))


def dark_spans(brightness: np.ndarray, config: CutsConfig, fps: float) -> list[tuple[int, int]]:
    """Runs of dark frames, each widened by the fade ramps into and out of it."""
    n = len(brightness)
    max_ramp = round(config.transition_max_s * fps)
    step = config.ramp_step
    spans: list[tuple[int, int]] = []
    for a, b in _runs(brightness < config.dark_threshold):
        # Frame a-1 is on the fade-out ramp when it is darker than the frame before it by ramp_step (frame 0
        # has none before it: it joins when the ramp reaches back to it); the fade-in ramp mirrors this.
        lo, hi = max(0, a - max_ramp), min(n - 1, b + max_ramp)
        while a > lo and (a == 1 or brightness[a - 2] - brightness[a - 1] >= step):
            a -= 1
        while b < hi and (b == n - 2 or brightness[b + 2] - brightness[b + 1] >= step):
            b += 1
        if spans and a <= spans[-1][1] + 1:
            a = spans.pop()[0]
        spans.append((a, b))
    return spans


def gradual_span(change: np.ndarray, first: int, last: int, max_widen: int) -> tuple[int, int]:
    """The frames a gradual transition found in the window [first, last] spans.

    change[j] is the mean absolute difference between frames j-1 and j. The transition's changes are
    the run of changes of at least half the window's mean, widened beyond the window while they stay
    there (a dissolve longer than the stride). Returns (f, l): changes f..l make the transition, so
    frames f..l-1 are blended and frame l is the first of the new shot.
    """
    n = len(change)
    half = 0.5 * float(change[first : last + 1].mean())
    if half <= 0:  # nothing moved in the window: no frame to single out
        return last, last
    elevated = np.flatnonzero(change[first : last + 1] >= half) + first
    f, l = int(elevated[0]), int(elevated[-1])
    while f > max(1, first - max_widen) and change[f - 1] >= half:
        f -= 1
    while l < min(n - 1, last + max_widen) and change[l + 1] >= half:
        l += 1
    return f, l


def merge_cuts(hits: list[_Hit], brightness: np.ndarray, change: np.ndarray, fps: float,
               config: CutsConfig) -> CutResult:
    """One cut per cluster of detections; dark spans and cuts only the subsampled passes saw become
    transitions."""
    n = len(brightness)
    tol = max(1, round(config.merge_within_s * fps))
    max_widen = round(config.transition_max_s * fps)

    def peak(frames: list[int]) -> int:  # the frame that differs most from its predecessor
        return max(frames, key=lambda f: (change[f], -f))

    hits = sorted({h for h in hits if 0 < h.frame < n}, key=lambda h: (h.frame, h.name))
    transitions: dict[tuple[int, int], str] = {}
    found_by: dict[int, set[str]] = {}

    # Dark spans claim the detections in and near them; an inner one gets one cut (the threshold
    # detector's, in its middle), one at the start or end of the video none: no shot changes there.
    free = hits
    for a, b in dark_spans(brightness, config, fps):
        transitions[(a, b)] = "dark"
        claimed = [h for h in free if a - tol <= h.frame <= b + tol]
        free = [h for h in free if not (a - tol <= h.frame <= b + tol)]
        if a > 0 and b < n - 1:
            inside = [h.frame for h in claimed if h.name == "threshold" and a <= h.frame <= b]
            cut = inside[0] if inside else (a + b + 1) // 2
            found_by.setdefault(cut, set()).update({h.name for h in claimed} | ({"threshold"} if inside else {"dark"}))

    # The others: a subsampled hit is placed at the largest change of its window, then hits within tol
    # of each other are one cut. The native-rate detectors place it exactly when they saw it; a cut only
    # the subsampled passes saw is gradual: its blended frames become a transition, the cut their middle.
    placed = sorted(((h.frame if h.stride == 1 else peak(list(range(max(1, h.frame - h.stride + 1), h.frame + 1))), h)
                     for h in free), key=lambda x: (x[0], x[1].name))
    clusters: list[list[tuple[int, _Hit]]] = []
    for frame, h in placed:
        if clusters and frame - clusters[-1][-1][0] <= tol:
            clusters[-1].append((frame, h))
        else:
            clusters.append([(frame, h)])
    for cluster in clusters:
        native = [f for f, h in cluster if h.stride == 1 and h.name != "threshold"]
        slow = [h for _, h in cluster if h.stride > 1]
        if native or not slow:
            cut = peak(native or [f for f, _ in cluster])
        else:
            f, l = gradual_span(change, min(h.frame - h.stride + 1 for h in slow), max(h.frame for h in slow),
                                max_widen)
            if f < l:
                transitions[(f, l - 1)] = "gradual"
            cut = (f + l) // 2 if f < l else f
        found_by.setdefault(cut, set()).update(h.name for _, h in cluster)

    spans, kinds = _disjoint(transitions)
    cuts: list[int] = []
    for cut in sorted(found_by):
        holder = next((s for s in spans if s[0] <= cut <= s[1]), None)
        if holder is not None:
            if holder[0] == 0 or holder[1] == n - 1 or any(holder[0] <= c <= holder[1] for c in cuts):
                continue  # one cut per transition, none in a transition at either end of the video
        cuts.append(cut)
    return CutResult(cuts=cuts, transitions=spans, num_frames=n,
                     found_by={c: sorted(found_by[c]) for c in cuts}, transition_kinds=kinds)


def _disjoint(transitions: dict[tuple[int, int], str]) -> tuple[list[tuple[int, int]], list[str]]:
    """Overlapping or touching transitions become one; "dark" wins over "gradual"."""
    spans: list[tuple[int, int]] = []
    kinds: list[str] = []
    for (a, b), kind in sorted(transitions.items()):
        if spans and a <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
            kinds[-1] = "dark" if "dark" in (kind, kinds[-1]) else kind
        else:
            spans.append((a, b))
            kinds.append(kind)
    return spans, kinds


def clip_spans(result: CutResult, fps: float, config: CutsConfig) -> list[ClipSpan]:
    """The video as spans between cuts, in order; only the trimmed frames lie in no span.

    Transitions come back as dropped spans, segments shorter than `clip_min_s` (after trimming) as
    dropped spans with their length; scenes longer than `clip_max_s` are split into the fewest
    near-equal parts that fit.
    """
    n = result.num_frames
    if n == 0:
        return []
    trim = math.floor(config.trim_s * fps + 0.5)
    max_frames = max(1, math.floor(config.clip_max_s * fps + 1e-9))
    min_frames = config.clip_min_s * fps - 1e-9
    kinds = dict(zip(result.transitions, result.transition_kinds or ["dark"] * len(result.transitions)))

    # Segments: the video cut at every cut and at both ends of every transition; a cut inside a
    # transition does not split it.
    edges = sorted({0, n, *(c for c in result.cuts if 0 < c < n),
                    *(a for a, _ in result.transitions), *(b + 1 for _, b in result.transitions)})
    segments: list[tuple[int, int, tuple[int, int] | None]] = []  # (start, end, the transition it is)
    for s, e in zip(edges, edges[1:]):
        holder = next((t for t in result.transitions if t[0] <= s <= t[1]), None)
        if holder is not None and segments and segments[-1][2] == holder:
            segments[-1] = (segments[-1][0], e, holder)
        else:
            segments.append((s, e, holder))

    spans: list[ClipSpan] = []
    for i, (s, e, holder) in enumerate(segments):
        before = segments[i - 1][2] if i else None
        boundary: Boundary = ("video_start" if s == 0 else
                              "fade" if kinds.get(holder or before) == "dark" else "cut")
        if holder is not None:
            spans.append(ClipSpan(s, e, f"transition: {kinds[holder]} frames {s}-{e - 1}", boundary))
            continue
        lo, hi = s + (trim if s > 0 else 0), e - (trim if e < n else 0)
        if hi <= lo:  # nothing is left once trimmed; the span keeps its frames so that none goes missing
            spans.append(ClipSpan(s, e, _too_short(0, fps, config), boundary))
            continue
        s, e = lo, hi
        if e - s < min_frames:
            spans.append(ClipSpan(s, e, _too_short(e - s, fps, config), boundary))
            continue
        num_parts = math.ceil((e - s) / max_frames)
        bounds = [s + round(k * (e - s) / num_parts) for k in range(num_parts + 1)]
        for k in range(num_parts):
            length = bounds[k + 1] - bounds[k]
            reason = None if length >= min_frames else _too_short(length, fps, config)
            spans.append(ClipSpan(bounds[k], bounds[k + 1], reason, boundary if k == 0 else "split"))
    return spans


def _too_short(num_frames: int, fps: float, config: CutsConfig) -> str:
    return f"too_short: {num_frames / fps:.2f} s < clip_min_s {config.clip_min_s:.2f}"
