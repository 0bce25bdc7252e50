"""Turning what the user gave (files, folders, globs, list files, fsspec URLs) into the input dataset.

Listing runs in Ray tasks, never serially on the driver: each task takes a few work items (a name the
user gave, a folder, a list file, a glob, a URL prefix), writes the videos it found as one parquet part of
`RUN/inputs/`, and hands back the folders and list entries it did not get to, which become new tasks. A
task walks at most `MAX_DIRS_PER_TASK` folders, so a tree of millions of files fans out over the cluster.

What counts as an input video: every file named directly (whatever its extension: wrong extensions are
common) or listed in a list file, and every file with a video extension inside a folder, glob or URL
prefix. Other files in a folder (licences, READMEs) are not videos: they are counted, not listed.

Missing inputs: a path in the recipe's `inputs` (few) that does not exist is an error before any work
(`check_paths`, on the driver); a glob or URL there that the listing tasks found nothing for is an error
once they ran, before any decode (`unmatched`), since matching it can mean walking a large tree. With
`inputs_missing: record` they are recorded as `not_found` in the ledger instead. Entries of list files (up
to millions) are never checked up front: the decode actor records a missing one as `not_found`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

VIDEO_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"]
GLOB_CHARS = set("*?[")
LIST_SUFFIXES = (".txt", ".lst", ".list")
MAX_DIRS_PER_TASK = 256   # folders one listing task walks before it hands the rest back
MAX_LIST_DEPTH = 4        # list files naming list files

INPUT_SCHEMA = pa.schema([("video_id", pa.string()), ("source", pa.string()), ("source_raw", pa.binary()),
                          ("bucket", pa.int32()), ("skip_reason", pa.string())])


def video_id(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


@dataclass(frozen=True)
class Item:
    """One unit of listing work: a name as the user gave it, or a folder / list file found on the way."""

    kind: str           # "name" | "dir" | "list"
    path: str
    depth: int = 0      # list-file nesting
    base: str = ""      # for names read from a list file: that file's folder


@dataclass
class Expansion:
    sources: list[tuple[str, str | None]] = field(default_factory=list)  # (source, skip_reason)
    pending: list[Item] = field(default_factory=list)
    num_ignored: int = 0  # non-video files inside folders, globs and prefixes


def expand(items: list[Item], extensions: list[str]) -> Expansion:
    """Expands work items up to MAX_DIRS_PER_TASK folders; what is left over comes back as `pending`."""
    out = Expansion()
    budget = [MAX_DIRS_PER_TASK]
    queue = deque(items)
    while queue:
        item = queue.popleft()
        if item.kind == "dir":
            if budget[0] <= 0:
                out.pending.append(item)
                continue
            budget[0] -= 1
            _list_dir(item.path, extensions, out, queue)
        elif item.kind == "list":
            _read_list(item, out, queue)
        else:
            _expand_name(item, extensions, out, queue)
    return out


def _expand_name(item: Item, extensions: list[str], out: Expansion, queue: deque[Item]) -> None:
    name = item.path.strip()
    if name.startswith("file://"):
        name = name[len("file://"):]
    if item.base and not (is_url(name) or os.path.isabs(name) or name.startswith(("@", "~"))):
        # relative entries are relative to the list file, like paths in a playlist
        name = f"{item.base}/{name}"
    if name.startswith("@") or (name.lower().endswith(LIST_SUFFIXES) and not GLOB_CHARS & set(name)):
        queue.append(Item("list", name.removeprefix("@"), item.depth))
    elif is_url(name):
        _expand_url(name, extensions, out)
    elif GLOB_CHARS & set(name):
        matches = sorted(glob.glob(os.path.expanduser(name), recursive=True))
        if not matches:
            out.sources.append((name, "not_found: the pattern matched no file"))
        for m in matches:
            if os.path.isdir(m):
                queue.append(Item("dir", str(Path(m).absolute())))
            elif Path(m).suffix.lower() in extensions:
                out.sources.append((str(Path(m).absolute()), None))
            else:
                out.num_ignored += 1
    else:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            queue.append(Item("dir", str(path.absolute())))
        else:  # a file named directly is always tried; the decode actor says if it is missing
            out.sources.append((str(path.absolute()), None))


def _list_dir(path: str, extensions: list[str], out: Expansion, queue: deque[Item]) -> None:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        out.sources.append((path, f"list_error: {e.strerror or e}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if is_dir:
            queue.append(Item("dir", entry.path))
        elif os.path.splitext(entry.name)[1].lower() in extensions:
            out.sources.append((entry.path, None))
        else:
            out.num_ignored += 1


def _read_list(item: Item, out: Expansion, queue: deque[Item]) -> None:
    path = item.path
    if item.depth >= MAX_LIST_DEPTH:
        out.sources.append((path, f"list_error: list files nest deeper than {MAX_LIST_DEPTH} levels"))
        return
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "r") as f:
                lines = f.read().splitlines()
        else:
            lines = Path(os.path.expanduser(path)).read_text().splitlines()
    except OSError as e:
        out.sources.append((path, f"list_error: {e.strerror or e}"))
        return
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            queue.append(Item("name", line, item.depth + 1, base))


def _expand_url(url: str, extensions: list[str], out: Expansion) -> None:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
        if GLOB_CHARS & set(url):
            names = sorted(fs.glob(paths[0])) if paths else []
        elif fs.isdir(paths[0]):
            names = sorted(fs.find(paths[0]))
        elif fs.exists(paths[0]):
            out.sources.append((url, None))
            return
        else:
            out.sources.append((url, "not_found: no such object"))
            return
    except Exception as e:  # noqa: BLE001 - any backend error becomes a reason for this input
        out.sources.append((url, f"list_error: {type(e).__name__}: {e}"))
        return
    if not names:
        out.sources.append((url, "not_found: the pattern matched no object"))
    for name in names:
        if os.path.splitext(name)[1].lower() in extensions:
            out.sources.append((name if "://" in name else fs.unstrip_protocol(name), None))
        else:
            out.num_ignored += 1


def check_paths(inputs: list[str], output: str, missing: str = "error", local: bool = True) -> None:
    """Refuses, before any work, what would make a run useless or harmful: no inputs, an output that is a file
    or lies inside an input folder (a re-run would curate its own clips), and (with `missing` "error") a
    recipe path input that does not exist. `local` False (a cluster run) leaves the inputs' existence to
    `unmatched`, in a task, since the cluster's filesystems may differ from the driver's (the driver writes
    into the output folder either way). Raises ConfigError naming the path and the fix."""
    from common.config import ConfigError

    if not inputs:
        raise ConfigError("no inputs: set inputs in the recipe or pass --set inputs=[path/to/videos]")
    if is_url(output):
        return
    out = Path(os.path.expanduser(output)).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {output} is an existing file, not a folder; choose a new or existing folder "
                          "path (--set output=runs/NAME)")
    for name in inputs:
        if is_url(name) or name.startswith("@"):
            continue
        folder = _folder_of(name.removeprefix("file://"))
        if folder is not None and _inside(out, folder):
            raise ConfigError(f"output {output} is inside input folder {name}: a re-run would curate its own clips; "
                              "put the output outside the inputs (--set output=...)")
    if local and missing == "error":
        missing_inputs_error([n for n in inputs if not _exists(n)])


def missing_inputs_error(absent: list[str]) -> None:
    """Raises the ConfigError for recipe inputs that name nothing (none: returns)."""
    from common.config import ConfigError

    if absent:
        raise ConfigError(f"input{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
                          f"{'do' if len(absent) > 1 else 'does'} not exist (nothing was decoded); fix the path, or "
                          "set inputs_missing: record to record missing inputs in the ledger and go on")


def unmatched(inputs_dir: str, names: list[str]) -> list[str]:
    """In a task, where the inputs are seen: which of `names` (recipe inputs from `deferred`) name nothing: a
    plain path that does not exist, a glob or URL the listing recorded as matching nothing (a column-projected,
    filtered scan of RUN/inputs/)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    parts = sorted(Path(inputs_dir).glob("part-*.parquet"))
    patterns = [n for n in names if _is_pattern(n)]
    found: set[str] = set()
    if parts and patterns:
        rows = pads.dataset([str(p) for p in parts], schema=INPUT_SCHEMA).to_table(
            columns=["source"],
            filter=pc.field("source").isin(patterns) & pc.starts_with(pc.field("skip_reason"), "not_found"))
        found = set(rows.column("source").to_pylist())
    return [n for n in names if n in found or not _exists(n)]


def _folder_of(name: str) -> Path | None:
    """The folder an input name walks: itself, or a glob's fixed leading part; None for a file or list file."""
    path = os.path.expanduser(name)
    if GLOB_CHARS & set(path):
        fixed = []
        for part in Path(path).parts:
            if GLOB_CHARS & set(part):
                break
            fixed.append(part)
        return Path(*fixed).absolute() if fixed else Path.cwd()
    return Path(path).absolute() if os.path.isdir(path) else None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def _is_pattern(name: str) -> bool:
    """A glob or URL: only the listing tasks can tell whether it matches (a URL prefix or pattern that matches
    nothing is recorded under its own name)."""
    return is_url(name) or (bool(GLOB_CHARS & set(name)) and not name.startswith("@"))


def _exists(name: str) -> bool:
    """Whether a recipe input names something; globs and URLs are left to the listing tasks (`unmatched`)."""
    return _is_pattern(name) or os.path.lexists(os.path.expanduser(name.removeprefix("file://").removeprefix("@")))


def deferred(inputs: list[str], local: bool) -> list[str]:
    """The recipe inputs to check after listing, in a task: globs and URLs, and on a cluster (`local` False)
    every input, since only the cluster sees its filesystems."""
    return [n for n in inputs if not local or _is_pattern(n)]


def input_table(sources: list[tuple[str, str | None]], num_buckets: int) -> pa.Table:
    from curation.ledger import bucket_of, display_source

    ids, shown, raws, buckets, reasons = [], [], [], [], []
    for source, reason in sources:
        vid = video_id(source)
        text, raw = display_source(source)
        ids.append(vid)
        shown.append(text)
        raws.append(raw)
        buckets.append(bucket_of(vid, num_buckets))
        reasons.append(reason)
    return pa.table([ids, shown, raws, buckets, reasons], schema=INPUT_SCHEMA)


def list_task(items: list[Item], extensions: list[str], out_dir: str, num_buckets: int) -> tuple[list[Item], int, int]:
    """One listing task: expands `items`, writes what it found as one part of `out_dir`; returns (work
    left over, videos found, other files ignored)."""
    found = expand(items, extensions)
    if found.sources:
        path = Path(out_dir) / f"part-{uuid.uuid4().hex}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(input_table(found.sources, num_buckets), tmp)
        os.replace(tmp, path)
    return found.pending, len(found.sources), found.num_ignored


def source_path(source: str, source_raw: bytes | None) -> str:
    """The path to open: the raw bytes when the name is not valid UTF-8 (a str with surrogate escapes)."""
    return os.fsdecode(source_raw) if source_raw is not None else source


def discover(inputs: list[str], extensions: list[str]) -> tuple[list[tuple[str, str | None]], int]:
    """In-process expansion, for small lists and tests: (sources in listing order, without duplicates; how
    many non-video files were ignored). Runs use `list_task` in Ray tasks instead."""
    pending = [Item("name", n) for n in inputs]
    sources: dict[str, str | None] = {}
    ignored = 0
    while pending:
        found = expand(pending[:1], extensions)
        pending = found.pending + pending[1:]
        ignored += found.num_ignored
        for source, reason in found.sources:
            sources.setdefault(source, reason)
    return list(sources.items()), ignored
