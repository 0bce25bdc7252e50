"""Tiny random-weight stand-ins for every model curation loads, for `make demo` and the tests.

No model weights can be downloaded here, so the demo builds each model class at tiny size with random
weights and saves it exactly as the real checkpoint is laid out; the stages then load it through the same
code a real checkpoint takes. Each folder carries common.checkpoints' marker, so every run that uses one
says its scores and captions mean nothing.

    python -m curation.testing.tiny_models demo-data/models   # builds what is missing; prints the --set overrides
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any



def build_all(root: str | Path, seed: int = 0, max_new_tokens: int = 8) -> dict[str, Any]:
    """Builds every stand-in under `root` (once: a complete earlier build is reused) and returns the recipe
    sections that use them: {"clip": {...}, "caption": {...}}. Random captioners never choose to stop, so
    each caption runs to `max_new_tokens`."""
    from curation.testing.tiny_captioners import write_tiny_captioners
    from curation.testing.tiny_clip import write_tiny_clip_assets

    root = Path(root)
    done = root / ".complete"
    if not done.exists():
        write_tiny_clip_assets(root / "clip", seed=seed)
        write_tiny_captioners(root / "captioners", seed=seed)
        done.touch()
    caps = root / "captioners"
    return {
        "clip": {"checkpoint": str(root / "clip" / "clip"),
                 "aesthetic_head": str(root / "clip" / "aesthetic" / "head.safetensors")},
        "caption": {"image": {"checkpoint": str(caps / "coca"), "max_new_tokens": max_new_tokens},
                    "video": {"model": str(caps / "vlm"), "max_new_tokens": max_new_tokens},
                    "summary": {"model": str(caps / "lm"), "max_new_tokens": max_new_tokens}},
    }


def as_overrides(sections: dict[str, Any], prefix: str = "") -> list[str]:
    """{"clip": {"checkpoint": p}} -> ["clip.checkpoint=p"] (the `--set` syntax)."""
    out = []
    for key, value in sections.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curation.testing.tiny_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder for the stand-ins")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars for one tiny file each: noise in the demo
    print(" ".join(f"--set {o}" for o in as_overrides(build_all(args.root, args.seed))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
