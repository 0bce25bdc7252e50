"""The ledger: one row per input video and one per clip, every score and every decision.

Layout of a run's output folder (every dataset is hive-partitioned by a hash bucket of the video id, so a
task that needs one video's rows reads one folder, and written by Ray tasks, never by the driver):

    inputs/part-*.parquet                    the expanded input list (listing tasks write it)
    ledger/videos/bucket=NNN/<name>.parquet  one row per input video (the commit marker of its clips)
    ledger/clips/bucket=NNN/<name>.parquet   one row per clip of those videos, every score
    decisions/bucket=NNN/<name>.parquet      keep / reason per clip: same basename and row order as the
                                             clips file it decides (positional 1:1), rewritten by
                                             `--rethreshold` without touching the scores
    decisions/_summary.json                  the rules as resolved (percentiles -> values), the funnel
    funnel.json                              counts after each step

A writer task writes the clips file, then the videos file, each under a temporary name and renamed: a
videos file is the marker that its videos are done. A clips file without its videos file (a task killed
between the two renames) is removed by `recover()` before the next run reads anything, so a killed task
loses only its uncommitted videos and the next run redoes them. A task Ray retried after it had already
committed may commit its videos a second time under another name; `drop_duplicate_videos()` keeps the
first file (by name) of each such video, so no clip is counted twice.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

VIDEO_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("source", pa.string()),
    ("source_raw", pa.binary()),  # the path's bytes when it is not valid UTF-8 (`source` then shows it escaped)
    ("status", pa.string()), ("reason", pa.string()), ("reason_code", pa.string()), ("reason_detail", pa.string()),
    ("codec", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("coded_width", pa.int32()),
    ("coded_height", pa.int32()), ("rotation", pa.int32()), ("sar", pa.float64()), ("fps", pa.float64()),
    ("duration_s", pa.float64()), ("num_frames", pa.int64()), ("num_corrupt", pa.int64()),
    ("variable_frame_rate", pa.bool_()), ("has_audio", pa.bool_()), ("size_bytes", pa.int64()),
    ("num_clips", pa.int32()), ("num_usable_clips", pa.int32()), ("process_s", pa.float64()),
    ("processed_on", pa.string()),  # the Ray node that decoded it
])

CAPTION_TYPE = pa.struct([("text", pa.string()), ("weight", pa.float64()), ("source", pa.string())])

CLIP_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("source", pa.string()), ("clip_index", pa.int32()),
    ("start_frame", pa.int64()), ("end_frame", pa.int64()), ("num_frames", pa.int64()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("duration_s", pa.float64()), ("fps", pa.float64()),
    ("width", pa.int32()), ("height", pa.int32()), ("boundary", pa.string()), ("clip_path", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("reason_code", pa.string()), ("reason_detail", pa.string()),
    ("key_frame_indices", pa.list_(pa.int64())),  # the frames the model stages scored
    ("motion_score", pa.float64()), ("motion_pairs", pa.int32()), ("motion_bucket", pa.int32()),
    ("text_area", pa.float64()), ("text_area_frames", pa.list_(pa.float64())), ("text_engine", pa.string()),
    ("content_hash", pa.string()),  # exact-duplicate key (frame count + key frames)
    ("thumb_path", pa.string()),    # key-frame strip for the report, relative to the run folder
    ("captions", pa.list_(CAPTION_TYPE)),
    ("clip_embedding", pa.list_(pa.list_(pa.float32()))),  # K x D, L2-normalised, first/middle/last frame
    ("clip_model", pa.string()),
    ("aesthetic", pa.float64()), ("aesthetic_frames", pa.list_(pa.float64())),
    ("caption_similarity", pa.float64()), ("caption_similarities", pa.list_(pa.float64())),
])

# What crosses Ray between the decode actors, the model stages and the writer: one row per video, its clips
# nested (typed, no JSON), and per clip the JPEG key frames the model stages read (never written).
CLIP_TYPE = pa.struct(list(CLIP_SCHEMA))
ROW_SCHEMA = pa.schema([*VIDEO_SCHEMA, ("clips", pa.list_(CLIP_TYPE)),
                        ("key_frames", pa.list_(pa.list_(pa.binary()))),
                        ("clip_frames", pa.list_(pa.list_(pa.binary())))])

# decisions/ files: one row per clip of the clips file of the same name, in the same order, plus one
# `pass_<score>` bool column per threshold rule.
DECISION_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("keep", pa.bool_()),
    ("decision", pa.string()),       # why not kept, human-readable ("" when kept)
    ("reason_code", pa.string()), ("reason_detail", pa.string()),  # the same, as a stable code + detail
    ("dup_of", pa.string()), ("dup_similarity", pa.float64()),    # the survivor a duplicate was dropped for
])
DECISION_COLUMNS = tuple(DECISION_SCHEMA.names)

# Columns that change from run to run without the data changing (timings, placement).
VOLATILE_COLUMNS = {"process_s", "processed_on"}

DEFAULT_NUM_BUCKETS = 16
_REASON = re.compile(r"([a-z][a-z0-9_]*)(?::\s*(.*))?\Z", re.S)


def split_reason(reason: str | None) -> tuple[str | None, str | None]:
    """A reason as (stable code, detail): "decode_timeout: 61 s" -> ("decode_timeout", "61 s"); a reason
    that does not start with a code gets "other" and keeps its whole text as the detail."""
    if not reason:
        return None, None
    m = _REASON.match(reason)
    if m is None:
        return "other", reason
    return m.group(1), m.group(2) or ""


def bucket_of(video_id: str, num_buckets: int) -> int:
    return int(video_id[:8], 16) % num_buckets


def bucket_dir(bucket: int) -> str:
    return f"bucket={bucket:03d}"


def display_source(source: str) -> tuple[str, bytes | None]:
    """(a printable, valid-UTF-8 form of a path, its raw bytes when the path is not valid UTF-8)."""
    raw = os.fsencode(source)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


class Ledger:
    """The ledger datasets of one run folder. Reads project columns and push filters down."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "ledger"
        self.videos_dir = self.dir / "videos"
        self.clips_dir = self.dir / "clips"
        self.decisions_dir = self.run_dir / "decisions"
        self.meta_path = self.dir / "_meta.json"

    # -- layout ------------------------------------------------------------------------------------------
    def num_buckets(self, wanted: int | None = None) -> int:
        """The run's bucket count: fixed by its first run (a resume must hash the same way)."""
        if self.meta_path.is_file():
            return int(json.loads(self.meta_path.read_text())["num_buckets"])
        n = wanted or DEFAULT_NUM_BUCKETS
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_text(self.meta_path, json.dumps({"num_buckets": n, "layout": 2}))
        return n

    def has_rows(self) -> bool:
        return any(self.videos_dir.glob("bucket=*/*.parquet"))

    def video_files(self) -> list[Path]:
        return sorted(self.videos_dir.glob("bucket=*/*.parquet"))

    def clip_files(self) -> list[Path]:
        """Every committed clips file, in a fixed order (bucket, then name)."""
        return sorted(self.clips_dir.glob("bucket=*/*.parquet"))

    def decision_file(self, clips_file: Path, root: Path | None = None) -> Path:
        return (root or self.decisions_dir) / clips_file.parent.name / clips_file.name

    def recover(self) -> int:
        """Removes what a killed writer left: temporary files, and clips files whose videos file was never
        committed. Returns how many files were removed. Costs one listing of the ledger folders."""
        removed = 0
        for tmp in [*self.dir.glob("**/.*.tmp"), *self.decisions_dir.glob("**/.*.tmp")]:
            tmp.unlink(missing_ok=True)
            removed += 1
        for clips in self.clip_files():
            if not (self.videos_dir / clips.parent.name / clips.name).exists():
                clips.unlink()
                removed += 1
        return removed

    # -- writing (in tasks) ------------------------------------------------------------------------------
    def commit(self, bucket: int, videos: pa.Table, clips: pa.Table) -> str:
        """Writes one bucket's videos and clips as a committed pair of files; returns the file name."""
        name = f"{uuid.uuid4().hex}.parquet"
        clip_path = self.clips_dir / bucket_dir(bucket) / name
        video_path = self.videos_dir / bucket_dir(bucket) / name
        atomic_parquet(clip_path, clips)
        atomic_parquet(video_path, videos)  # last: the commit marker
        return name

    def drop_duplicate_videos(self) -> int:
        """Where Ray retried a writer task that had already committed, a video is in two files: keeps the first
        file (by name) of each such video and rewrites the others without it. Returns the videos dropped.
        One DuckDB pass over the video ids; rewrites only the files that hold a duplicate."""
        files = self.video_files()
        if len(files) < 2:
            return 0
        import duckdb

        with duckdb.connect() as db:
            rows = db.execute(
                "SELECT f, list(video_id) FROM (SELECT video_id, filename AS f, row_number() OVER "
                "(PARTITION BY video_id ORDER BY filename) AS n FROM read_parquet(?, filename=true)) "
                "WHERE n > 1 GROUP BY f", [[str(f) for f in files]]).fetchall()
        dropped = 0
        for name, ids in rows:
            video_path = Path(name)
            clips_path = self.clips_dir / video_path.parent.name / video_path.name
            drop = pa.array(ids, pa.string())
            videos = pq.read_table(video_path, schema=VIDEO_SCHEMA)
            clips = pq.read_table(clips_path, schema=CLIP_SCHEMA)
            atomic_parquet(clips_path, clips.filter(pc.invert(pc.is_in(clips.column("video_id"), drop))))
            atomic_parquet(video_path, videos.filter(pc.invert(pc.is_in(videos.column("video_id"), drop))))
            dropped += len(ids)
        return dropped

    def write_frames(self, videos: Any, clips: Any, funnel: list[dict] | None = None,
                     num_buckets: int = 4) -> None:
        """Writes pandas frames (videos, clips with optional decision columns) as a committed ledger, one file
        per bucket: for fixtures, tests and small imports. Runs write through the pipeline's writer tasks."""
        import pandas as pd

        n = self.num_buckets(num_buckets)
        videos = pd.DataFrame(videos).copy()
        clips = pd.DataFrame(clips).copy()
        for frame in (videos, clips):
            frame["_bucket"] = [bucket_of(v, n) for v in frame["video_id"].astype(str)]
        decision_cols = [c for c in clips.columns if c in DECISION_COLUMNS[1:] or c.startswith("pass_")] \
            if "keep" in clips.columns else []
        for bucket in sorted(set(videos["_bucket"]) | set(clips["_bucket"])):
            v = videos[videos["_bucket"] == bucket].drop(columns="_bucket")
            c = clips[clips["_bucket"] == bucket].drop(columns="_bucket")
            name = self.commit(bucket, _frame_table(v, VIDEO_SCHEMA), _frame_table(c, CLIP_SCHEMA))
            if decision_cols:
                passes = [x for x in decision_cols if x.startswith("pass_")]
                schema = pa.schema([*DECISION_SCHEMA, *((x, pa.bool_()) for x in passes)])
                atomic_parquet(self.decision_file(self.clips_dir / bucket_dir(bucket) / name), _frame_table(c, schema))
        if funnel is not None:
            atomic_text(self.run_dir / "funnel.json", json.dumps(funnel, indent=2))

    # -- reading -----------------------------------------------------------------------------------------
    def videos_dataset(self) -> pads.Dataset:
        return _dataset(self.video_files(), VIDEO_SCHEMA)

    def clips_dataset(self) -> pads.Dataset:
        return _dataset(self.clip_files(), CLIP_SCHEMA)

    def committed_ids(self, bucket: int) -> pa.Array:
        """The video ids already committed in one bucket (a pushdown read of one column of one folder)."""
        files = sorted((self.videos_dir / bucket_dir(bucket)).glob("*.parquet"))
        if not files:
            return pa.array([], pa.string())
        return _dataset(files, VIDEO_SCHEMA).to_table(columns=["video_id"]).column("video_id").combine_chunks()

    def iter_clips(self, columns: list[str] | None = None, decisions: bool = True,
                   kept_only: bool = False) -> Iterator[pa.Table]:
        """One table per clips file: its clips (projected to `columns`) with the decision columns beside
        them. Memory is one file's rows at a time."""
        for path in self.clip_files():
            table = read_clip_file(path, self.decision_file(path) if decisions else None, columns, kept_only)
            if table.num_rows:
                yield table

    def read(self, max_clips: int = 2_000_000) -> tuple[Any, Any]:
        """(videos, clips with decisions) as pandas frames: for small runs, tests and notebooks. A run larger
        than `max_clips` is refused; query it with `iter_clips` or DuckDB over ledger/clips instead."""
        if not self.has_rows():
            raise FileNotFoundError(f"no ledger in {self.run_dir}: run `lvd curate` with output={self.run_dir} first")
        count = self.clips_dataset().count_rows()
        if count > max_clips:
            raise ValueError(f"{self.run_dir} holds {count} clips, more than read() loads ({max_clips}); read it "
                             "file by file (Ledger.iter_clips) or query ledger/clips/ with DuckDB")
        videos = self.videos_dataset().to_table().to_pandas()
        tables = list(self.iter_clips(decisions=self.decisions_dir.is_dir()))
        clips = (pa.concat_tables(tables, promote_options="default") if tables
                 else CLIP_SCHEMA.empty_table()).to_pandas()
        return (videos.sort_values("video_id", kind="stable").reset_index(drop=True),
                clips.sort_values("clip_id", kind="stable").reset_index(drop=True))


def read_clip_file(clips_path: Path, decisions_path: Path | None, columns: list[str] | None = None,
                   kept_only: bool = False) -> pa.Table:
    """One clips file, projected, with its decisions file's columns appended (they align row by row)."""
    table = pq.read_table(clips_path, columns=columns, schema=_file_schema(clips_path))
    if decisions_path is None or not decisions_path.is_file():
        if kept_only:
            raise FileNotFoundError(f"{clips_path} has no decisions file ({decisions_path}); run "
                                    "`lvd curate RECIPE --rethreshold` to decide the run")
        return table
    decisions = pq.read_table(decisions_path)
    if decisions.num_rows != table.num_rows:
        raise ValueError(f"{decisions_path} does not match {clips_path} ({decisions.num_rows} vs {table.num_rows} "
                         "rows): re-decide the run with `lvd curate RECIPE --rethreshold`")
    for name in decisions.column_names:
        if name == "clip_id":
            continue
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, decisions.column(name))
    if kept_only:
        table = table.filter(pc.fill_null(table.column("keep"), False))
    return table


def nest_clips(clips: list[dict]) -> list[dict]:
    """Clip rows as the pipeline carries them: every CLIP_SCHEMA field present, reason split into code and
    detail."""
    out = []
    for c in clips:
        row = {f.name: c.get(f.name) for f in CLIP_SCHEMA}
        row["reason_code"], row["reason_detail"] = split_reason(row["reason"])
        out.append(row)
    return out


def pipeline_row(video: dict, clips: list[dict], key_frames: list[list[bytes]] | None = None,
                 clip_frames: list[list[bytes]] | None = None) -> dict:
    """One video's row of ROW_SCHEMA."""
    row = {f.name: video.get(f.name) for f in VIDEO_SCHEMA}
    row["reason_code"], row["reason_detail"] = split_reason(row["reason"])
    if row["source"] is not None:  # a path that is not valid UTF-8: shown escaped, kept as bytes
        row["source"], raw = display_source(row["source"])
        row["source_raw"] = row["source_raw"] or raw
        clips = [{**c, "source": row["source"]} for c in clips]
    row["clips"] = nest_clips(clips)
    row["key_frames"] = key_frames if key_frames is not None else [[] for _ in clips]
    row["clip_frames"] = clip_frames if clip_frames is not None else [[] for _ in clips]
    return row


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def split_rows(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Pipeline rows -> (videos table, clips table), vectorised (list flatten, no per-clip Python)."""
    videos = batch.select([f.name for f in VIDEO_SCHEMA]).cast(VIDEO_SCHEMA)
    flat = pc.list_flatten(batch.column("clips"))
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks() if flat.num_chunks else pa.array([], CLIP_TYPE)
    clips = pa.Table.from_struct_array(flat) if len(flat) else CLIP_SCHEMA.empty_table()
    return videos, clips.cast(CLIP_SCHEMA)


def _frame_table(frame: Any, schema: pa.Schema) -> pa.Table:
    """A pandas frame as a table of `schema`: missing columns become nulls, extra ones are not written."""
    cols = {}
    for f in schema:
        if f.name in frame.columns:
            values = [None if (isinstance(x, float) and x != x and not pa.types.is_floating(f.type)) else x
                      for x in frame[f.name].tolist()]
            cols[f.name] = pa.array(values, f.type, from_pandas=True)
        else:
            cols[f.name] = pa.nulls(len(frame), f.type)
    return pa.table(cols, schema=schema)


def _file_schema(path: Path) -> pa.Schema:
    kind = path.parent.parent.name
    return CLIP_SCHEMA if kind == "clips" else VIDEO_SCHEMA


def _dataset(files: list[Path], schema: pa.Schema) -> pads.Dataset:
    return pads.dataset([str(f) for f in files], schema=schema, format="parquet")


def atomic_parquet(path: Path, table: pa.Table) -> None:
    """Writes `table` under a temporary name and renames it into place (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=16384)
    os.replace(tmp, path)


def atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

