"""The manifest: which sample lives where, with its checksum and every score, so that subset queries,
stats and the loader's plan need no tar reads.

A shard folder (local, or any fsspec URL for reading):

    shard-000000.tar ...        WebDataset tars: per sample <key>.mp4, .json, .first.jpg, .last.jpg,
                                .emb.safetensors (the ledger's embedding columns, when the clip has any)
                                (and .latents.safetensors / .text.safetensors once precomputed)
    manifest.parquet            one row per sample (schema below)
    shards.parquet              one row per shard: shard, num_samples, size_bytes, sha256
    info.json                   format, where the samples came from, the writer's settings, skipped samples
    parts/shard-000000.parquet  the same rows, one file per finished shard (the writer's resume marker)

manifest.parquet columns: key (= clip_id), shard (file name), offset and size_bytes (the sample's byte range
in its shard: tar headers and data of all its members), crc32 (of that range), files (member extensions),
members (per member: ext, offset of its data from the sample's offset, size, crc32; a reader fetches only
the members it needs, e.g. the latents and not the mp4), latents_shape / text_shape (of the precomputed tensors,
null when absent), clip_embedding_shape (K x D of each embedding column's tensor in emb.safetensors, null when
absent; `clip_embedding_shape is not null` selects the clips that have one), then the ledger's columns as
they were: ids, time range (start_s, end_s, duration_s), fps, width, height, every score, keep and the
pass_* flags, captions.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shards.source import EMBEDDING_COLUMNS, embedding_shape_column

FORMAT = "lvd-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"

EMBEDDING_SHAPES = tuple(embedding_shape_column(c) for c in EMBEDDING_COLUMNS)
RESERVED = ("key", "shard", "offset", "size_bytes", "crc32", "files", "members", "latents_shape", "text_shape",
            *EMBEDDING_SHAPES)
MEMBER = pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("crc32", pa.int64())])
RESERVED_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()), ("size_bytes", pa.int64()),
    ("crc32", pa.int64()), ("files", pa.list_(pa.string())), ("members", pa.list_(MEMBER)),
    ("latents_shape", pa.list_(pa.int64())), ("text_shape", pa.list_(pa.int64())),
    *((name, pa.list_(pa.int64())) for name in EMBEDDING_SHAPES),
])
SHARDS_SCHEMA = pa.schema([
    ("shard", pa.string()), ("num_samples", pa.int64()), ("size_bytes", pa.int64()), ("sha256", pa.string()),
])
# Manifest columns that are bookkeeping or fixed metadata rather than scores.
NOT_SCORES = set(RESERVED) | {"clip_index", "start_frame", "end_frame", "num_frames", "start_s", "end_s",
                              "duration_s", "fps", "width", "height"}


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


class Manifest:
    """A shard folder's manifest, read from a local path or an fsspec URL."""

    def __init__(self, root: str, samples: pd.DataFrame, shards: pd.DataFrame, info: dict[str, Any],
                 table: pa.Table | None = None) -> None:
        self.root = root
        self.samples = samples
        self.shards = shards
        self.info = info
        self._table = table

    @property
    def table(self) -> pa.Table:
        """The samples as Arrow (for vectorised access to list columns such as members)."""
        if self._table is None:
            self._table = pa.Table.from_pandas(self.samples, preserve_index=False)
        return self._table

    @classmethod
    def load(cls, root: str) -> "Manifest":
        root = str(root)
        fs, path = fsspec.core.url_to_fs(root)
        manifest = join(path, "manifest.parquet")
        if not fs.exists(manifest):
            hint = " (the writer was interrupted: re-run `lvd shards write` to finish)" if fs.exists(join(path, "parts")) else ""
            raise FileNotFoundError(f"no manifest.parquet in {root}{hint}; write shards with `lvd shards write RUN_DIR {root}`")
        table = pq.read_table(manifest, filesystem=fs)
        samples = table.to_pandas()
        shards = pq.read_table(join(path, "shards.parquet"), filesystem=fs).to_pandas()
        with fs.open(join(path, "info.json"), "r") as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"{root} holds shards of format {info.get('format')!r}, this lvd reads {FORMAT!r}; "
                             "rewrite them with this version's `lvd shards write`")
        return cls(root, samples, shards, info, table)

    def shard_url(self, shard: str) -> str:
        return join(self.root, shard)

    @property
    def selection(self) -> str:
        return str(self.info.get("selection", "keep"))

    @cached_property
    def score_columns(self) -> list[str]:
        """Numeric, non-bookkeeping columns: the scores curation (and later stages) wrote."""
        return [c for c in self.samples.columns
                if c not in NOT_SCORES and self.samples[c].dtype.kind in "iuf"]

    @cached_property
    def refused(self) -> list[tuple[int, str]]:
        """(row, why) of the samples whose key, shard or member names the writer could not have written
        (shards/names.py): readers leave them out, `lvd shards verify` reports them."""
        from shards.names import refused_rows

        return refused_rows(self.table)

    def member_ranges(self, rows: np.ndarray, ext: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset within the sample, size, crc32) of member `ext` for each of `rows`; -1 where a sample lacks it."""
        import pyarrow.compute as pc

        col = self.table.column("members").take(pa.array(rows, pa.int64())).combine_chunks()
        out = [np.full(len(rows), -1, dtype=np.int64) for _ in range(3)]
        if len(rows) == 0:
            return tuple(out)
        flat = pc.list_flatten(col)
        parents = pc.list_parent_indices(col).to_numpy()
        hit = pc.equal(flat.field("ext"), ext).to_numpy(zero_copy_only=False)
        for arr, name in zip(out, ("offset", "size", "crc32")):
            arr[parents[hit]] = flat.field(name).to_numpy(zero_copy_only=False)[hit]
        return tuple(out)

    def select(self, query: str | None) -> np.ndarray:
        """Row indices (ascending) of the samples that satisfy `query`; all rows when it is None."""
        if query is None:
            return np.arange(len(self.samples))
        from shards.query import evaluate

        return np.flatnonzero(evaluate(query, self.samples))

    def fingerprint(self) -> str:
        """Identifies the sample set: the same keys with the same bytes give the same fingerprint."""
        import hashlib

        h = hashlib.sha256()
        h.update("\n".join(self.samples["key"]).encode())
        h.update(np.asarray(self.samples["crc32"], np.int64).tobytes())
        return h.hexdigest()[:16]


def part_table(rows: list[dict[str, Any]], schema: pa.Schema, shard_row: dict[str, Any]) -> pa.Table:
    """One finished shard's manifest rows, with its shard row in the file's metadata."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    table = pa.Table.from_pydict(cols, schema=schema)
    return table.replace_schema_metadata({b"lvd_shard": json.dumps(shard_row).encode()})


def read_part(path) -> tuple[pa.Table, dict[str, Any]]:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"lvd_shard"])
    return table.replace_schema_metadata(None), meta


def manifest_schema(ledger_schema: pa.Schema) -> pa.Schema:
    """Reserved columns first, then the ledger's own."""
    clash = [n for n in ledger_schema.names if n in RESERVED]
    if clash:
        raise ValueError(f"ledger columns {clash} clash with the manifest's own columns {RESERVED}; rename them in curation")
    return pa.schema([*RESERVED_SCHEMA, *ledger_schema])


def save_subset(manifest: Manifest, rows: np.ndarray, path: str, query: str | None) -> None:
    """A subset as a key list (LoaderConfig.subset reads it back), with where it came from."""
    table = pa.table({"key": manifest.samples["key"].iloc[rows].to_numpy(dtype=object)})
    meta = {"shards": manifest.root, "query": query, "manifest": manifest.fingerprint(), "num_samples": len(rows)}
    with fsspec.open(path, "wb") as f:
        pq.write_table(table.replace_schema_metadata({b"lvd_subset": json.dumps(meta).encode()}), f)
