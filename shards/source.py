"""A curation run as shards see it: the clips ledger, read with pandas, and the clip files.

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

# Shards rely on the meaning of: clip_id, video_id, status, keep (selection), width, height, duration_s
# (buckets), clip_path (the file). Every other column is passed through as it is.

# Not copied into the json or the manifest: a path that is only valid on the writing machine.
LOCAL_ONLY_COLUMNS = ("clip_path",)
CAPTIONS = "captions"
# Ledger columns holding a K x D float array per clip (None where the stage did not score the clip): written as
# tensors of the member EMBEDDING_FILE, not into the json or the manifest (which gets `<column>_shape`).
EMBEDDING_COLUMNS = ("clip_embedding",)
EMBEDDING_FILE = "emb.safetensors"


def embedding_shape_column(column: str) -> str:
    return f"{column}_shape"


class CurationRun:
    """The clips of one `lvd curate` output folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.clips_path = self.run_dir / "ledger" / "clips.parquet"

    def clips(self) -> pd.DataFrame:
        if not self.clips_path.is_file():
            raise FileNotFoundError(f"no ledger at {self.clips_path}: run `lvd curate ... --set output={self.run_dir}` "
                                    "first, or point at the folder that holds ledger/clips.parquet")
        clips = pd.read_parquet(self.clips_path)
        missing = [c for c in ("clip_id", "video_id", "status", "keep") if c not in clips.columns]
        if missing:
            raise ValueError(f"{self.clips_path} lacks columns {missing}; is this a finished curation run? "
                             "re-run `lvd curate` (or `lvd curate --rethreshold`) to write the consolidated ledger")
        return clips

    def select(self, selection: str) -> pd.DataFrame:
        """The clips to write, in a fixed order (video, then clip index) so that re-runs pack the same shards."""
        clips = self.clips()
        if selection == "keep":
            chosen = clips[clips["keep"].fillna(False).astype(bool)]
        elif selection == "all_usable":
            chosen = clips[clips["status"] == "ok"]
        else:
            raise ValueError(f"selection {selection!r} is not one of keep, all_usable")
        order = [c for c in ("video_id", "clip_index", "clip_id") if c in chosen.columns]
        return chosen.sort_values(order, kind="stable").reset_index(drop=True)

    def clip_file(self, row: dict[str, Any]) -> Path:
        """The clip's mp4: the ledger's path, or the run's clips/ folder when the run folder has moved."""
        recorded = row.get("clip_path")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
        return self.run_dir / "clips" / str(row["video_id"]) / f"{row['clip_id']}.mp4"


def manifest_columns(clips: pd.DataFrame) -> list[str]:
    """Ledger columns that go into the manifest: every scalar column (scores, flags, ids, strings) and the
    captions list; other list columns (per-frame values) stay in the sample json only."""
    out = []
    for name in clips.columns:
        if name in LOCAL_ONLY_COLUMNS or name in EMBEDDING_COLUMNS:
            continue
        if name == CAPTIONS:
            out.append(name)
            continue
        kind = clips[name].dtype.kind
        if kind in "biuf" or (kind in "OUT" and _is_scalar_strings(clips[name])) or str(clips[name].dtype) == "string":
            out.append(name)
    return out


def _is_scalar_strings(col: pd.Series) -> bool:
    sample = col.dropna().head(50)
    return all(isinstance(v, str) for v in sample)


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
