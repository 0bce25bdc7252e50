"""The Ray side of curation: actors that wrap the per-video task and the scoring stages.

Nothing here knows what a stage computes. Rows crossing Ray are kept to a fixed, simple shape so
Arrow never has to guess types: ids and status as strings, the ledger record and each stage's
results as JSON text, key frames as a tensor column.
"""

from __future__ import annotations

import importlib
import json
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from curation.config import CurationConfig
from curation.isolation import IsolatedWorker
from curation.stage import ClipBatch, Stage
from curation.video_task import VideoOutput, decode_jpegs, prepare, process_video, video_row

def _row(row_type: str, video_id: str, clip_id: str, status: str, record: dict, frames: list[bytes] | None = None,
         clip_frames: list[bytes] | None = None) -> dict:
    return {"row_type": row_type, "video_id": video_id, "clip_id": clip_id, "status": status,
            "record": json.dumps(record), "key_frames": frames or [], "clip_frames": clip_frames or []}


class VideoActor:
    """Holds one isolated decode process; one input video in, its video row and clip rows out."""

    def __init__(self, config: dict[str, Any], run_dir: str) -> None:
        self.config = CurationConfig.model_validate(config)
        self.run_dir = run_dir
        self.worker = IsolatedWorker()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, item: dict[str, Any]) -> list[dict]:
        source, video_id = item["source"], item["video_id"]
        out = self._process(source, video_id)
        out.video["processed_on"] = self.node
        rows = [_row("video", video_id, "", out.video["status"], out.video)]
        for clip in out.clips:
            rows.append(_row("clip", video_id, clip["clip_id"], clip["status"], clip,
                             out.key_frames.get(clip["clip_id"]), out.clip_frames.get(clip["clip_id"])))
        return rows

    def _process(self, source: str, video_id: str) -> VideoOutput:
        decode = self.config.decode
        probed = self.worker.call(prepare, source, decode.max_pixels, timeout_s=decode.probe_timeout_s)
        if not probed.ok:
            return _failed(source, video_id, None, f"probe_{probed.reason}")
        prepared = probed.value
        try:
            if prepared.reason is not None:
                return _failed(source, video_id, None, prepared.reason)
            limit = decode.timeout_s + decode.timeout_per_video_s * max(prepared.info.duration_s, 0.0)
            done = self.worker.call(process_video, source, video_id, prepared, self.config, self.run_dir,
                                    timeout_s=limit)
            return done.value if done.ok else _failed(source, video_id, prepared.info, f"decode_{done.reason}")
        finally:
            if prepared.temp_dir:
                shutil.rmtree(prepared.temp_dir, ignore_errors=True)

    def __del__(self) -> None:
        self.worker.close()


def _failed(source: str, video_id: str, info, reason: str) -> VideoOutput:
    return VideoOutput({**video_row(source, video_id, info), "status": "failed", "reason": reason})


class StageActor:
    """Any `Stage` as a Ray Data batch function: scores the usable clips of a batch, passes other rows on."""

    def __init__(self, stage_path: str, config: dict[str, Any]) -> None:
        module, name = stage_path.rsplit(".", 1)
        cls: type[Stage] = getattr(importlib.import_module(module), name)
        self.stage = cls(cls.Config.model_validate(config))
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Arrow in, Arrow out: the JPEG key frames pass through untouched for the next stage.
        row_type, status, clip_ids = (batch.column(c).to_pylist() for c in ("row_type", "status", "clip_id"))
        usable = [i for i in range(batch.num_rows) if row_type[i] == "clip" and status[i] == "ok"]
        context = dict(zip(usable, _context(batch, usable)))
        todo = [i for i in usable if self.stage.config.wants(context[i])]
        results = [""] * batch.num_rows
        if todo:
            key_frames = batch.column("key_frames")
            spread = batch.column("clip_frames") if "clip_frames" in batch.column_names else None
            clip_frames = None
            if spread is not None and self.stage.uses_clip_frames:
                clip_frames = [decode_jpegs(f) if (f := spread[i].as_py()) else None for i in todo]
            res = self.stage(ClipBatch([clip_ids[i] for i in todo],
                                       [decode_jpegs(key_frames[i].as_py()) for i in todo],
                                       [context[i] for i in todo], clip_frames))
            for j, i in enumerate(todo):
                entry = {col: _plain(values[j]) for col, values in res.scores.items()}
                if res.reasons and res.reasons[j]:
                    entry["reason"] = res.reasons[j]
                results[i] = json.dumps(entry)
        return batch.append_column(f"stage_{self.stage.name}", pa.array(results, pa.string()))


def _context(batch: pa.Table, rows: list[int]) -> list[dict[str, Any]]:
    """Each row's clip record with the results of the stages before this one merged in."""
    records = batch.column("record")
    earlier = [batch.column(n) for n in batch.column_names if n.startswith("stage_")]
    out = []
    for i in rows:
        ctx = json.loads(records[i].as_py())
        for col in earlier:
            value = col[i].as_py()
            if value:
                ctx.update(json.loads(value))
        out.append(ctx)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
