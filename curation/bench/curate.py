"""`lvd bench curate`: the CPU pipeline against one plain decode pass of the same videos, in one run.

Both sides use the same number of processes. The decode-only side is what any curation must pay at
least once (every frame decoded sequentially at the working size); the ratio says what cut detection,
optical flow, key frames, OCR and clip files cost on top.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from curation.config import CurationConfig
from curation.video.media import DecodeStats, decode_frames, probe


@dataclass
class BenchResult:
    num_videos: int
    num_frames: int
    num_clips: int
    workers: int
    decode_s: float
    pipeline_s: float
    ray_start_s: float
    decode_peak_mb: float
    pipeline_peak_mb: float

    @property
    def ratio(self) -> float:
        return self.pipeline_s / self.decode_s

    def lines(self) -> list[str]:
        return [
            f"videos {self.num_videos}  frames {self.num_frames}  clips {self.num_clips}  processes {self.workers}",
            f"decode only      {self.decode_s:8.2f} s  {self.num_frames / self.decode_s:8.1f} frames/s  peak RSS {self.decode_peak_mb:7.0f} MB",
            f"full pipeline    {self.pipeline_s:8.2f} s  {self.num_frames / self.pipeline_s:8.1f} frames/s  "
            f"{self.num_clips / self.pipeline_s:6.2f} clips/s  peak RSS {self.pipeline_peak_mb:7.0f} MB  (+{self.ray_start_s:.1f} s Ray start)",
            f"ratio pipeline / decode: {self.ratio:.2f}x  (goal <= 1.5x)",
        ]


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's workers included)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def _decode_one(path: str, short_side: int) -> int:
    stats = DecodeStats()
    for _ in decode_frames(path, probe(path), short_side, stats):
        pass
    return stats.num_frames


def make_bench_videos(out_dir: Path, num_videos: int, seconds: float, height: int, fps: float = 24.0) -> list[Path]:
    from curation.testing.synthetic import hard_cuts, write_video

    width = height * 16 // 9
    width += width % 2
    n = int(seconds * fps)
    cuts = [int(n * k / 4) for k in (1, 2, 3)]  # four shots per video
    return [write_video(out_dir / f"bench_{i:02d}.mp4", hard_cuts(cuts, n, h=height, w=width, speed=2.0 + i), fps)
            for i in range(num_videos)]


def run_bench(config: CurationConfig, videos: list[Path], workers: int) -> BenchResult:
    from common.local_ray import local_ray
    from curation.pipeline import run_curation

    with PeakMemory() as mem_decode:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            num_frames = sum(pool.map(_decode_one, [str(v) for v in videos], [config.decode.short_side] * len(videos)))
        decode_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="lvd-bench-") as out, PeakMemory() as mem_pipe:
        t0 = time.perf_counter()
        with local_ray(num_cpus=workers, include_dashboard=False, logging_level="WARNING"):
            ray_start_s = time.perf_counter() - t0
            config = config.model_copy(update={"inputs": [str(v) for v in videos], "output": out})
            t0 = time.perf_counter()
            summary = run_curation(config, progress=False)
            pipeline_s = time.perf_counter() - t0
    num_clips = next(s["count"] for s in summary.funnel if s["step"] == "clips")
    return BenchResult(len(videos), num_frames, num_clips, workers, decode_s, pipeline_s, ray_start_s,
                       mem_decode.peak_mb, mem_pipe.peak_mb)
