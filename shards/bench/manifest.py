"""`lvd bench manifest`: a subset query and a training plan over a large manifest, and one rank's memory.

    lvd bench manifest --rows 10000000 --json manifest.json

Writes a synthetic manifest of --rows samples with the columns `lvd shards write` gives (the reserved ones:
key, shard, byte range, crc32, files, members, tensor shapes; and the ledger's: ids, times, fps, size, scores,
motion bucket, keep and pass_* flags), in files of --rows-per-file rows, then times
  query    `Manifest.select` of a pct() rule (a DuckDB scan of the columns it names, one aggregate per pct)
  plan     `write_plan` of that query for 8 ranks, one epoch (subset, buckets, the epoch's batch order)
and measures, in a fresh process, the peak RSS of rank 3 of 8 reading its whole slice of the epoch
(the training loader's `PlanBatches` over `RankSlice`, with no shard opened). Goal: under 1 GiB at 10M rows, and no more than 1.2x the value at 1M rows.
JSON keys: rows, query_s, plan_s, rank_peak_rss_mb (and the details: rank_batches, rank_rows, plan_rows,
query_rows, rows_per_file).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.manifest import MANIFEST_DIR, MEMBER, RESERVED_SCHEMA, part_name

QUERY = "keep and aesthetic >= pct(aesthetic, 20) and motion_score between 0.01 and 0.5"
WORLD_SIZE, RANK = 8, 3
MEMBERS = ("first.jpg", "json", "last.jpg", "mp4")
LEDGER = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("source", pa.string()), ("clip_index", pa.int32()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("duration_s", pa.float64()), ("fps", pa.float64()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("motion_score", pa.float64()),
    ("motion_bucket", pa.int32()), ("text_area", pa.float64()), ("aesthetic", pa.float64()),
    ("keep", pa.bool_()), ("pass_motion_score", pa.bool_()), ("pass_text_area", pa.bool_()),
])


def synthetic_part(file: int, first: int, n: int, rng: np.random.Generator) -> pa.Table:
    """`n` manifest rows of one shard (rows first .. first + n - 1), built column by column."""
    ids = np.arange(first, first + n)
    shard = f"shard-{0:06d}-{file:05d}.tar"
    key = pa.array([f"{i:016x}-0000" for i in ids])
    # members: 4 per sample, flat arrays -> list<struct>
    mp4 = rng.integers(200_000, 4_000_000, n)
    m_size = np.stack([np.full(n, 20_000), np.full(n, 900), np.full(n, 20_000), mp4], axis=1)
    padded = (m_size + 511) // 512 * 512
    m_off = np.cumsum(512 + padded, axis=1) - padded  # each member's data after its tar header
    size = m_off[:, -1] + padded[:, -1]               # the sample's byte range: headers and padded data
    offset = np.concatenate([[0], np.cumsum(size)[:-1]])
    every4 = pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32))
    members = pa.ListArray.from_arrays(every4, pa.StructArray.from_arrays(
        [pa.array(np.tile(MEMBERS, n)), pa.array(m_off.reshape(-1)), pa.array(m_size.reshape(-1)),
         pa.array(rng.integers(0, 2**32, 4 * n))], fields=list(MEMBER)))
    duration = rng.uniform(2.0, 12.0, n)
    start = rng.uniform(0, 300, n)
    landscape = rng.random(n) < 0.8
    motion = rng.gamma(2.0, 0.08, n)
    text = rng.beta(1, 12, n)
    aesthetic = rng.normal(5.0, 0.8, n)
    aesthetic[rng.random(n) < 0.01] = np.nan  # some clips without the score
    columns = {
        "key": key, "shard": pa.array([shard] * n), "offset": offset, "size_bytes": size,
        "crc32": rng.integers(0, 2**32, n), "files": pa.ListArray.from_arrays(every4, pa.array(np.tile(MEMBERS, n))),
        "members": members, "latents_shape": pa.nulls(n, pa.list_(pa.int64())),
        "text_shape": pa.nulls(n, pa.list_(pa.int64())), "clip_embedding_shape": pa.nulls(n, pa.list_(pa.int64())),
        "clip_id": key, "video_id": pa.array([f"{i // 8:016x}" for i in ids]),
        "source": pa.array([f"videos/{i // 8:09d}.mp4" for i in ids]), "clip_index": (ids % 8).astype(np.int32),
        "start_s": start, "end_s": start + duration, "duration_s": duration, "fps": np.full(n, 30.0),
        "width": np.where(landscape, 1280, 720).astype(np.int32), "height": np.where(landscape, 720, 1280).astype(np.int32),
        "status": pa.array(["ok"] * n), "motion_score": motion, "motion_bucket": np.minimum(motion * 1000, 255).astype(np.int32),
        "text_area": text, "aesthetic": pa.array(aesthetic, from_pandas=True), "keep": text < 0.2,
        "pass_motion_score": motion > 0.01, "pass_text_area": text < 0.2,
    }
    schema = pa.schema([*RESERVED_SCHEMA, *LEDGER])
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def write_synthetic(folder: Path, rows: int, rows_per_file: int, seed: int = 0) -> None:
    """A shard folder's manifest (no tars): files of `rows_per_file` rows, shards.parquet, info.json."""
    from shards.writer import write_index

    rng = np.random.default_rng(seed)
    (folder / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    shard_rows = []
    for file, first in enumerate(range(0, rows, rows_per_file)):
        table = synthetic_part(file, first, min(rows_per_file, rows - first), rng)
        shard = table.column("shard")[0].as_py()
        pq.write_table(table, folder / part_name(shard))
        shard_rows.append({"shard": shard, "num_samples": table.num_rows,
                           "size_bytes": int(np.sum(table.column("size_bytes"))), "sha256": ""})
    write_index(folder, shard_rows, {"selection": "all_usable", "num_skipped": 0, "skipped": []})


def rank_slice_peak(plan: Path, rank: int, world_size: int) -> dict:
    """Runs one rank's read of its slice of epoch 0 in a fresh process, as the training loader reads it (each
    batch's rows made into the arrays a batch is read from; no shard is opened); its peak RSS and what it read."""
    # VmHWM, not getrusage: ru_maxrss survives exec and would report the forking parent's peak
    code = ("import json, re, sys\n"
            "from shards.config import LoaderConfig\n"
            "from shards.loader import PlanBatches\n"
            "from shards.plan_file import read_plan_doc\n"
            "config = LoaderConfig.model_validate({**read_plan_doc(sys.argv[1])['config'], 'epochs': 1})\n"
            "rank, world = int(sys.argv[2]), int(sys.argv[3])\n"
            "batches, rows = [], 0\n"
            "for _, j, _, (_, _, items) in PlanBatches(sys.argv[1], config, rank, world).stream((0, 0), rank, world, 0, 1):\n"
            "    batches.append(j); rows += len(items)\n"
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
            "print(json.dumps({'batches': batches, 'rows': rows, 'peak_rss_mb': hwm / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(plan), str(rank), str(world_size)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(rows: int, json_path: str | None, work_dir: str | None, rows_per_file: int = 100_000) -> dict:
    from shards.config import LoaderConfig
    from shards.manifest import Manifest
    from shards.plan_file import write_plan

    work = Path(tempfile.mkdtemp(prefix="lvd-bench-manifest-", dir=work_dir))
    try:
        t0 = time.perf_counter()
        write_synthetic(work / "shards", rows, rows_per_file)
        print(f"synthetic manifest: {rows} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        manifest = Manifest.load(str(work / "shards"))
        t0 = time.perf_counter()
        selected = manifest.select(QUERY)
        query_s = time.perf_counter() - t0
        config = LoaderConfig(shards=str(work / "shards"), query=QUERY, batch_size=8, num_frames=[14], fps=7.0,
                              resolutions=[(320, 576), (576, 320), (448, 448)])
        t0 = time.perf_counter()
        summary = write_plan(manifest, config, work / "plan", epochs=1)
        plan_s = time.perf_counter() - t0
        rank = rank_slice_peak(work / "plan", RANK, WORLD_SIZE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"rows": rows, "query_s": round(query_s, 3), "plan_s": round(plan_s, 3),
              "rank_peak_rss_mb": round(rank["peak_rss_mb"], 1), "query_rows": int(len(selected)),
              "plan_rows": summary.num_samples, "plan_batches": summary.batches[0],
              "rank_batches": len(rank["batches"]), "rank_rows": rank["rows"], "rows_per_file": rows_per_file}
    print(f"query  {QUERY!r}: {len(selected)} of {rows} rows in {query_s:.2f} s\n"
          f"plan   {summary.num_samples} samples, {summary.batches[0]} batches for {WORLD_SIZE} ranks in {plan_s:.2f} s\n"
          f"rank   {RANK} of {WORLD_SIZE}: {len(rank['batches'])} batches, {rank['rows']} rows, "
          f"peak RSS {rank['peak_rss_mb']:.0f} MB (goal: < 1024 MB at 10M rows, <= 1.2x the 1M value)")
    if json_path:
        Path(json_path).write_text(json.dumps({**result, "rank_batch_indices": rank["batches"]}, indent=2))
    return result
