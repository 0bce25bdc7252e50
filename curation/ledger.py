"""The ledger: one row per input video and one per clip, every score and every decision.

Layout of a run's output folder:

    ledger/parts/<video_id>.videos.parquet   written as each video finishes (the resume marker)
    ledger/parts/<video_id>.clips.parquet
    ledger/videos.parquet                    all videos of the run (consolidated)
    ledger/clips.parquet                     all clips, with keep/decision from the thresholds
    funnel.json                              counts after each step

A part is written under a temporary name and renamed, so a killed run never leaves half a part; a
video with a part is finished and is skipped when the same command runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

VIDEO_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("codec", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("coded_width", pa.int32()),
    ("coded_height", pa.int32()), ("rotation", pa.int32()), ("sar", pa.float64()), ("fps", pa.float64()),
    ("duration_s", pa.float64()), ("num_frames", pa.int64()), ("num_corrupt", pa.int64()),
    ("variable_frame_rate", pa.bool_()), ("has_audio", pa.bool_()), ("size_bytes", pa.int64()),
    ("num_clips", pa.int32()), ("num_usable_clips", pa.int32()), ("process_s", pa.float64()),
    ("processed_on", pa.string()),  # the Ray node that decoded it
])

CLIP_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("source", pa.string()), ("clip_index", pa.int32()),
    ("start_frame", pa.int64()), ("end_frame", pa.int64()), ("num_frames", pa.int64()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("duration_s", pa.float64()), ("fps", pa.float64()),
    ("width", pa.int32()), ("height", pa.int32()), ("boundary", pa.string()), ("clip_path", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
    ("key_frame_indices", pa.list_(pa.int64())),  # the frames the model stages scored
    ("motion_score", pa.float64()), ("motion_pairs", pa.int32()), ("motion_bucket", pa.int32()),
    ("text_area", pa.float64()), ("text_area_frames", pa.list_(pa.float64())), ("text_engine", pa.string()),
    ("content_hash", pa.string()),  # exact-duplicate key (frame count + key frames)
    ("thumb_path", pa.string()),    # key-frame strip for the report, relative to the run folder
    ("captions", pa.list_(pa.struct([("text", pa.string()), ("weight", pa.float64()), ("source", pa.string())]))),
    ("clip_embedding", pa.list_(pa.list_(pa.float32()))),  # K x D, L2-normalised, first/middle/last frame
    ("clip_model", pa.string()),
    ("aesthetic", pa.float64()), ("aesthetic_frames", pa.list_(pa.float64())),
    ("caption_similarity", pa.float64()), ("caption_similarities", pa.list_(pa.float64())),
])

# Written by finalize (like keep, decision and pass_<score>), not by the pipeline: dup_of (str, the clip a
# duplicate was dropped for), dup_similarity (float64; 1.0 for exact duplicates).

# Columns that change from run to run without the data changing (timings, placement).
VOLATILE_COLUMNS = {"process_s", "processed_on"}


class Ledger:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "ledger"
        self.parts = self.dir / "parts"

    def finished_ids(self) -> set[str]:
        if not self.parts.is_dir():
            return set()
        return {p.name.split(".")[0] for p in self.parts.glob("*.videos.parquet")}

    def write_part(self, video_id: str, video: dict, clips: list[dict]) -> None:
        """Clips first, video last: the video part is the marker that the whole video is done."""
        self.parts.mkdir(parents=True, exist_ok=True)
        _atomic_parquet(self.parts / f"{video_id}.clips.parquet", _table(clips, CLIP_SCHEMA))
        _atomic_parquet(self.parts / f"{video_id}.videos.parquet", _table([video], VIDEO_SCHEMA))

    def read_parts(self, video_ids: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        ids = sorted(self.finished_ids() if video_ids is None else set(video_ids) & self.finished_ids())
        videos = [pq.read_table(self.parts / f"{i}.videos.parquet") for i in ids]
        clips = [pq.read_table(self.parts / f"{i}.clips.parquet") for i in ids]
        return (_frame(videos, VIDEO_SCHEMA, "video_id"), _frame(clips, CLIP_SCHEMA, "clip_id"))

    def write(self, videos: pd.DataFrame, clips: pd.DataFrame, funnel: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_parquet(self.dir / "videos.parquet", pa.Table.from_pandas(videos, preserve_index=False))
        _atomic_parquet(self.dir / "clips.parquet", pa.Table.from_pandas(clips, preserve_index=False))
        tmp = self.run_dir / ".funnel.json.tmp"
        tmp.write_text(json.dumps(funnel, indent=2))
        os.replace(tmp, self.run_dir / "funnel.json")

    def read(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        if not (self.dir / "clips.parquet").exists():
            raise FileNotFoundError(f"no ledger in {self.run_dir}: run `lvd curate` with output={self.run_dir} first")
        return pd.read_parquet(self.dir / "videos.parquet"), pd.read_parquet(self.dir / "clips.parquet")


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def _frame(tables: list[pa.Table], schema: pa.Schema, key: str) -> pd.DataFrame:
    table = pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
    return table.to_pandas().sort_values(key, kind="stable").reset_index(drop=True)


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
