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
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

HF_PREFIX = "hf-hub:"
RANDOM_WEIGHTS_MARKER = "LVD_RANDOM_WEIGHTS"


class MissingCheckpoint(FileNotFoundError):
    """A checkpoint a recipe names is not on this machine; the message says how to provide it. `spec` and
    `problem` (the short why, without the fix) let a caller group several into one message."""

    def __init__(self, message: str, spec: CheckpointSpec | None = None, problem: str | None = None):
        super().__init__(message)
        self.spec = spec
        self.problem = problem or message


# Approximate download sizes of the checkpoints the repo's recipes name by default, so that a user can
# plan the fetch before starting it (a snapshot's size for a repository, the file's for a file).
KNOWN_SIZES = {
    "hf-hub:laion/CoCa-ViT-L-14-laion2B-s13B-b90k": "~2.6 GB",
    "hf-hub:llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "~1.8 GB",
    "hf-hub:Qwen/Qwen2.5-1.5B-Instruct": "~3.1 GB",
    "hf-hub:timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin": "~1.7 GB",
    "hf-hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth": "~4 MB",
}
CPU_RECIPE = "recipes/curation/cpu_fast.yaml"


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
            problem = f"{path} lacks {', '.join(missing)} ({spec.note or 'the model files'})"
            raise MissingCheckpoint(f"{spec.role}: {problem}; it must hold {', '.join(spec.expect)}. "
                                    f"Point {spec.role} at a complete folder.", spec, problem)
    return path


def _resolve_local(spec: CheckpointSpec) -> Path:
    path = Path(spec.source).expanduser()
    if not path.exists():
        wanted = f" (a folder holding {', '.join(spec.expect)})" if spec.expect else ""
        problem = f"{path.absolute()} not found{wanted}"
        raise MissingCheckpoint(
            f"{spec.role}: checkpoint {problem}. Copy the weights there, or set {spec.role} to another local "
            f"path or to hf-hub:org/repo for a model in the Hugging Face cache (`lvd models` lists what a recipe "
            f"needs).", spec, problem)
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
            f"run. Fetch it where there is network: `hf download {repo}{' ' + filename if filename else ''}` "
            f"(then copy the cache to this machine), or set {spec.role} to a local path.",
            spec, "not in the Hugging Face cache") from e


def missing_message(problems: list[MissingCheckpoint], recipe: str, command: str = "curate") -> str:
    """One message for every checkpoint a recipe lacks: a line each, then the fixes once."""
    width = max(len(p.spec.role) if p.spec else 0 for p in problems)
    hub = [p for p in problems if p.spec is not None and is_hf(p.spec.source)]
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    lines = [f"{recipe}: {len(problems)} model checkpoint{'s' if len(problems) != 1 else ''} missing here; "
             "nothing was started."]
    if hub:
        lines.append(f"Not in the Hugging Face cache ({cache}):")
        lines += [f"  {p.spec.role:<{width}}  {KNOWN_SIZES.get(p.spec.source, '?'):>7}  {p.spec.source}" for p in hub]
    others = [p for p in problems if p not in hub]
    if others:
        lines.append("Not found:")
        lines += [f"  {p.spec.role:<{width}}  {p.problem}" if p.spec else f"  {p}" for p in others]
    fixes = []
    if hub:
        fixes.append(f"Fetch them where there is network (`lvd models {recipe} --download`), then copy the "
                     f"cache here, or set each key to a local path (--set KEY=PATH).")
    if command == "curate":
        fixes.append(f"Without GPUs or weights, curate with {CPU_RECIPE} (no weights needed).")
    lines += [textwrap.fill(f, 100) for f in fixes]
    return "\n".join(lines)


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
