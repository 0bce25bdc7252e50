"""The manifest: which sample lives where, with its checksum and every score, so that subset queries,
stats and the loader's plan need no tar reads.

A shard folder (local, or any fsspec URL for reading):

    shard-000003-00000.tar ...  WebDataset tars: per sample <key>.mp4, .json, .first.jpg, .last.jpg,
                                .emb.safetensors (the ledger's embedding columns, when the clip has any)
                                (and .latents.safetensors / .text.safetensors once precomputed)
    manifest/shard-000003-00000.parquet
                                the manifest, a parquet dataset: one file per shard, written by the task that
                                packed the shard (renamed into place after the tar: it is the shard's "done"
                                marker), holding that shard's samples (schema below) and, in its metadata, the
                                shard's row of shards.parquet
    shards.parquet              one row per shard, in name order: shard, num_samples, size_bytes, sha256
    info.json                   format, where the samples came from, the writer's settings, skipped samples;
                                written last: its presence means the folder is complete

Shard names are `shard-GGGGGG-NNNNN.tar`: G the group (one ledger file, packed by one task), N the shard's
number within it. Samples are in name order of the manifest files, then in file order: a manifest "row" is a
position in that order (what `select` returns and the training plan stores).

Readers never load the whole manifest: `scan` projects columns and pushes filters down (pyarrow dataset),
`select` compiles a query to a DuckDB scan (shards/query.py). `samples`/`table` load everything, for small
folders and tests only.

Manifest columns: key (= clip_id), shard (file name), offset and size_bytes (the sample's byte range
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
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from shards.names import shard_problem
from shards.source import EMBEDDING_COLUMNS, embedding_shape_column

FORMAT = "lvd-shards/2"
MANIFEST_DIR = "manifest"
INFO = "info.json"

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


def shard_name(group: int, index: int) -> str:
    """The tar of `group`'s `index`-th shard; names sort in the order the samples are planned in."""
    return f"shard-{group:06d}-{index:05d}.tar"


def part_name(shard: str) -> str:
    """The manifest file of a shard, relative to the shard folder."""
    return f"{MANIFEST_DIR}/{shard.removesuffix('.tar')}.parquet"


class Manifest:
    """A shard folder's manifest, read from a local path or an fsspec URL. Loading reads info.json and
    shards.parquet (one row per shard) only; samples are read by `scan` / `select` with projection."""

    def __init__(self, root: str, shards: pd.DataFrame, info: dict[str, Any], fs: Any = None, path: str | None = None) -> None:
        self.root = root
        self.shards = shards
        self.info = info
        if fs is None:
            fs, path = fsspec.core.url_to_fs(root)
        self.fs, self.path = fs, path

    @classmethod
    def load(cls, root: str) -> "Manifest":
        root = str(root)
        fs, path = fsspec.core.url_to_fs(root)
        if not fs.exists(join(path, INFO)):
            hint = (" (the writer was interrupted: re-run `lvd shards write` to finish)"
                    if fs.exists(join(path, MANIFEST_DIR)) else "")
            raise FileNotFoundError(f"no {INFO} in {root}{hint}; write shards with `lvd shards write RUN_DIR {root}`")
        with fs.open(join(path, INFO), "r") as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"{root} holds shards of format {info.get('format')!r}, this lvd reads {FORMAT!r}; "
                             "rewrite them with this version's `lvd shards write`")
        shards = pq.read_table(join(path, "shards.parquet"), filesystem=fs).to_pandas()
        hostile = [why for name in shards["shard"] if (why := shard_problem(name))]
        if hostile:  # shard names become paths (the manifest files, the tars): refuse before any is opened
            raise ValueError(f"{root}/shards.parquet lists {len(hostile)} shards lvd could not have written "
                             f"({hostile[0]}); do not read these shards: rewrite them with `lvd shards write` from "
                             "their curation run")
        return cls(root, shards, info, fs, path)

    def shard_url(self, shard: str) -> str:
        return join(self.root, shard)

    @property
    def selection(self) -> str:
        return str(self.info.get("selection", "keep"))

    @property
    def num_samples(self) -> int:
        return int(self.shards["num_samples"].sum())

    @cached_property
    def part_paths(self) -> list[str]:
        """The manifest's files (filesystem paths), in row order."""
        return [join(self.path, part_name(s)) for s in self.shards["shard"]]

    @cached_property
    def part_starts(self) -> np.ndarray:
        """Row of each manifest file's first sample, and the total at the end."""
        return np.concatenate([[0], np.cumsum(self.shards["num_samples"].to_numpy(np.int64))])

    @cached_property
    def schema(self) -> pa.Schema:
        return pq.read_schema(self.part_paths[0], filesystem=self.fs).remove_metadata()

    def dataset(self) -> ds.Dataset:
        """The manifest as a pyarrow dataset (files in row order; a file missing a newer column reads nulls)."""
        return ds.dataset(self.part_paths, schema=self.schema, format="parquet", filesystem=self.fs)

    def scan(self, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """The samples' `columns` (None: all) where `filter` holds, in row order, read with projection and
        pushdown: only those columns (and the row groups the filter can match) are read."""
        return self.dataset().to_table(columns=columns, filter=filter)

    def take(self, rows: np.ndarray, columns: list[str] | None) -> pa.Table:
        """`columns` (None: all) of the samples at `rows` (ascending), reading only the manifest files that
        hold them."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (np.diff(rows) < 0).any():
            raise ValueError("Manifest.take needs ascending rows")
        # rows ascend, so each file's rows are one run: its bounds by binary search, not a mask per file
        bounds = np.searchsorted(rows, self.part_starts)
        pieces = []
        for f in np.flatnonzero(np.diff(bounds)):
            local = rows[bounds[f] : bounds[f + 1]] - self.part_starts[f]
            part = pq.read_table(self.part_paths[f], columns=columns, filesystem=self.fs, schema=self.schema)
            pieces.append(part.take(pa.array(local)))
        if not pieces:
            empty = self.schema.empty_table()
            return empty if columns is None else empty.select(columns)
        return pa.concat_tables(pieces)

    @cached_property
    def table(self) -> pa.Table:
        """Every sample, every column. Small folders and tests only: training and queries use `scan`/`select`."""
        return self.scan()

    @cached_property
    def samples(self) -> pd.DataFrame:
        """`table` as pandas (small folders and tests only)."""
        return self.table.to_pandas()

    @cached_property
    def score_columns(self) -> list[str]:
        """Numeric, non-bookkeeping columns: the scores curation (and later stages) wrote."""
        return [f.name for f in self.schema
                if f.name not in NOT_SCORES and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]

    @cached_property
    def refused(self) -> list[tuple[int, str]]:
        """(row, why) of the samples whose key, shard or member names the writer could not have written
        (shards/names.py): readers leave them out, `lvd shards verify` reports them."""
        from shards.names import refused_rows

        return refused_rows(self.scan([c for c in ("key", "shard", "members") if c in self.schema.names]))

    def member_ranges(self, rows: np.ndarray, ext: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offset within the sample, size, crc32) of member `ext` for each of `rows`; -1 where a sample lacks it."""
        return member_ranges(self.take(rows, ["members"]).column("members").combine_chunks(), ext)

    def select(self, query: str | None) -> np.ndarray:
        """Rows (ascending) of the samples that satisfy `query`; all rows when it is None. A scan of the
        columns the query names, filtered where it reads them (shards/query.py)."""
        if query is None:
            return np.arange(self.num_samples)
        from shards.query import select_rows

        return select_rows(self, query)

    def fingerprint(self) -> str:
        """Identifies the sample set: the same shards with the same bytes give the same fingerprint (the
        shards' sha256 covers every sample's bytes and key)."""
        import hashlib

        h = hashlib.sha256()
        h.update("\n".join(self.shards["shard"]).encode())
        h.update("\n".join(self.shards["sha256"]).encode())
        return h.hexdigest()[:16]


def member_ranges(members: pa.ListArray, ext: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset within the sample, size, crc32) of member `ext` for each sample of a `members` column; -1 where
    a sample lacks it. Vectorised: no Python object per sample."""
    import pyarrow.compute as pc

    out = [np.full(len(members), -1, dtype=np.int64) for _ in range(3)]
    if len(members) == 0:
        return tuple(out)
    flat = pc.list_flatten(members)
    parents = pc.list_parent_indices(members).to_numpy()
    hit = pc.equal(flat.field("ext"), ext).to_numpy(zero_copy_only=False)
    for arr, name in zip(out, ("offset", "size", "crc32")):
        arr[parents[hit]] = flat.field(name).to_numpy(zero_copy_only=False)[hit]
    return tuple(out)


def part_table(rows: list[dict[str, Any]], schema: pa.Schema, shard_row: dict[str, Any]) -> pa.Table:
    """One finished shard's manifest rows, with its shard row in the file's metadata."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    table = pa.Table.from_pydict(cols, schema=schema)
    return table.replace_schema_metadata({b"lvd_shard": json.dumps(shard_row).encode()})


def read_part(path, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """A manifest file's rows (`columns`) and its shard row."""
    table = pq.read_table(path, columns=columns)
    return table.replace_schema_metadata(None), read_shard_row(path)


def read_shard_row(path) -> dict[str, Any]:
    """The shard row a manifest file carries in its metadata (reads the footer only)."""
    return json.loads(pq.read_schema(path).metadata[b"lvd_shard"])


def manifest_schema(ledger_schema: pa.Schema) -> pa.Schema:
    """Reserved columns first, then the ledger's own."""
    clash = [n for n in ledger_schema.names if n in RESERVED]
    if clash:
        raise ValueError(f"ledger columns {clash} clash with the manifest's own columns {RESERVED}; rename them in curation")
    return pa.schema([*RESERVED_SCHEMA, *ledger_schema])


def save_subset(manifest: Manifest, rows: np.ndarray, path: str, query: str | None) -> None:
    """A subset as a key list (LoaderConfig.subset reads it back), with where it came from."""
    table = manifest.take(rows, ["key"])
    meta = {"shards": manifest.root, "query": query, "manifest": manifest.fingerprint(), "num_samples": len(rows)}
    with fsspec.open(path, "wb") as f:
        pq.write_table(table.replace_schema_metadata({b"lvd_subset": json.dumps(meta).encode()}), f)
