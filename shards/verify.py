"""`lvd shards verify` and `lvd shards stats`: integrity against the manifest's checksums, and what is in it.

Verify reads every shard whole and compares its size and sha256 with shards.parquet; a shard that differs
is then read sample by sample (byte range, tar headers, crc32) to name the damaged samples, and within a
sample the damaged members (mp4, json, jpgs, emb/latents/text safetensors: each has its crc32 in the
manifest). It also reports shard files missing, stray (in the folder but not the manifest) and left-over
temporary files.

Names are checked with the writer's own rule (shards/names.py): every key, shard and member extension in the
manifest (shards.parquet's shard names already when it is loaded), and (unless quick) the name and type of
every member in each tar, read from its headers alone. A
name the writer could not have written (`../`, an absolute path, a control character, a link) is an error:
such a shard is hostile, whatever its checksums say.
"""

from __future__ import annotations

import hashlib
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from shards.manifest import EMBEDDING_SHAPES, Manifest, join, part_name
from shards.names import member_problem
from shards.reader import SampleReader
from shards.tario import SampleFormatError, crc32, parse_sample

CHUNK = 8 << 20


@dataclass
class ShardProblem:
    shard: str
    problem: str                       # missing, truncated, size, checksum
    bad_samples: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


@dataclass
class VerifyReport:
    root: str
    num_shards: int
    num_samples: int
    num_bytes: int
    problems: list[ShardProblem] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (sample key or shard, why): hostile names

    @property
    def ok(self) -> bool:
        return not self.problems and not self.refused

    def lines(self) -> list[str]:
        out = [f"{self.root}: {self.num_shards} shards, {self.num_samples} samples, {self.num_bytes / 1e6:.1f} MB checked"]
        for p in self.problems:
            out.append(f"  BAD {p.shard}: {p.problem}; {len(p.bad_samples)} damaged samples")
            out += [f"      {key}: {why}" for key, why in p.bad_samples[:20]]
        for where, why in self.refused[:20]:
            out.append(f"  REFUSED {where}: {why}")
        if len(self.refused) > 20:
            out.append(f"  ... and {len(self.refused) - 20} more refused names")
        if self.stray:
            out.append(f"  note: {len(self.stray)} shard files not in the manifest: {', '.join(self.stray[:5])}")
        if self.temporary:
            out.append(f"  note: {len(self.temporary)} temporary files of an interrupted writer "
                       f"(re-run `lvd shards write` to finish): {', '.join(self.temporary[:5])}")
        if self.ok:
            out.append("OK")
        if self.problems:
            out.append(f"FAILED: {len(self.problems)} shards damaged; rewrite them with `lvd shards write` into a new "
                       "folder, or restore them from a copy")
        if self.refused:
            out.append(f"FAILED: {len(self.refused)} names the writer could not have written (path traversal, absolute "
                       "paths, control characters, links): do not extract or train on these shards; rewrite them "
                       "with `lvd shards write` from their curation run")
        return out


def sha256_of(fs, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verify(root: str, workers: int = 4, quick: bool = False) -> VerifyReport:
    """Checks every shard of `root`; `quick` compares sizes only (no read)."""
    manifest = Manifest.load(root)
    fs, path = fsspec.core.url_to_fs(root)
    listing = {p.rsplit("/", 1)[-1]: info for p, info in fs.find(path, maxdepth=1, detail=True).items()}
    report = VerifyReport(root, len(manifest.shards), len(manifest.samples), int(manifest.shards["size_bytes"].sum()))
    known = set(manifest.shards["shard"])
    report.stray = sorted(n for n in listing if n.startswith("shard-") and n.endswith(".tar") and n not in known)
    report.temporary = sorted(n for n in listing if n.startswith(".shard-") and n.endswith(".tmp"))
    refused = manifest.refused
    keys = manifest.take(np.array([r for r, _ in refused], np.int64), ["key"]).column("key").to_pylist()
    report.refused = [(str(key), why) for key, (_, why) in zip(keys, refused)]
    member_refusals: list[tuple[str, str]] = []

    def check(row: dict) -> ShardProblem | None:
        name = row["shard"]
        info = listing.get(name)
        if info is None:
            return ShardProblem(name, "missing")
        size = int(info.get("size") or 0)
        if size != row["size_bytes"]:
            problem = "truncated" if size < row["size_bytes"] else "size"
            return ShardProblem(name, f"{problem}: {size} bytes, manifest says {row['size_bytes']}")
        if quick:
            return None
        digest, _ = sha256_of(fs, join(path, name))
        if digest != row["sha256"]:
            return ShardProblem(name, "checksum: sha256 differs from the manifest")
        keys = set(pq.read_table(join(path, part_name(name)), columns=["key"], filesystem=fs).column("key").to_pylist())
        member_refusals.extend((name, why) for why in member_problems(fs, join(path, name), keys))
        return None

    rows = manifest.shards.to_dict("records")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        found = [p for p in pool.map(check, rows) if p is not None]
    reader = SampleReader(root)
    for problem in found:
        if problem.problem != "missing":
            problem.bad_samples = damaged_samples(manifest, reader, problem.shard)
    reader.close()
    report.problems = found
    report.refused += sorted(member_refusals)
    return report


def member_problems(fs, path: str, keys: set[str]) -> list[str]:
    """Why each member of the tar at `path` is not one the writer could have written for the samples `keys`:
    its name (shards/names.py), its type (only regular files), its key. Headers only: tarfile seeks past the
    data, and reads long names and pax headers as an extracting tool would."""
    out = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                why = member_problem(member.name)
                if why is None and not member.isreg():
                    why = f"member {member.name!r} is not a regular file"
                if why is None and member.name.partition(".")[0] not in keys:
                    why = f"member {member.name!r} belongs to no sample of the manifest"
                if why is not None:
                    out.append(why)
    except tarfile.TarError as e:
        out.append(f"not a readable tar: {e}")
    return out


def damaged_samples(manifest: Manifest, reader: SampleReader, shard: str) -> list[tuple[str, str]]:
    bad = []
    for rec in manifest.samples[manifest.samples["shard"] == shard].to_dict("records"):
        try:
            data = reader.read_bytes(str(rec["shard"]), int(rec["offset"]), int(rec["size_bytes"]))
            if crc32(data) != int(rec["crc32"]):
                raise SampleFormatError(f"crc32 mismatch in {rec['shard']} at offset {rec['offset']}"
                                        + damaged_members(data, rec))
            parse_sample(data, str(rec["key"]))
        except (SampleFormatError, OSError) as e:
            bad.append((str(rec["key"]), str(e)))
    return bad


def damaged_members(data, rec: dict) -> str:
    """'; damaged members: ext, ...' for the members whose data differs from their crc32 in the manifest
    ('' when the damage is elsewhere, e.g. in a tar header)."""
    members = rec.get("members")
    if members is None:
        return ""
    exts = [m["ext"] for m in members
            if crc32(data[int(m["offset"]) : int(m["offset"]) + int(m["size"])]) != int(m["crc32"])]
    return f"; damaged members: {', '.join(exts)}" if exts else ""


def stats(manifest: Manifest, rows: np.ndarray | None = None) -> list[str]:
    """Counts and score distributions (of `rows`, default all)."""
    frame = manifest.samples if rows is None else manifest.samples.iloc[rows]
    n, total = len(frame), len(manifest.samples)
    size = frame["size_bytes"].sum()
    out = [f"{manifest.root}: {len(manifest.shards)} shards, {total} samples, "
           f"{manifest.shards['size_bytes'].sum() / 1e9:.3f} GB (written from {manifest.info.get('source_run')}, "
           f"selection {manifest.selection})"]
    if rows is not None:
        out.append(f"selected: {n} samples ({n / max(total, 1):.1%}), {size / 1e9:.3f} GB")
    if n == 0:
        return out
    out.append(f"mean sample {size / n / 1e6:.2f} MB; duration {frame['duration_s'].sum() / 3600:.2f} h "
               f"(mean {frame['duration_s'].mean():.2f} s)")
    res = (frame["width"].astype(str) + "x" + frame["height"].astype(str)).value_counts()
    out.append("resolutions: " + ", ".join(f"{k} {v}" for k, v in res.head(6).items())
               + (f", +{len(res) - 6} more" if len(res) > 6 else ""))
    flags = [c for c in frame.columns if frame[c].dtype.kind == "b"]
    if flags:
        out.append("flags (true): " + ", ".join(f"{c} {int(frame[c].sum())}" for c in flags))
    extras = {c: int(frame[c].notna().sum())
              for c in ("latents_shape", "text_shape", *EMBEDDING_SHAPES, "captions") if c in frame}
    out.append("with " + ", ".join(f"{c.replace('_shape', '')} {v}" for c, v in extras.items()))
    out.append(f"{'score':<22}{'n':>7}{'min':>10}{'p10':>10}{'p50':>10}{'p90':>10}{'max':>10}{'mean':>10}")
    for c in manifest.score_columns:
        v = pd.to_numeric(frame[c], errors="coerce").dropna().to_numpy(dtype=float)
        if v.size == 0:
            out.append(f"{c:<22}{0:>7}")
            continue
        q = np.percentile(v, [0, 10, 50, 90, 100])
        out.append(f"{c:<22}{v.size:>7}" + "".join(f"{x:>10.4g}" for x in q) + f"{v.mean():>10.4g}")
    return out
