"""A fake curation run (ledger + clip files) with known content, for the tests and the benchmark.

No curation code runs: the clips are small synthetic mp4s and the ledger (clips, decisions, funnel) is
written from pandas frames by `Ledger.write_frames`, in the run folder layout of a real run. Frame j of clip c
is flat colour (R, G, B) = (frame_level(j), clip_level(c), 128), so a decoded frame tells which clip and which
frame it is. Video ids are 16 hex digits as in a real run, counting up in their first 8 (the bucket hash), so
the clips spread over the ledger's buckets and sort by clip_id in the order they were made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from curation.ledger import Ledger
from curation.testing.synthetic import write_video


def frame_level(j: int) -> int:
    return (j * 10) % 250


def clip_level(c: int) -> int:
    return (c * 37) % 250


def fake_ids(c: int) -> tuple[str, str]:
    """(video_id, clip_id) of clip c: three clips per video, the video number in the bucket-hash digits."""
    video_id = f"{c // 3:08x}00000000"
    return video_id, f"{video_id}-{c % 3:04d}"


def clip_number(clip_id: str) -> int:
    """The c of a clip id from `fake_ids`."""
    video_id, index = clip_id.split("-")
    return 3 * int(video_id[:8], 16) + int(index)


def clip_frames(c: int, num_frames: int, h: int, w: int):
    for j in range(num_frames):
        frame = np.empty((h, w, 3), np.uint8)
        frame[..., 0], frame[..., 1], frame[..., 2] = frame_level(j), clip_level(c), 128
        yield frame


def fake_run(run_dir: str | Path, num_clips: int = 8, num_frames: int = 16, fps: float = 8.0,
             sizes: list[tuple[int, int]] | None = None, seed: int = 0, captions: bool = False,
             dropped_every: int = 4, failed: int = 1, clip_bytes: bytes | None = None,
             embedding_dim: int | None = None, unembedded_every: int = 4) -> pd.DataFrame:
    """Writes `num_clips` usable clips (every `dropped_every`-th with keep=False) and `failed` failed ones.
    `sizes` ((h, w) per clip, cycled) gives aspect ratios to bucket. `clip_bytes`, when given, is written as
    every clip's file instead of a synthetic video (the benchmark's large clips).
    `embedding_dim`: also a `clip_embedding` column as the clip stage writes it (list<list<float32>>, 3 key
    frames x embedding_dim, unit rows, seeded per clip so the other columns stay those of a run without it);
    None for the failed clips and for every `unembedded_every`-th usable one (index 1, 1 + n, ...), as for
    clips the stage did not score."""
    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    sizes = sizes or [(48, 80)]
    rows = []
    for c in range(num_clips + failed):
        video_id, clip_id = fake_ids(c)
        h, w = sizes[c % len(sizes)]
        ok = c < num_clips
        path = run_dir / "clips" / video_id / f"{clip_id}.mp4"
        if ok:
            if clip_bytes is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(clip_bytes)
            else:
                write_video(path, clip_frames(c, num_frames, h, w), fps=fps, gop=8)
        keep = ok and (dropped_every == 0 or c % dropped_every != dropped_every - 1)
        if keep:
            decision, code, detail = "", None, None
        elif ok:
            decision, code, detail = "motion_score: fake drop", "motion_score_below_min", "fake drop"
        else:
            decision, code, detail = "failed: decode_error: fake", "decode_error", "fake"
        row = {
            "clip_id": clip_id, "video_id": video_id, "source": f"/videos/{video_id}.mp4", "clip_index": c % 3,
            "start_frame": 0, "end_frame": num_frames, "num_frames": num_frames, "start_s": 0.0,
            "end_s": num_frames / fps, "duration_s": num_frames / fps, "fps": fps, "width": w, "height": h,
            "boundary": "cut", "clip_path": str(path) if ok else None, "status": "ok" if ok else "failed",
            "reason": None if ok else "decode_error: fake", "motion_score": float(rng.uniform(0, 0.5)),
            "motion_pairs": 4, "motion_bucket": int(rng.integers(0, 256)),
            "text_area": float(rng.uniform(0, 0.1)), "text_area_frames": [0.0, 0.01, 0.02],
            "text_engine": "fake", "aesthetic": float(rng.uniform(3, 7)) if c % 5 else np.nan,
            "pass_motion_score": keep, "keep": keep, "decision": decision, "reason_code": code, "reason_detail": detail,
        }
        if captions:
            row["captions"] = [{"text": f"clip {c} caption a", "weight": 3.0}, {"text": f"clip {c} caption b", "weight": 1.0}]
        if embedding_dim is not None:
            row["clip_embedding"] = None
            if ok and not (unembedded_every and c % unembedded_every == 1):
                emb = np.random.default_rng([seed, c, 0xE3B]).standard_normal((3, embedding_dim)).astype(np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                row["clip_embedding"] = emb.tolist()
        rows.append(row)
    clips = pd.DataFrame(rows)
    videos = pd.DataFrame([{"video_id": v, "source": group["source"].iloc[0], "status": "ok", "num_clips": len(group),
                            "num_usable_clips": int((group["status"] == "ok").sum())}
                           for v, group in clips.groupby("video_id", sort=True)])
    funnel = [{"step": "videos", "count": len(videos)},
              {"step": "usable clips", "count": int((clips["status"] == "ok").sum())},
              {"step": "kept", "count": int(clips["keep"].sum())}]
    Ledger(run_dir).write_frames(videos, clips, funnel)
    return clips


def manifest_of(samples: pd.DataFrame, folder: str | Path | None = None, **info) -> "Manifest":
    """A shard folder holding only a manifest of `samples` (one manifest file, no tars): for plan tests and
    benchmarks that need no sample bytes."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.manifest import Manifest, part_name
    from shards.writer import write_index

    folder = Path(folder or tempfile.mkdtemp(prefix="lvd-manifest-"))
    shard = "shard-000000-00000.tar"
    table = pa.Table.from_pandas(samples.assign(shard=shard), preserve_index=False)
    (folder / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / part_name(shard))
    write_index(folder, [{"shard": shard, "num_samples": len(samples), "size_bytes": 0, "sha256": ""}],
                {"selection": "keep", "num_skipped": 0, **info})
    return Manifest.load(str(folder))


def repack_hostile(folder: Path, keys: dict[str, str] | None = None,
                   members: dict[str, dict[str, str]] | None = None) -> None:
    """Rewrites a (small) shard folder in place as an attacker would: sample k's key becomes keys[k] in the
    manifest and its tars, the tar member of sample k with extension ext is named members[k][ext]; every offset
    and checksum is recomputed, so that only the names give the shards away."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.manifest import SHARDS_SCHEMA, Manifest, part_name, part_table
    from shards.reader import SampleReader
    from shards.tario import BLOCK, END_OF_ARCHIVE, crc32, member_bytes

    keys, members = keys or {}, members or {}
    manifest = Manifest.load(str(folder))
    reader = SampleReader(str(folder))
    by_shard: dict[str, list[dict]] = {}
    for rec in manifest.table.to_pylist():
        by_shard.setdefault(rec["shard"], []).append(rec)
    shard_rows = []
    for shard, recs in sorted(by_shard.items()):
        rows = []
        files = [{ext: bytes(v) for ext, v in reader.read(rec).items()} for rec in recs]
        out = bytearray()
        for rec, sample in zip(recs, files):
            key, start, layout = keys.get(rec["key"], rec["key"]), len(out), []
            for ext in sorted(sample):
                data = sample[ext]
                member = member_bytes(members.get(rec["key"], {}).get(ext, f"{key}.{ext}"), data)
                header = len(member) - len(data) - (-len(data)) % BLOCK
                layout.append({"ext": ext, "offset": len(out) - start + header, "size": len(data), "crc32": crc32(data)})
                out += member
            rows.append({**rec, "key": key, "offset": start, "size_bytes": len(out) - start,
                         "crc32": crc32(bytes(out[start:])), "members": layout})
        out += END_OF_ARCHIVE
        (Path(folder) / shard).write_bytes(out)
        shard_rows.append({"shard": shard, "num_samples": len(recs), "size_bytes": len(out),
                           "sha256": hashlib.sha256(out).hexdigest()})
        pq.write_table(part_table(rows, manifest.schema, shard_rows[-1]), Path(folder) / part_name(shard))
    reader.close()
    pq.write_table(pa.Table.from_pylist(shard_rows, schema=SHARDS_SCHEMA), Path(folder) / "shards.parquet")
