"""Writing WebDataset shards: a curation run's clips (`write_shards`), or a subset of existing shards with
extra files such as precomputed latents (`rewrite_shards`).

`write_shards` is a Ray job (tasks when Ray is initialised, else in this process): the driver lists the
ledger's files and launches one task per file (a group); the task reads that file's chosen clips with the
columns the samples need, packs them into the group's shards `shard-GGGGGG-NNNNN.tar` in the ledger file's
order (video by video, clip by clip) and writes each shard's manifest file. Only shard rows and skip
reasons come back to the driver, which writes shards.parquet and info.json.

Atomic and resumable per shard: a shard is written as `.shard-000003-00007.tar.tmp`, fsynced, renamed to
`shard-000003-00007.tar`, and only then is its manifest file `manifest/shard-000003-00007.parquet` renamed
into place. The manifest file is the marker that the shard is finished; a killed writer leaves temporary
files (removed on the next run) and at most one final-named but unrecorded tar per group (complete, and
rewritten on the next run). The next run skips the samples of finished shards and packs the rest exactly
as an uninterrupted run would have, so the shards come out byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.config import ShardWriteConfig
from shards.decode import DecodeError, encode_jpg, first_last_frames
from shards.manifest import (FORMAT, INFO, MANIFEST_DIR, RESERVED, SHARDS_SCHEMA, Manifest, manifest_schema,
                             part_name, part_table, read_part, read_shard_row, shard_name)
from shards.names import key_problem, shard_problem
from shards.source import (EMBEDDING_COLUMNS, EMBEDDING_FILE, CurationRun, embedding_file,
                           embedding_shape_column, manifest_columns, sample_json)
from shards.tario import END_OF_ARCHIVE, crc32, sample_layout

log = logging.getLogger("lvd.shards")
PART_RE = re.compile(r"^shard-(\d{6})-(\d{5})\.parquet$")
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
    Holds settings only, so that it pickles cheaply into a write task."""

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
    """Packs prepared samples into size-bounded tar shards of one group, with a manifest file per shard."""

    def __init__(self, out_dir: str | Path, config: ShardWriteConfig, schema: pa.Schema, group: int = 0,
                 start_index: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.schema = schema
        self.group = group
        self.index = start_index
        self.num_written = 0
        self.shard_rows: list[dict[str, Any]] = []  # the shards this writer finished
        self._file = None
        self._rows: list[dict[str, Any]] = []
        self._size = 0
        self._sha = hashlib.sha256()
        (self.out_dir / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)

    @property
    def shard_name(self) -> str:
        return shard_name(self.group, self.index)

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
        part = self.out_dir / part_name(self.shard_name)
        part_tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(part_table(self._rows, self.schema, shard_row), part_tmp)
        os.replace(self._tmp(), final)  # the shard becomes visible complete...
        os.replace(part_tmp, part)      # ...and is recorded; a kill between the two is repaired on resume
        self.shard_rows.append(shard_row)
        self._rows = []
        self.index += 1


@dataclass
class ResumePoint:
    """A group's finished shards: their rows, the keys they hold, and the next shard number."""

    shard_rows: list[dict[str, Any]]
    done_keys: pa.Array
    next_index: int


@dataclass
class GroupResult:
    """What a group's task sends back: small (one row per shard, one entry per skipped or stale sample)."""

    shard_rows: list[dict[str, Any]]
    num_written: int
    skipped: list[Skipped]
    stale: list[str] = field(default_factory=list)


def prepare_out_dir(out_dir: Path, writer_doc: dict[str, Any]) -> None:
    """Checks that `out_dir` is empty or holds shards written with the same settings (the driver, once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc_path = out_dir / "writer.json"
    if doc_path.exists():
        previous = json.loads(doc_path.read_text())
        if previous != writer_doc:
            changed = sorted(k for k in set(previous) | set(writer_doc) if previous.get(k) != writer_doc.get(k))
            raise ValueError(f"{out_dir} holds shards written with other settings ({', '.join(changed)} differ); "
                             "write to a new folder, or delete this one to start over")
    elif any(out_dir.glob("shard-*.tar")) or (out_dir / MANIFEST_DIR).exists() or (out_dir / INFO).exists():
        raise ValueError(f"{out_dir} holds shards this writer did not start (no writer.json); use an empty folder")
    else:
        _atomic_text(doc_path, json.dumps(writer_doc, indent=2, sort_keys=True))
    (out_dir / MANIFEST_DIR).mkdir(exist_ok=True)


def resume_group(out_dir: Path, group: int) -> ResumePoint:
    """Removes what a killed run left of `group` (temporary files, a final tar without its manifest file) and
    returns what it had finished."""
    prefix = f"shard-{group:06d}-"
    for tmp in [*out_dir.glob(f".{prefix}*.tar.tmp"), *(out_dir / MANIFEST_DIR).glob(f".{prefix}*.tmp")]:
        tmp.unlink()
    parts = sorted((out_dir / MANIFEST_DIR).glob(f"{prefix}*.parquet"))
    indices = [int(m.group(2)) for p in parts if (m := PART_RE.match(p.name))]
    if indices != list(range(len(indices))) or len(indices) != len(parts):
        raise ValueError(f"{out_dir}/{MANIFEST_DIR} holds shards {[p.name for p in parts][:5]}... of group {group} "
                         "with gaps; the folder was edited by hand: write to a new folder")
    for tar in out_dir.glob(f"{prefix}*.tar"):
        if int(tar.stem.rsplit("-", 1)[1]) >= len(indices):
            log.info("removing %s: written but not recorded before the writer stopped", tar.name)
            tar.unlink()
    keys = [read_part(p, ["key"])[0].column("key") for p in parts]
    done = pa.chunked_array(keys, pa.string()).combine_chunks() if keys else pa.array([], pa.string())
    return ResumePoint([read_shard_row(p) for p in parts], done, len(indices))


def write_index(out_dir: Path, shard_rows: list[dict[str, Any]], info: dict[str, Any]) -> Manifest:
    """shards.parquet and info.json (each written atomically, info.json last: the folder is complete)."""
    shard_rows = sorted(shard_rows, key=lambda r: r["shard"])
    if not shard_rows:
        raise ValueError(f"no samples were written to {out_dir}; {info.get('num_skipped', 0)} were skipped "
                         "(see info.json) — check the run's clip files")
    shards = pa.Table.from_pylist(shard_rows, schema=SHARDS_SCHEMA)
    _atomic_parquet(out_dir / "shards.parquet", shards)
    full_info = {"format": FORMAT, **info, "num_samples": int(sum(r["num_samples"] for r in shard_rows)),
                 "num_shards": len(shard_rows), "size_bytes": int(sum(r["size_bytes"] for r in shard_rows))}
    _atomic_text(out_dir / INFO, json.dumps(full_info, indent=2, default=str))
    return Manifest(str(out_dir), shards.to_pandas(), full_info)


def write_group(run_dir: str, out_dir: str, group: int, clips_file: str, config: ShardWriteConfig,
                columns: list[str], schema: pa.Schema) -> GroupResult:
    """One task: a ledger file's chosen clips -> the group's shards and their manifest files, resuming after
    the shards an earlier run finished. Refuses (writing nothing) when a finished shard holds a clip the
    ledger no longer selects."""
    run, out = CurationRun(run_dir), Path(out_dir)
    resume = resume_group(out, group)
    table = run.chosen_file(Path(clips_file), config.selection)
    ids = table.column("clip_id")
    stale = pc.filter(resume.done_keys, pc.invert(pc.is_in(resume.done_keys, value_set=ids)))
    if len(stale):
        return GroupResult(resume.shard_rows, 0, [], stale.to_pylist()[:5])
    table = table.filter(pc.invert(pc.is_in(ids, value_set=resume.done_keys)))
    maker = ClipSampleMaker(run, columns, config.jpeg_quality, config.frame_max_side)
    writer = ShardWriter(out, config, schema, group=group, start_index=resume.next_index)
    skipped: list[Skipped] = []
    for batch in table.to_batches(max_chunksize=64):  # Python rows of a few clips at a time
        for row in batch.to_pylist():
            result = maker(row)
            if isinstance(result, Skipped):
                log.warning("skipping clip %s: %s", result.key, result.reason)
                skipped.append(result)
            else:
                writer.add(result)
    writer.close()
    return GroupResult(resume.shard_rows + writer.shard_rows, writer.num_written, skipped)


def write_shards(run_dir: str | Path, out_dir: str | Path, config: ShardWriteConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> WriteSummary:
    """A curation run's clips (config.selection) -> shards + manifest in `out_dir`; resumes a killed run.
    One task per ledger file (see the module docstring); `progress(files done, files)`."""
    from curation.tasks import imap_tasks

    config = config or ShardWriteConfig()
    run, out_dir = CurationRun(run_dir), Path(out_dir)
    files = run.clip_files()
    ledger_schema = run.schema()
    columns = manifest_columns(ledger_schema)
    schema = manifest_schema(pa.schema([ledger_schema.field(c) for c in columns]))
    # the ledger's columns are part of the settings: parts with other columns would not make one manifest
    writer_doc = {"format": FORMAT, "source_run": str(run.run_dir.resolve()), "selection": config.selection,
                  "ledger_columns": columns,
                  "embedding_columns": [c for c in EMBEDDING_COLUMNS if c in ledger_schema.names],
                  **config.model_dump(exclude={"workers"})}
    prepare_out_dir(out_dir, writer_doc)
    calls = [(str(run.run_dir), str(out_dir), g, str(path), config, columns, schema) for g, path in enumerate(files)]
    shard_rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    stale: list[str] = []
    num_written = 0
    for n, result in enumerate(imap_tasks(write_group, calls), 1):
        shard_rows += result.shard_rows
        skipped += result.skipped
        stale += result.stale
        num_written += result.num_written
        if progress:
            progress(n, len(calls))
    if stale:
        raise ValueError(f"{out_dir} holds samples the ledger no longer selects (e.g. {sorted(stale)[0]}): "
                         "the run was re-thresholded since; write to a new folder")
    info = {"source_run": str(run.run_dir.resolve()), "selection": config.selection,
            "writer": config.model_dump(exclude={"workers"}), "num_skipped": len(skipped),
            "skipped": [{"key": s.key, "reason": s.reason} for s in skipped]}
    manifest = write_index(out_dir, shard_rows, info)
    return WriteSummary(out_dir, manifest.num_samples, len(manifest.shards), num_written,
                        int(manifest.info["size_bytes"]), skipped)


def read_source_sample(reader, rec: dict) -> dict[str, bytes] | Skipped:
    """A source shard's sample (its manifest row `rec`) as member bytes, crc32-checked; a refused name (a hostile
    manifest: never read, never written, never a file name) or a corrupt sample comes back as a Skipped."""
    key = str(rec["key"])
    refused = key_problem(key) or shard_problem(rec["shard"])
    if refused:
        return Skipped(key, f"refused: {refused}")
    try:
        return {ext: bytes(v) for ext, v in reader.read(rec, verify=True).items()}
    except Exception as e:  # noqa: BLE001 - a corrupt source sample is reported, not fatal
        return Skipped(key, f"corrupt: {e}")


def rewrite_shards(source: Manifest, rows: Iterable[int] | None, out_dir: str | Path,
                   config: ShardWriteConfig | None = None,
                   add_files: Callable[[str, dict[str, bytes]], dict[str, bytes]] | None = None) -> WriteSummary:
    """Copies samples (manifest rows; None = all) into new shards (one group) without re-encoding: a compacted
    subset, or the same samples with extra members. `add_files(key, members) -> {ext: bytes}` returns files
    to add or replace, e.g. {"latents.safetensors": ...} from training's precompute step."""
    from shards.reader import SampleReader

    config = config or ShardWriteConfig()
    out_dir = Path(out_dir)
    table = source.table if rows is None else source.take(np.asarray(list(rows), dtype=np.int64), None)
    ledger_cols = [c for c in table.column_names if c not in RESERVED]
    schema = manifest_schema(table.select(ledger_cols).schema)
    keys = table.column("key").to_pylist()
    writer_doc = {"format": FORMAT, "source_shards": source.root, "source_fingerprint": source.fingerprint(),
                  "selection": source.selection, "num_selected": len(keys),
                  "selected": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16],
                  "adds_files": add_files is not None, **config.model_dump(exclude={"workers", "selection"})}
    prepare_out_dir(out_dir, writer_doc)
    resume = resume_group(out_dir, 0)
    done = set(resume.done_keys.to_pylist())
    reader = SampleReader(source.root)
    writer = ShardWriter(out_dir, config, schema, group=0, start_index=resume.next_index)
    skipped: list[Skipped] = []
    for batch in table.to_batches(max_chunksize=64):
        for rec in batch.to_pylist():
            key = str(rec["key"])
            if key in done:
                continue
            members = read_source_sample(reader, rec)
            if isinstance(members, Skipped):
                skipped.append(members)
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
    manifest = write_index(out_dir, resume.shard_rows + writer.shard_rows, info)
    return WriteSummary(out_dir, manifest.num_samples, len(manifest.shards), writer.num_written,
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


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)

