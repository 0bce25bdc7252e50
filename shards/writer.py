"""Writing WebDataset shards: a curation run's clips (`write_shards`), or a subset of existing shards with
extra files such as precomputed latents (`rewrite_shards`).

Atomic and resumable: a shard is written as `.shard-000007.tar.tmp`, fsynced, renamed to `shard-000007.tar`,
and only then is its manifest part `parts/shard-000007.parquet` renamed into place. The part is the marker
that the shard is finished; a killed writer leaves a temporary file (removed on the next run) and at most
one final-named but unrecorded tar (complete, and rewritten on the next run). The next run skips the samples
of finished shards and packs the rest exactly as an uninterrupted run would have, so the shards come out
byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.config import ShardWriteConfig
from shards.decode import DecodeError, encode_jpg, first_last_frames
from shards.manifest import (FORMAT, RESERVED, SHARD_PATTERN, SHARDS_SCHEMA, Manifest, manifest_schema,
                             part_table, read_part)
from shards.names import key_problem, shard_problem
from shards.source import (EMBEDDING_COLUMNS, EMBEDDING_FILE, CurationRun, embedding_file,
                           embedding_shape_column, manifest_columns, sample_json)
from shards.tario import END_OF_ARCHIVE, crc32, sample_layout

log = logging.getLogger("lvd.shards")
PART_RE = re.compile(r"shard-(\d{6})\.parquet$")
TENSOR_FILES = {"latents.safetensors": "latents_shape", "text.safetensors": "text_shape"}


@dataclass
class PreparedSample:
    """One sample ready to be packed: its tar members and its manifest row (ledger columns)."""

    key: str
    files: dict[str, bytes]
    row: dict[str, Any]


@dataclass
class Skipped:
    key: str
    reason: str


@dataclass
class WriteSummary:
    out_dir: Path
    num_samples: int
    num_shards: int
    num_written_now: int
    size_bytes: int
    skipped: list[Skipped] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.num_samples} samples in {self.num_shards} shards ({self.size_bytes / 1e6:.1f} MB) in "
               f"{self.out_dir}; {self.num_written_now} written by this run"]
        if self.skipped:
            out.append(f"{len(self.skipped)} samples skipped (listed in info.json), e.g. "
                       f"{self.skipped[0].key}: {self.skipped[0].reason}")
        return out


class ClipSampleMaker:
    """A ledger row -> the sample's files: the clip's mp4, its json, its first and last frames as jpg, and its
    embeddings (emb.safetensors) when the ledger has them for the clip.
    Picklable (no state but settings) so that a process pool can prepare samples."""

    def __init__(self, run: CurationRun, columns: list[str], jpeg_quality: int, frame_max_side: int | None) -> None:
        self.run, self.columns = run, columns
        self.jpeg_quality, self.frame_max_side = jpeg_quality, frame_max_side

    def __call__(self, row: dict[str, Any]) -> PreparedSample | Skipped:
        key = str(row["clip_id"])
        path = self.run.clip_file(row)
        try:
            mp4 = path.read_bytes()
        except OSError as e:
            return Skipped(key, f"clip_file: {e.__class__.__name__}: {path}")
        try:
            first, last = first_last_frames(mp4, self.frame_max_side)
        except DecodeError as e:
            return Skipped(key, f"decode_error: {e}")
        try:
            emb = embedding_file(row)
        except ValueError as e:
            return Skipped(key, f"embedding: {e}")
        files = {"mp4": mp4, "json": sample_json(row), "first.jpg": encode_jpg(first, self.jpeg_quality),
                 "last.jpg": encode_jpg(last, self.jpeg_quality)}
        if emb is not None:
            files[EMBEDDING_FILE] = emb
        return PreparedSample(key, files, {c: row.get(c) for c in self.columns})


class ShardWriter:
    """Packs prepared samples into size-bounded tar shards with a manifest part per shard."""

    def __init__(self, out_dir: str | Path, config: ShardWriteConfig, schema: pa.Schema, start_index: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.schema = schema
        self.index = start_index
        self.num_written = 0
        self._file = None
        self._rows: list[dict[str, Any]] = []
        self._size = 0
        self._sha = hashlib.sha256()
        (self.out_dir / "parts").mkdir(parents=True, exist_ok=True)

    @property
    def shard_name(self) -> str:
        return SHARD_PATTERN.format(self.index)

    def _tmp(self) -> Path:
        return self.out_dir / f".{self.shard_name}.tmp"

    def add(self, sample: PreparedSample) -> None:
        data, layout = sample_layout(sample.key, sample.files)
        full = self._rows and (self._size + len(data) + len(END_OF_ARCHIVE) > self.config.shard_max_bytes
                               or (self.config.shard_max_samples and len(self._rows) >= self.config.shard_max_samples))
        if full:
            self._finish()
        if self._file is None:
            self._file = open(self._tmp(), "wb")
            self._size, self._rows, self._sha = 0, [], hashlib.sha256()
        self._write(data)
        row = {**sample.row, "key": sample.key, "shard": self.shard_name, "offset": self._size - len(data),
               "size_bytes": len(data), "crc32": crc32(data), "files": sorted(sample.files), "members": layout}
        for name, column in TENSOR_FILES.items():
            if name in sample.files:
                row[column] = tensor_shape(sample.files[name])
        if EMBEDDING_FILE in sample.files:  # from the member itself, so a copied sample keeps its shapes
            shapes = tensor_shapes(sample.files[EMBEDDING_FILE])
            for column in EMBEDDING_COLUMNS:
                row[embedding_shape_column(column)] = shapes.get(column)
        self._rows.append(row)
        self.num_written += 1

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._size += len(data)

    def close(self) -> None:
        if self._rows:
            self._finish()

    def _finish(self) -> None:
        self._write(END_OF_ARCHIVE)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self.out_dir / self.shard_name
        shard_row = {"shard": self.shard_name, "num_samples": len(self._rows), "size_bytes": self._size,
                     "sha256": self._sha.hexdigest()}
        part = self.out_dir / "parts" / f"{final.stem}.parquet"
        part_tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(part_table(self._rows, self.schema, shard_row), part_tmp)
        os.replace(self._tmp(), final)  # the shard becomes visible complete...
        os.replace(part_tmp, part)      # ...and is recorded; a kill between the two is repaired on resume
        self._rows = []
        self.index += 1


@dataclass
class ResumePoint:
    done_keys: set[str]
    next_index: int


def prepare_out_dir(out_dir: Path, writer_doc: dict[str, Any]) -> ResumePoint:
    """Checks that `out_dir` is empty or holds shards written with the same settings; removes what a
    killed run left (temporary files, a final tar without its part); returns what is already finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc_path = out_dir / "writer.json"
    if doc_path.exists():
        previous = json.loads(doc_path.read_text())
        if previous != writer_doc:
            changed = sorted(k for k in set(previous) | set(writer_doc) if previous.get(k) != writer_doc.get(k))
            raise ValueError(f"{out_dir} holds shards written with other settings ({', '.join(changed)} differ); "
                             "write to a new folder, or delete this one to start over")
    elif any(out_dir.glob("shard-*.tar")) or (out_dir / "manifest.parquet").exists():
        raise ValueError(f"{out_dir} holds shards this writer did not start (no writer.json); use an empty folder")
    else:
        _atomic_text(doc_path, json.dumps(writer_doc, indent=2, sort_keys=True))
    for tmp in out_dir.glob(".shard-*.tar.tmp"):
        tmp.unlink()
    for tmp in (out_dir / "parts").glob(".*.tmp") if (out_dir / "parts").is_dir() else []:
        tmp.unlink()
    indices = sorted(int(m.group(1)) for p in (out_dir / "parts").glob("shard-*.parquet")
                     if (m := PART_RE.search(p.name))) if (out_dir / "parts").is_dir() else []
    if indices != list(range(len(indices))):
        raise ValueError(f"{out_dir}/parts holds shards {indices[:10]}... with gaps; the folder was edited by hand: "
                         "write to a new folder")
    for tar in out_dir.glob("shard-*.tar"):
        if int(tar.stem.split("-")[1]) >= len(indices):
            log.info("removing %s: written but not recorded before the writer stopped", tar.name)
            tar.unlink()
    done: set[str] = set()
    for i in indices:
        table, _ = read_part(out_dir / "parts" / f"shard-{i:06d}.parquet")
        done.update(table.column("key").to_pylist())
    return ResumePoint(done, len(indices))


def consolidate(out_dir: Path, info: dict[str, Any]) -> Manifest:
    """parts/ -> manifest.parquet, shards.parquet, info.json (each written atomically)."""
    parts = sorted((out_dir / "parts").glob("shard-*.parquet"))
    tables, shard_rows = [], []
    for p in parts:
        table, meta = read_part(p)
        tables.append(table)
        shard_rows.append(meta)
    # promote: parts written before a reserved column was added (a resumed folder) get nulls for it
    samples = pa.concat_tables(tables, promote_options="default") if tables else None
    shards = pa.Table.from_pylist(shard_rows, schema=SHARDS_SCHEMA)
    if samples is None:
        raise ValueError(f"no samples were written to {out_dir}; {info.get('num_skipped', 0)} were skipped "
                         "(see info.json) — check the run's clip files")
    _atomic_parquet(out_dir / "shards.parquet", shards)
    full_info = {"format": FORMAT, **info, "num_samples": samples.num_rows, "num_shards": len(shard_rows),
                 "size_bytes": int(sum(r["size_bytes"] for r in shard_rows))}
    _atomic_text(out_dir / "info.json", json.dumps(full_info, indent=2, default=str))
    _atomic_parquet(out_dir / "manifest.parquet", samples)  # last: its presence means "complete"
    return Manifest(str(out_dir), samples.to_pandas(), shards.to_pandas(), full_info, samples)


def write_shards(run_dir: str | Path, out_dir: str | Path, config: ShardWriteConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> WriteSummary:
    """A curation run's clips (config.selection) -> shards + manifest in `out_dir`; resumes a killed run.

    Two passes over the ledger, one file at a time: the first reads ids and decisions only (what is left to
    write, and whether the run still selects every sample already written), the second every column of one
    file's clips while they are packed."""
    config = config or ShardWriteConfig()
    run, out_dir = CurationRun(run_dir), Path(out_dir)
    ledger_schema = run.schema()
    columns = manifest_columns(ledger_schema)
    schema = manifest_schema(pa.schema([ledger_schema.field(c) for c in columns]))
    # the ledger's columns are part of the settings: parts with other columns would not make one manifest
    writer_doc = {"format": FORMAT, "source_run": str(run.run_dir.resolve()), "selection": config.selection,
                  "ledger_columns": columns,
                  "embedding_columns": [c for c in EMBEDDING_COLUMNS if c in ledger_schema.names],
                  **config.model_dump(exclude={"workers"})}
    resume = prepare_out_dir(out_dir, writer_doc)
    done = pa.array(sorted(resume.done_keys), pa.string())
    stale, total = set(resume.done_keys), 0
    for ids in run.chosen_ids(config.selection):
        written = pc.is_in(ids, value_set=done)
        stale.difference_update(ids.filter(written).to_pylist())
        total += len(ids) - pc.sum(written).as_py()
    if stale:
        raise ValueError(f"{out_dir} holds {len(stale)} samples the ledger no longer selects (e.g. {sorted(stale)[0]}): "
                         "the run was re-thresholded since; write to a new folder")

    def todo() -> Iterator[dict[str, Any]]:
        for table in run.chosen(config.selection):
            table = table.filter(pc.invert(pc.is_in(table.column("clip_id"), value_set=done)))
            for batch in table.to_batches(max_chunksize=256):  # Python rows of a few clips at a time
                yield from batch.to_pylist()

    maker = ClipSampleMaker(run, columns, config.jpeg_quality, config.frame_max_side)
    writer = ShardWriter(out_dir, config, schema, start_index=resume.next_index)
    skipped: list[Skipped] = []
    for n, result in enumerate(_map(maker, todo(), config.workers if total > 1 else 1), 1):
        if isinstance(result, Skipped):
            log.warning("skipping clip %s: %s", result.key, result.reason)
            skipped.append(result)
        else:
            writer.add(result)
        if progress:
            progress(n, total)
    writer.close()
    info = {"source_run": str(run.run_dir.resolve()), "selection": config.selection,
            "writer": config.model_dump(exclude={"workers"}), "num_skipped": len(skipped),
            "skipped": [{"key": s.key, "reason": s.reason} for s in skipped]}
    manifest = consolidate(out_dir, info)
    return WriteSummary(out_dir, len(manifest.samples), len(manifest.shards), writer.num_written,
                        int(manifest.info["size_bytes"]), skipped)


def rewrite_shards(source: Manifest, rows: Iterable[int] | None, out_dir: str | Path,
                   config: ShardWriteConfig | None = None,
                   add_files: Callable[[str, dict[str, bytes]], dict[str, bytes]] | None = None) -> WriteSummary:
    """Copies samples (manifest row indices; None = all) into new shards without re-encoding: a compacted
    subset, or the same samples with extra members. `add_files(key, members) -> {ext: bytes}` returns files
    to add or replace, e.g. {"latents.safetensors": ...} from training's precompute step."""
    from shards.reader import SampleReader

    config = config or ShardWriteConfig()
    out_dir = Path(out_dir)
    frame = source.samples if rows is None else source.samples.iloc[np.asarray(list(rows), dtype=np.int64)]
    ledger_cols = [c for c in source.samples.columns if c not in RESERVED]
    ledger_schema = pa.Schema.from_pandas(source.samples[ledger_cols], preserve_index=False)
    schema = manifest_schema(ledger_schema)
    writer_doc = {"format": FORMAT, "source_shards": source.root, "source_fingerprint": source.fingerprint(),
                  "selection": source.selection, "num_selected": len(frame),
                  "selected": hashlib.sha256("\n".join(frame["key"]).encode()).hexdigest()[:16],
                  "adds_files": add_files is not None, **config.model_dump(exclude={"workers", "selection"})}
    resume = prepare_out_dir(out_dir, writer_doc)
    reader = SampleReader(source.root)
    writer = ShardWriter(out_dir, config, schema, start_index=resume.next_index)
    skipped: list[Skipped] = []
    for rec in frame.to_dict("records"):
        rec = _row_dict(rec)
        key = str(rec["key"])
        if key in resume.done_keys:
            continue
        refused = key_problem(key) or shard_problem(rec["shard"])
        if refused:  # a hostile manifest: never read, never written, never a file name
            skipped.append(Skipped(key, f"refused: {refused}"))
            continue
        try:
            members = {ext: bytes(v) for ext, v in reader.read(rec, verify=True).items()}
        except Exception as e:  # noqa: BLE001 - a corrupt source sample is reported, not fatal
            skipped.append(Skipped(key, f"corrupt: {e}"))
            continue
        if add_files is not None:
            members.update(add_files(key, members))
        writer.add(PreparedSample(key, members, {c: rec.get(c) for c in ledger_cols}))
    writer.close()
    reader.close()
    info = {"source_shards": source.root, "source_fingerprint": source.fingerprint(),
            "selection": source.selection, "source_run": source.info.get("source_run"),
            "writer": config.model_dump(exclude={"workers", "selection"}), "num_skipped": len(skipped),
            "skipped": [{"key": s.key, "reason": s.reason} for s in skipped]}
    manifest = consolidate(out_dir, info)
    return WriteSummary(out_dir, len(manifest.samples), len(manifest.shards), writer.num_written,
                        int(manifest.info["size_bytes"]), skipped)


def tensor_shapes(safetensors_bytes: bytes) -> dict[str, list[int]]:
    """{tensor name: shape} of a safetensors file, read from its JSON header alone."""
    n = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(bytes(safetensors_bytes[8 : 8 + n]))
    return {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}


def tensor_shape(safetensors_bytes: bytes) -> list[int] | None:
    """Shape of the tensor in a safetensors file (the one named like the file, or the only one),
    read from its JSON header alone."""
    tensors = tensor_shapes(safetensors_bytes)
    for name in ("latents", "text", "embedding"):
        if name in tensors:
            return tensors[name]
    return next(iter(tensors.values())) if len(tensors) == 1 else None


def _map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in order; with workers > 1 in a process pool with a bounded number in flight, so that
    memory stays flat however many clips the run has."""
    if workers <= 1:
        yield from map(fn, items)
        return
    from collections import deque

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _row_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if _missing(v) else v) for k, v in row.items()}


def _missing(v: Any) -> bool:
    try:
        return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
    except TypeError:
        return False


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)

