"""`lvd`: the command line. Each subcommand lives in its own module under jobs/commands/ and exposes
`register(subparsers)`; the work itself lives in curation/, shards/ and training/."""

from __future__ import annotations

import argparse
import importlib
import sys

from common.checkpoints import MissingCheckpoint
from common.config import ConfigError

# Module names under jobs.commands, in the order `lvd --help` lists them.
COMMANDS = ("curate", "report", "ledger", "models", "shards", "precompute", "train", "calibrate", "sample", "bench", "submit", "jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd",
        description="lvd: raw videos -> curated clips -> WebDataset shards -> a latent video diffusion model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jobs.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, MissingCheckpoint) as e:
        print(f"lvd {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lvd {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
