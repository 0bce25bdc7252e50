"""Turning what the user gave (files, folders, globs, list files, fsspec URLs) into the video list.

Every name the user gave ends up in the ledger: a video to process, or a row saying why not
(a folder's non-video files, a path that does not exist).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"]
GLOB_CHARS = set("*?[")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class InputVideo:
    source: str                     # absolute local path or URL
    skip_reason: str | None = None  # set when the input is listed but not processed

    @property
    def video_id(self) -> str:
        return video_id(self.source)


def video_id(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def discover(inputs: list[str], extensions: list[str]) -> list[InputVideo]:
    """Expands inputs in order, without duplicates. A list file is `@path` or a path ending in .txt/.lst/.list."""
    found: dict[str, InputVideo] = {}
    for name in inputs:
        for item in _expand(name, extensions, depth=0):
            found.setdefault(item.source, item)
    return list(found.values())


def _expand(name: str, extensions: list[str], depth: int) -> list[InputVideo]:
    name = name.strip()
    if name.startswith("file://"):
        name = name[len("file://"):]
    if name.startswith("@") or (name.lower().endswith(LIST_SUFFIXES) and not GLOB_CHARS & set(name)):
        return _read_list(name.removeprefix("@"), extensions, depth)
    if is_url(name):
        return _expand_url(name, extensions)
    if GLOB_CHARS & set(name):
        matches = sorted(glob.glob(os.path.expanduser(name), recursive=True))
        if not matches:
            return [InputVideo(name, skip_reason="not_found: the pattern matched no file")]
        return [v for m in matches for v in _expand_local(Path(m), extensions, explicit=False)]
    return _expand_local(Path(os.path.expanduser(name)), extensions, explicit=True)


def _expand_local(path: Path, extensions: list[str], explicit: bool) -> list[InputVideo]:
    source = str(path.absolute())
    if path.is_dir():
        out = []
        for root, dirs, files in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if not f.startswith("."):
                    out.append(_classify(Path(root) / f, extensions))
        return out
    if not path.exists() and not path.is_symlink():
        return [InputVideo(source, skip_reason="not_found: no such file or folder")]
    # A file named explicitly is always tried, whatever its extension: wrong extensions are common.
    return [InputVideo(source)] if explicit else [_classify(path, extensions)]


def _classify(path: Path, extensions: list[str]) -> InputVideo:
    if path.suffix.lower() in extensions:
        return InputVideo(str(path.absolute()))
    return InputVideo(str(path.absolute()), skip_reason=f"not_a_video_extension: {path.suffix or '(none)'} "
                      "(add it to the recipe's extensions list, or name the file directly, to process it)")


def _read_list(path: str, extensions: list[str], depth: int) -> list[InputVideo]:
    if depth > 4:
        return [InputVideo(path, skip_reason="list_error: list files nest deeper than 4 levels")]
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "r") as f:
                lines = f.read().splitlines()
        else:
            lines = Path(os.path.expanduser(path)).read_text().splitlines()
    except OSError as e:
        return [InputVideo(path, skip_reason=f"list_error: {e.strerror or e}")]
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # relative entries are relative to the list file, like paths in a playlist
        if not (is_url(line) or os.path.isabs(line) or line.startswith(("@", "~"))):
            line = f"{base}/{line}"
        out.extend(_expand(line, extensions, depth + 1))
    return out


def _expand_url(url: str, extensions: list[str]) -> list[InputVideo]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
        if GLOB_CHARS & set(url):
            names = sorted(fs.glob(paths[0])) if paths else []
        elif fs.isdir(paths[0]):
            names = sorted(fs.find(paths[0]))
        elif fs.exists(paths[0]):
            return [InputVideo(url)]
        else:
            return [InputVideo(url, skip_reason="not_found: no such object")]
    except Exception as e:  # noqa: BLE001 - any backend error becomes a reason for this input
        return [InputVideo(url, skip_reason=f"list_error: {type(e).__name__}: {e}")]
    if not names:
        return [InputVideo(url, skip_reason="not_found: the pattern matched no object")]
    out = []
    for name in names:
        full = name if "://" in name else fs.unstrip_protocol(name)
        suffix = os.path.splitext(name)[1].lower()
        out.append(InputVideo(full) if suffix in extensions else InputVideo(
            full, skip_reason=f"not_a_video_extension: {suffix or '(none)'} (add it to the recipe's extensions list)"))
    return out
