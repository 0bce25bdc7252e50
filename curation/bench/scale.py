"""`lvd bench scale`: does anything on the driver grow with the dataset?

Runs the real curation pipeline (embedded Ray, listing tasks, plan, writer tasks, decisions with
thresholds and exact dedup, the report) at several numbers of videos. Only the decode stage is a stand-in:
it fabricates each video's row in the real schema (~16 clips per video with realistic columns, a 3 x 768
CLIP embedding on every fourth clip) instead of decoding, so the numbers measure the data path, not
decoding. Each N runs in its own process, so peak RSS is that N's alone.

Printed per N: driver peak RSS, wall time, videos/s, time to the first committed ledger file, and the
number of ledger files; then the ratios between the largest and the smallest N. Goals on a 2-core machine:
RSS ratio <= 1.2 and under 1 GiB, time per video ratio <= 1.2, ledger files under 1% of the videos.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

CLIPS_PER_VIDEO = 16
EMBEDDING_EVERY = 4
EMBEDDING_SHAPE = (3, 768)


class StandInDecoder:
    """The decode actor's interface (config, run_dir) -> rows of ROW_SCHEMA, with fabricated rows."""

    def __init__(self, config: dict[str, Any], run_dir: str) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from curation.ledger import pipeline_row, rows_table

        rows = []
        for item in batch.to_pylist():
            video, clips = fabricate(item["video_id"], item["source"])
            video["processed_on"] = self.node
            rows.append(pipeline_row(video, clips))
        return rows_table(rows)


def fabricate(video_id: str, source: str) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(int(video_id, 16))
    n = int(rng.integers(CLIPS_PER_VIDEO // 2, CLIPS_PER_VIDEO * 3 // 2 + 1))
    video = {"video_id": video_id, "source": source, "status": "ok", "codec": "h264", "width": 1280, "height": 720,
             "coded_width": 1280, "coded_height": 720, "rotation": 0, "sar": 1.0, "fps": 24.0,
             "duration_s": 4.0 * n, "num_frames": 96 * n, "num_corrupt": 0, "variable_frame_rate": False,
             "has_audio": True, "size_bytes": int(rng.integers(1e6, 5e7)), "num_clips": n, "num_usable_clips": n,
             "process_s": 0.0}
    clips = []
    motion = rng.gamma(2.0, 0.01, n)
    text = rng.beta(1.0, 30.0, n)
    for i in range(n):
        usable = rng.random() > 0.1
        clip = {"clip_id": f"{video_id}-{i:04d}", "video_id": video_id, "source": source, "clip_index": i,
                "start_frame": 96 * i, "end_frame": 96 * (i + 1), "num_frames": 96, "start_s": 4.0 * i,
                "end_s": 4.0 * (i + 1), "duration_s": 4.0, "fps": 24.0, "width": 1280, "height": 720,
                "boundary": "cut", "clip_path": f"clips/{video_id}/{video_id}-{i:04d}.mp4",
                "status": "ok" if usable else "dropped", "reason": None if usable else "too_short: 1.2 s < 2 s",
                "key_frame_indices": [96 * i, 96 * i + 48, 96 * i + 95]}
        if usable:
            clip.update(motion_score=float(motion[i]), motion_pairs=8, motion_bucket=int(motion[i] * 1000) % 256,
                        text_area=float(text[i]), text_area_frames=[float(text[i])] * 3, text_engine="rapidocr",
                        # one clip in fifty is a re-upload of a clip of another video
                        content_hash=f"h{rng.integers(0, 1000)}" if rng.random() < 0.02 else f"{video_id}{i}",
                        thumb_path=f"thumbs/{video_id}/{video_id}-{i:04d}.jpg",
                        captions=[{"text": "a person walks along a street", "weight": 1.0, "source": "stand-in"}])
            if i % EMBEDDING_EVERY == 0:
                emb = rng.standard_normal(EMBEDDING_SHAPE).astype(np.float32)
                clip.update(clip_embedding=(emb / np.linalg.norm(emb, axis=1, keepdims=True)).tolist(),
                            clip_model="stand-in", aesthetic=float(rng.normal(5, 1)))
        clips.append(clip)
    return video, clips


def run_one(n: int, work: Path) -> dict[str, Any]:
    """One N in this process: the real pipeline with the stand-in decoder, then the report."""
    from curation.config import CurationConfig
    from curation.pipeline import run_curation
    from curation.post.report import write_report
    from curation.post.thresholds import Threshold

    listing = work / "videos.txt"
    with listing.open("w") as f:
        for i in range(n):
            f.write(f"/data/raw/{i // 1000:05d}/video-{i:08d}.mp4\n")
    config = CurationConfig.model_validate({
        "inputs": [f"@{listing}"], "output": str(work / "run"), "text": {"enabled": False},
        "clips": {"mode": "none"}, "ray": {"num_cpus": os.cpu_count() or 2},
        "dedup": {"exact": True, "near": False},
    })
    # set past validation: the stand-in decoder writes text_area itself, with no text stage enabled
    config = config.model_copy(update={"thresholds": {"motion_score": Threshold(drop_bottom_pct=10),
                                                      "text_area": Threshold(max=0.1)}})
    first_commit: list[float] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:  # time to the first committed ledger file (one cheap listing every 0.2 s)
        videos = work / "run" / "ledger" / "videos"
        while not stop.is_set() and not first_commit:
            if videos.is_dir() and any(videos.glob("bucket=*/*.parquet")):
                first_commit.append(time.monotonic() - t0)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run_curation(config, progress=False, decoder=StandInDecoder)
    curate_s = time.monotonic() - t0
    curate_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_report(work / "run")
    wall = time.monotonic() - t0
    stop.set()
    ledger_files = sum(1 for _ in (work / "run" / "ledger").glob("*/bucket=*/*.parquet"))
    return {"n": n, "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "curate_peak_rss_mb": round(curate_rss, 1), "wall_s": round(wall, 2), "curate_s": round(curate_s, 2), "videos_per_s": round(n / wall, 1),
            "first_commit_s": round(first_commit[0], 2) if first_commit else None,
            "num_ledger_files": ledger_files, "clips": next(s["count"] for s in summary.funnel if s["step"] == "clips"),
            "kept": summary.funnel[-1]["count"]}


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
    per_video = (large["wall_s"] / large["n"]) / (small["wall_s"] / small["n"])
    rss = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    files = large["num_ledger_files"] / large["n"]
    return {"n_small": small["n"], "n_large": large["n"], "rss_ratio": round(rss, 3),
            "time_per_video_ratio": round(per_video, 3), "ledger_files_per_video": round(files, 5),
            "goals_met": {"rss_ratio<=1.2": rss <= 1.2, "rss<1GiB": large["driver_peak_rss_mb"] < 1024,
                          "time_per_video_ratio<=1.2": per_video <= 1.2, "ledger_files<1%": files < 0.01}}


def main(argv: list[str] | None = None) -> int:
    """Child mode: `python -m curation.bench.scale --one N --work DIR` prints one JSON row."""
    p = argparse.ArgumentParser()
    p.add_argument("--one", type=int, required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)
    row = run_one(args.one, Path(args.work))
    print("BENCH_ROW " + json.dumps(row), flush=True)
    return 0


def run_bench(sizes: list[int], json_path: str | None, keep: str | None = None, say=print) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lvd-bench-scale-", dir=keep) as tmp:
        for n in sizes:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            say(f"curating {n} stand-in videos ...")
            out = subprocess.run([sys.executable, "-m", "curation.bench.scale", "--one", str(n), "--work", str(work)],
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_ROW ")), None)
            if out.returncode != 0 or line is None:
                raise RuntimeError(f"the run with {n} videos failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(line.removeprefix("BENCH_ROW ")))
            r = rows[-1]
            say(f"  n={r['n']}: driver peak RSS {r['driver_peak_rss_mb']} MB, wall {r['wall_s']} s "
                f"({r['videos_per_s']} videos/s), first committed file after {r['first_commit_s']} s, "
                f"{r['num_ledger_files']} ledger files, {r['clips']} clips, {r['kept']} kept")
    result = {"rows": rows, "ratios": ratios(rows) if len(rows) > 1 else None}
    if result["ratios"]:
        q = result["ratios"]
        say(f"ratios {q['n_large']} vs {q['n_small']}: driver peak RSS x{q['rss_ratio']}, time per video "
            f"x{q['time_per_video_ratio']}, ledger files per video {q['ledger_files_per_video']:.4%}")
        say("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in q["goals_met"].items()))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
