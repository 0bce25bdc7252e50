"""The Ray side of curation: the decode actor, the scoring-stage actor and the ledger writer task.

Rows crossing Ray have one fixed, typed shape (`ledger.ROW_SCHEMA`): one row per video, its clips as a
nested list of typed structs (float scores, K x D float32 embeddings, caption structs; no JSON), and per
clip the JPEG key frames the model stages read. The writer drops the frames and commits the rows to the
ledger from the task, so nothing but a per-batch count ever reaches the driver.
"""

from __future__ import annotations

import importlib
import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from curation.config import CurationConfig
from curation.inputs import is_url, source_path
from curation.video.isolation import IsolatedWorker
from curation.ledger import CLIP_SCHEMA, CLIP_TYPE, Ledger, bucket_of, pipeline_row, rows_table, split_reason, split_rows
from curation.stages.base import ClipBatch, Stage
from curation.video.task import VideoOutput, decode_jpegs, prepare, process_video, video_row


class VideoActor:
    """Holds one isolated decode process; one input video in, its row (video + nested clips) out."""

    def __init__(self, config: dict[str, Any], run_dir: str) -> None:
        self.config = CurationConfig.model_validate(config)
        self.run_dir = run_dir
        self.worker = IsolatedWorker()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in batch.to_pylist():
            out = self.process(item)
            out.video["processed_on"] = self.node
            keys = [out.key_frames.get(c["clip_id"]) or [] for c in out.clips]
            spread = [out.clip_frames.get(c["clip_id"]) or [] for c in out.clips]
            rows.append(pipeline_row({**out.video, "source": item["source"], "source_raw": item.get("source_raw")},
                                     out.clips, keys, spread))
        return rows_table(rows)

    def process(self, item: dict[str, Any]) -> VideoOutput:
        video_id, shown = item["video_id"], item["source"]
        path = source_path(shown, item.get("source_raw"))
        if item.get("skip_reason"):
            return VideoOutput({**video_row(path, video_id, None), "status": "skipped", "reason": item["skip_reason"]})
        if not is_url(path) and not os.path.lexists(path):  # anything else is the isolated probe's to judge
            return VideoOutput({**video_row(path, video_id, None), "status": "skipped",
                                "reason": "not_found: no such file"})
        return self._decode(path, video_id)

    def _decode(self, source: str, video_id: str) -> VideoOutput:
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
                                    timeout_s=limit, stall_s=decode.stall_timeout_s)
            return done.value if done.ok else _failed(source, video_id, prepared.info, f"decode_{done.reason}")
        finally:
            if prepared.temp_dir:
                shutil.rmtree(prepared.temp_dir, ignore_errors=True)

    def __del__(self) -> None:
        self.worker.close()


def _failed(source: str, video_id: str, info, reason: str) -> VideoOutput:
    return VideoOutput({**video_row(source, video_id, info), "status": "failed", "reason": reason})


class StageActor:
    """Any `Stage` as a Ray Data batch function over video rows: scores the usable clips of the batch in
    calls of the stage's batch_size clips, writes the scores into the clips' typed columns, and passes
    the key frames on untouched for the next stage."""

    def __init__(self, stage_path: str, config: dict[str, Any]) -> None:
        module, name = stage_path.rsplit(".", 1)
        cls: type[Stage] = getattr(importlib.import_module(module), name)
        self.stage = cls(cls.Config.model_validate(config))
        unknown = sorted(set(cls.columns) - set(CLIP_SCHEMA.names))
        if unknown:
            raise TypeError(f"stage {cls.name} writes columns the ledger does not have: {unknown}; add them to "
                            "ledger.CLIP_SCHEMA with their Arrow type")
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        clips = batch.column("clips").to_pylist()
        todo = [(v, c) for v, video_clips in enumerate(clips) for c, clip in enumerate(video_clips)
                if clip["status"] == "ok" and self.stage.config.wants(clip)]
        if not todo:
            return batch
        key_frames = batch.column("key_frames")
        spread = batch.column("clip_frames")
        size = max(1, self.stage.config.batch_size)
        for start in range(0, len(todo), size):
            part = todo[start:start + size]
            # one clip's JPEGs at a time (indexing the list scalar converts only that element)
            frames = [decode_jpegs(key_frames[v][c].as_py()) for v, c in part]
            clip_frames = None
            if self.stage.uses_clip_frames:
                clip_frames = [decode_jpegs(f) if (f := spread[v][c].as_py()) else None for v, c in part]
            res = self.stage(ClipBatch([clips[v][c]["clip_id"] for v, c in part], frames,
                                       [clips[v][c] for v, c in part], clip_frames))
            for j, (v, c) in enumerate(part):
                clip = clips[v][c]
                for col, values in res.scores.items():
                    clip[col] = _plain(values[j])
                if res.reasons and res.reasons[j]:
                    clip.update(status="failed", reason=res.reasons[j])
                    clip["reason_code"], clip["reason_detail"] = split_reason(res.reasons[j])
        i = batch.schema.get_field_index("clips")
        return batch.set_column(i, "clips", pa.array(clips, type=pa.list_(CLIP_TYPE)))


def write_ledger(batch: pa.Table, run_dir: str, num_buckets: int) -> pa.Table:
    """The pipeline's last step, in a Ray task: commits a batch of finished videos to the ledger, one pair of
    files per hash bucket present, and returns one row of counts for the driver's progress bar."""
    ledger = Ledger(run_dir)
    videos, clips = split_rows(batch.drop_columns([c for c in ("key_frames", "clip_frames") if c in batch.column_names]))
    buckets = pa.array([bucket_of(v, num_buckets) for v in videos.column("video_id").to_pylist()])
    clip_buckets = pa.array([bucket_of(v, num_buckets) for v in clips.column("video_id").to_pylist()])
    for b in pc.unique(buckets).to_pylist():
        ledger.commit(b, videos.filter(pc.equal(buckets, b)), clips.filter(pc.equal(clip_buckets, b)))
    ok = pc.sum(pc.equal(clips.column("status"), "ok")).as_py() or 0
    return pa.table({"videos": [videos.num_rows], "clips": [clips.num_rows], "clips_ok": [ok]})


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
