"""A curation run as shards see it: its ledger (clips files and the decisions beside them), read file by file
with pyarrow, and the clip files.

Shards do not know what a score means. Every column of the ledger is carried into the sample json (and every
scalar one, plus captions, into the manifest) as it is, so a score added by a later curation stage (aesthetic,
clip similarity, ...) reaches the training query without a change here.

The exception are array columns (EMBEDDING_COLUMNS, e.g. the clip stage's K x D `clip_embedding`): as JSON text
they would be the largest part of a sample (~49 KB per clip at D=768, against 9 KB as float32) and every
json read would parse them, so they go into one binary member per sample, `emb.safetensors` (one float32
tensor per column the clip has, named like the column), and the manifest records each one's shape
(`<column>_shape`, null where the clip has none).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.ledger import CLIP_SCHEMA, DECISION_SCHEMA, Ledger, read_clip_file

# Shards rely on the meaning of: clip_id, video_id, clip_index (order), status, keep (selection), width,
# height, duration_s (buckets), clip_path (the file). Every other column is passed through as it is.

SELECTIONS = ("keep", "all_usable")
# Not copied into the json or the manifest: a path that is only valid on the writing machine.
LOCAL_ONLY_COLUMNS = ("clip_path",)
CAPTIONS = "captions"
# Ledger columns holding a K x D float array per clip (None where the stage did not score the clip): written as
# tensors of the member EMBEDDING_FILE, not into the json or the manifest (which gets `<column>_shape`).
EMBEDDING_COLUMNS = ("clip_embedding",)
EMBEDDING_FILE = "emb.safetensors"
# Within one ledger file, clips go video by video in clip order.
FILE_ORDER = [("video_id", "ascending"), ("clip_index", "ascending"), ("clip_id", "ascending")]


def embedding_shape_column(column: str) -> str:
    return f"{column}_shape"


class CurationRun:
    """The clips of one `lvd curate` output folder, one ledger file at a time.

    The order of the clips is that of the ledger's files (bucket, then name), and within a file video by video
    in clip order: fixed for a given ledger, so re-runs pack the same shards, and reached without sorting the
    whole run (a global sort by video would hold every clip's ids at once)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.ledger = Ledger(self.run_dir)

    def clip_files(self) -> list[Path]:
        """The ledger's clips files; refuses a run without a ledger or one that was not decided."""
        files = self.ledger.clip_files()
        if not files:
            raise FileNotFoundError(f"no ledger in {self.run_dir} (no {self.ledger.clips_dir}/bucket=*/*.parquet): run "
                                    f"`lvd curate RECIPE --set output={self.run_dir}` first, or point at the folder "
                                    "that holds ledger/ and decisions/")
        undecided = [p for p in files if not self.ledger.decision_file(p).is_file()]
        if undecided:
            raise FileNotFoundError(f"the run was not decided ({len(undecided)} of {len(files)} ledger files have no "
                                    f"decisions, e.g. {self.ledger.decision_file(undecided[0])}): re-run the same "
                                    "`lvd curate` command, or `lvd curate RECIPE --rethreshold`")
        return files

    def schema(self) -> pa.Schema:
        """The columns of a chosen clip: the ledger's, then the decision columns (keep, decision, reason_code,
        ..., one pass_<score> per threshold rule) as the first decisions file has them."""
        decisions = pq.read_schema(self.ledger.decision_file(self.clip_files()[0]))
        decided = [f for f in decisions if f.name != "clip_id"]
        names = {f.name for f in decided}
        typed = [DECISION_SCHEMA.field(f.name) if f.name in DECISION_SCHEMA.names else f for f in decided]
        return pa.schema([*(f for f in CLIP_SCHEMA if f.name not in names), *typed])

    def chosen_file(self, path: Path, selection: str) -> pa.Table:
        """One ledger file's chosen clips with every column of `schema()`, video by video in clip order (a
        group of `lvd shards write`: one task reads it whole, as the sample json carries every column)."""
        if selection not in SELECTIONS:
            raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        schema = self.schema()
        table = read_clip_file(path, self.ledger.decision_file(path), None, kept_only=selection == "keep")
        if selection == "all_usable":
            table = table.filter(pc.equal(table.column("status"), "ok"))
        if set(table.column_names) != set(schema.names):
            raise ValueError(f"{self.ledger.decision_file(path)} has other decision columns than the first "
                             f"decisions file ({sorted(set(table.column_names) ^ set(schema.names))} differ): "
                             "re-decide the run with `lvd curate RECIPE --rethreshold`")
        return table.select(schema.names).cast(schema).sort_by(FILE_ORDER)

    def clip_file(self, row: dict[str, Any]) -> Path:
        """The clip's mp4: the ledger's path, or the run's clips/ folder when the run folder has moved."""
        recorded = row.get("clip_path")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
        return self.run_dir / "clips" / str(row["video_id"]) / f"{row['clip_id']}.mp4"


def manifest_columns(schema: pa.Schema) -> list[str]:
    """Ledger columns that go into the manifest: every scalar column (scores, flags, ids, strings) and the
    captions list; other list columns (per-frame values, embeddings) stay in the sample's own files."""
    return [f.name for f in schema
            if f.name not in LOCAL_ONLY_COLUMNS and f.name not in EMBEDDING_COLUMNS
            and (f.name == CAPTIONS or not pa.types.is_nested(f.type))]


def jsonable(value: Any) -> Any:
    """numpy/pandas values -> plain JSON values; NaN and NA become null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.str_,)):
        return str(value)
    return value


def sample_json(row: dict[str, Any]) -> bytes:
    """Everything the ledger knows about the clip, minus the writer's local path and the embeddings (which go
    into the binary member, see `embedding_file`)."""
    doc = {k: jsonable(v) for k, v in row.items() if k not in LOCAL_ONLY_COLUMNS and k not in EMBEDDING_COLUMNS}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def embedding_array(value: Any, column: str) -> np.ndarray | None:
    """A ledger cell of an embedding column -> a contiguous K x D float32 array; None for a clip without one
    (null, NaN, or an empty list). Raises ValueError for anything that is not K x D numbers."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
            # parquet gives an object array of per-frame float32 arrays; stack keeps the values exactly
            frames = [np.asarray(v, dtype=np.float32) for v in value]
            if not frames:
                return None
            array = np.stack(frames)
        else:
            array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{column} is not a K x D array of floats ({e}); the clip stage writes one list of D "
                         "floats per key frame") from None
    if array.size == 0:
        return None
    if array.ndim != 2:
        raise ValueError(f"{column} has shape {list(array.shape)}, not K x D (one list of D floats per key frame); "
                         "re-run the stage that wrote it")
    return np.ascontiguousarray(array)


def embedding_file(row: dict[str, Any]) -> bytes | None:
    """The sample's EMBEDDING_FILE: a safetensors file with one float32 K x D tensor per embedding column the
    clip has (named like the column); None when it has none. Deterministic bytes, so a resumed write packs
    byte-identical shards."""
    from safetensors.numpy import save

    tensors = {}
    for column in EMBEDDING_COLUMNS:
        array = embedding_array(row.get(column), column)
        if array is not None:
            tensors[column] = array
    return save(tensors) if tensors else None
