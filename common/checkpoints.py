"""Where model weights come from: a local path or the Hugging Face cache, never a download at run time.

A checkpoint is named in a recipe by one of:

    /path/to/file.safetensors  or  /path/to/folder     a local file or folder (relative to the working dir)
    hf-hub:org/repo                                      a repository snapshot in the Hugging Face cache
    hf-hub:org/repo/path/in/repo.bin                     one file of a repository in the cache

`resolve` turns that into a local path or raises `MissingCheckpoint`, whose message names the file that was
expected and how to provide it. Pipelines resolve every checkpoint they need before any work starts, so a
missing file fails the run in seconds, not after an hour of decoding. `lvd models` lists them and can fetch
the Hugging Face ones on a machine with network (`lvd models RECIPE --download`).

A folder holding a file named `RANDOM_WEIGHTS_MARKER` is a stand-in with random weights (`make demo` and
the tests build such tiny models); `is_random_stand_in` tells, so that runs can say their scores mean nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

HF_PREFIX = "hf-hub:"
RANDOM_WEIGHTS_MARKER = "LVD_RANDOM_WEIGHTS"


class MissingCheckpoint(FileNotFoundError):
    """A checkpoint a recipe names is not on this machine; the message says how to provide it."""


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint a recipe needs."""

    role: str                 # e.g. "clip.model", "caption.video.model" (the recipe key that names it)
    source: str               # as written in the recipe (path or hf-hub:...)
    expect: tuple[str, ...] = field(default=())  # files that must exist inside a folder checkpoint
    note: str = ""            # what it is, for `lvd models`


def is_hf(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def split_hf(source: str) -> tuple[str, str | None]:
    """"hf-hub:org/repo/sub/file.bin" -> ("org/repo", "sub/file.bin"); "hf-hub:org/repo" -> ("org/repo", None)."""
    parts = source[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{source!r} is not a Hugging Face reference; write hf-hub:org/repo or "
                         "hf-hub:org/repo/path/to/file")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def resolve(spec: CheckpointSpec) -> Path:
    """The local path of `spec` (a file or a folder), or `MissingCheckpoint` naming what to do."""
    path = _resolve_hf(spec) if is_hf(spec.source) else _resolve_local(spec)
    if path.is_dir() and spec.expect:
        missing = [f for f in spec.expect if not (path / f).exists()]
        if missing:
            raise MissingCheckpoint(f"{spec.role}: {path} lacks {', '.join(missing)}; it must hold "
                                    f"{', '.join(spec.expect)} ({spec.note or 'the model files'}). "
                                    f"Point {spec.role} at a complete folder.")
    return path


def _resolve_local(spec: CheckpointSpec) -> Path:
    path = Path(spec.source).expanduser()
    if not path.exists():
        wanted = f" (a folder holding {', '.join(spec.expect)})" if spec.expect else ""
        raise MissingCheckpoint(
            f"{spec.role}: checkpoint {path.absolute()} not found{wanted}. Copy the weights there, or set "
            f"{spec.role} to another local path or to hf-hub:org/repo for a model in the Hugging Face cache "
            f"(`lvd models RECIPE` lists what a recipe needs).")
    return path


def _resolve_hf(spec: CheckpointSpec) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = split_hf(spec.source)
    try:
        if filename is None:
            return Path(snapshot_download(repo, local_files_only=True))
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        what = f"{filename} of {repo}" if filename else f"the {repo} repository"
        raise MissingCheckpoint(
            f"{spec.role}: {what} is not in the Hugging Face cache ({cache}) and lvd never downloads during a "
            f"run. Fetch it where there is network: `lvd models RECIPE --download` or `hf download {repo}"
            f"{' ' + filename if filename else ''}` (then copy the cache to this machine), or set {spec.role} "
            f"to a local path.") from e


def download(spec: CheckpointSpec) -> Path:
    """Fetches a hf-hub checkpoint into the cache (needs network); local paths are only checked."""
    if not is_hf(spec.source):
        return resolve(spec)
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, filename = split_hf(spec.source)
    return Path(hf_hub_download(repo, filename) if filename else snapshot_download(repo))


def is_random_stand_in(path: Path) -> bool:
    """True for the tiny random-weight models `make demo` and the tests build (their folder has the marker)."""
    folder = path if path.is_dir() else path.parent
    return (folder / RANDOM_WEIGHTS_MARKER).exists()


def mark_random(folder: Path, what: str) -> None:
    """Marks `folder` as a random-weight stand-in, so that every run using it says so."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RANDOM_WEIGHTS_MARKER).write_text(
        f"{what}: random weights at tiny size, built by lvd for demos and tests. Its outputs mean nothing.\n")
