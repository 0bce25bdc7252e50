"""`lvd`: the command line. Each subcommand lives in its own module under jobs/commands/ and exposes
`register(subparsers)`; the work itself lives in curation/, shards/ and training/."""

from __future__ import annotations

import argparse
import importlib
import sys

from common.checkpoints import MissingCheckpoint
from common.config import ConfigError
from training.weights_only import UnsafeCheckpoint

# Module names under jobs.commands, in the order `lvd --help` lists them.
COMMANDS = ("curate", "report", "ledger", "models", "shards", "precompute", "train", "calibrate", "sample", "bench", "submit", "jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd",
        description="lvd: raw videos -> curated clips -> WebDataset shards -> a latent video diffusion model.",
    )
    parser.add_argument("--version", action=_Version, help="print lvd's version and git revision, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jobs.commands.{name}").register(sub)
    for leaf in _leaf_parsers(parser):
        _add_verbosity(leaf)
    return parser


class _Version(argparse.Action):
    """--version, computed only when asked (the git revision costs a subprocess)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata

        from common.runinfo import git_revision

        try:
            version = importlib.metadata.version("lvd")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        print(f"lvd {version} (git {git_revision()})")
        parser.exit()


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers that run something: every subcommand, and the actions of `lvd shards`, `lvd jobs`, ..."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also show the libraries' own log lines and warnings (Ray, DeepSpeed); by default "
                            "Ray's go to the run's logs/ray.log")
    group.add_argument("-q", "--quiet", action="store_true", help="only results and errors: no progress bars")


def main(argv: list[str] | None = None) -> int:
    from common.verbosity import set_level

    parser = build_parser()
    args = parser.parse_args(argv)
    set_level(args.verbose, args.quiet)
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        return int(args.run(args) or 0)
    except (ConfigError, MissingCheckpoint, UnsafeCheckpoint) as e:
        print(f"lvd {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lvd {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
