"""Loader throughput against a raw sequential read of the same shard bytes, measured in one run.

    lvd bench loader                      # 160 samples of ~2 MB, latents of ~1 MB, 2 workers
    lvd bench loader --samples 400 --sample-mb 4 --workers 4

Builds a fake curation run of large clips (noise video, so the mp4 does not compress), writes shards, adds
precomputed latents to a copy (training's usual input at scale), then times with a warm page cache, best of
--repeats:
  raw read        every shard file read front to back in 8 MB chunks (the ceiling for these bytes)
  loader raw      ShardLoader(output="raw"), in process: shuffled plan, one ranged read per sample, tar
                  parsing, crc32 of every member, batches of member bytes; the same bytes as the raw read
                  -> ratio of MB/s (and once more without the crc32 check, to show its cost)
  loader latents  ShardLoader(output="tensors") on latents: ranged reads of only the latents and json members,
                  crc32 checked, straight into the batch tensor (shared memory in workers); in process (with
                  and without the crc32 check) and with --workers DataLoader workers -> ratio of samples/s
and prints samples/s, MB/s and the ratio to the raw read (goal: >= 0.9). Decoding mp4 to frames is timed too,
for scale (it is CPU work, not I/O, and is not part of the ratio).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 8 << 20


@dataclass
class Timing:
    name: str
    samples: int
    num_bytes: int
    seconds: float

    @property
    def samples_s(self) -> float:
        return self.samples / self.seconds

    @property
    def mb_s(self) -> float:
        return self.num_bytes / 1e6 / self.seconds

    def line(self, raw: "Timing | None" = None, by: str = "") -> str:
        ratio = ""
        if raw is not None:
            value = self.mb_s / raw.mb_s if by == "bytes" else self.samples_s / raw.samples_s
            ratio = f"{value:8.2f} x raw ({'MB/s' if by == 'bytes' else 'samples/s'})"
        return f"{self.name:<40}{self.samples_s:9.1f} samples/s{self.mb_s:9.1f} MB/s{ratio}"


def noise_clip(path: Path, sample_mb: float, fps: float = 8.0) -> tuple[bytes, int]:
    """An mp4 of about `sample_mb` (noise does not compress) and its frame count."""
    from curation.testing.synthetic import write_video

    rng = np.random.default_rng(0)
    h, w = 240, 320
    frames = []
    for _ in range(8):  # probe the size of 8 noise frames, then scale the frame count
        frames.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    write_video(path, frames, fps=fps, gop=8)
    per_frame = path.stat().st_size / 8
    n = max(8, int(sample_mb * 1e6 / per_frame))
    frames = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n))
    write_video(path, frames, fps=fps, gop=8)
    return path.read_bytes(), n


def raw_read(root: Path, num_samples: int) -> Timing:
    files = sorted(root.glob("shard-*.tar"))
    total, t0 = 0, time.perf_counter()
    buf = bytearray(CHUNK)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return Timing("raw sequential read of the shards", num_samples, total, time.perf_counter() - t0)


def loader_pass(config, name: str) -> Timing:
    """Steady state: the clock starts at the first batch (DataLoader workers start once per run, not per batch)."""
    from shards.loader import ShardLoader

    loader = ShardLoader(config)
    read_per_sample = _bytes_read(loader)
    samples = num_bytes = 0
    t0 = None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        samples += len(batch["key"])
        num_bytes += batch["num_bytes"] if "num_bytes" in batch else sum(read_per_sample[k] for k in batch["key"])
    return Timing(name, samples, num_bytes, time.perf_counter() - t0)


def _bytes_read(loader) -> dict[str, int]:
    """What the loader reads of each sample in tensors mode: the latents member and the json."""
    m = loader.manifest
    rows = loader.batches.planner.rows
    out = {}
    for ext in ("latents.safetensors", "json"):
        _, size, _ = m.member_ranges(rows, ext)
        for key, n in zip(m.samples["key"].iloc[rows], size):
            out[key] = out.get(key, 0) + max(0, int(n))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=160, help="clips (default 160)")
    parser.add_argument("--sample-mb", type=float, default=2.0, help="size of each clip's mp4 (default 2)")
    parser.add_argument("--latents-mb", type=float, default=1.0, help="size of each sample's latents (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the worker rows (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best counts (default 3)")
    parser.add_argument("--decode-samples", type=int, default=16, help="clips decoded for the decode row (default 16)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")


def run_bench(args: argparse.Namespace) -> int:
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lvd-bench-loader-", dir=args.dir) as tmp:
        lines = run(Path(tmp), args)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.bench.loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


def run(tmp: Path, args: argparse.Namespace) -> list[str]:
    import torch
    from safetensors.torch import save

    from shards.config import LoaderConfig, ShardWriteConfig
    from shards.loader import ShardLoader
    from shards.manifest import Manifest
    from curation.testing.fake_runs import fake_run
    from shards.writer import rewrite_shards, write_shards

    mp4, num_frames = noise_clip(tmp / "clip.mp4", args.sample_mb)
    fake_run(tmp / "run", num_clips=args.samples, num_frames=num_frames, fps=8.0, sizes=[(240, 320)],
             dropped_every=0, failed=0, clip_bytes=mp4)
    shard_bytes = max(64 << 20, int(args.samples * (args.sample_mb + args.latents_mb) * 1e6 / 8))
    write_shards(tmp / "run", tmp / "plain", ShardWriteConfig(shard_max_bytes=shard_bytes,
                                                              workers=min(2, os.cpu_count() or 1)))
    _rm(tmp / "run" / "clips")  # the shards hold the bytes now; keep the disk footprint down
    c, t = 4, 14
    w = max(1, int(args.latents_mb * 1e6 / 2) // (c * t * 32))
    blob = save({"latents": torch.randn(t, c, 32, w).to(torch.float16)})  # T x C x H x W, as precompute writes
    rewrite_shards(Manifest.load(str(tmp / "plain")), None, tmp / "shards", ShardWriteConfig(shard_max_bytes=shard_bytes),
                   add_files=lambda key, members: {"latents.safetensors": blob})
    _rm(tmp / "plain")
    root = str(tmp / "shards")
    base = dict(shards=root, batch_size=args.batch_size, epochs=1, remainder="uneven", resolutions=[(240, 320)],
                fps=8.0, num_frames=[min(14, num_frames)], seed=0)
    rows = [
        ("loader raw (whole samples), in process", LoaderConfig(output="raw", num_workers=0, **base), "bytes"),
        ("loader raw, in process, no crc32 check", LoaderConfig(output="raw", num_workers=0, verify_samples=False,
                                                                **base), "bytes"),
        ("loader latents, in process", LoaderConfig(num_workers=0, **base), "samples"),
        ("loader latents, in process, no crc32", LoaderConfig(num_workers=0, verify_samples=False, **base), "samples"),
        (f"loader latents, {args.workers} workers", LoaderConfig(num_workers=args.workers, **base), "samples"),
    ]
    size = Manifest.load(root).samples["size_bytes"].mean()
    lines = [f"{args.samples} samples of {size / 1e6:.2f} MB (mp4 {len(mp4) / 1e6:.2f} MB, {num_frames} frames 320x240; "
             f"latents {len(blob) / 1e6:.2f} MB; jpgs, json); batch {args.batch_size}; warm page cache; best of "
             f"{args.repeats}; {os.cpu_count()} CPUs"]
    raw_read(tmp / "shards", args.samples)  # warm the page cache: every row reads from memory
    timings: dict[str, list[Timing]] = {}
    for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits every row alike
        timings.setdefault("raw", []).append(raw_read(tmp / "shards", args.samples))
        for name, config, _ in rows:
            timings.setdefault(name, []).append(loader_pass(config, name))
    raw = min(timings["raw"], key=lambda x: x.seconds)
    lines.append(raw.line())
    for name, _, by in rows:
        lines.append(min(timings[name], key=lambda x: x.seconds).line(raw, by))
    decode = LoaderConfig(num_workers=0, latents="ignore", **{**base, "resolutions": [(128, 160)]})
    loader, n, t0 = ShardLoader(decode), 0, time.perf_counter()
    for batch in loader:
        n += len(batch["key"])
        if n >= args.decode_samples:
            break
    dt = time.perf_counter() - t0
    lines.append(f"{'decode mp4 -> ' + str(base['num_frames'][0]) + 'x3x128x160 frames, in process':<40}{n / dt:9.1f} "
                 "samples/s  (CPU-bound: scales with workers)")
    lines.append("raw: the sample bytes as read; latents: reads only each sample's latents and json (MB/s counts "
                 "those bytes), so its ratio is in samples/s; the loader checks the crc32 of every member it reads "
                 "(verify_samples, on by default): the rows without it show what that costs")
    return lines


def _rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
