"""`lvd bench`: benchmarks that print ratios measured in one run."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (printed ratios, measured in one run)", description=__doc__)
    which = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    c = which.add_parser("curate", help="full curation pipeline vs one decode pass of the same videos",
                         description="Times, in one run, a plain decode of every video and the full CPU curation "
                                     "pipeline on the same videos with the same number of processes; prints the "
                                     "ratio, clips/s and peak memory.")
    c.add_argument("--recipe", default="recipes/curation/default.yaml", help="curation recipe (default: %(default)s)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting (repeatable)")
    c.add_argument("--inputs", nargs="*", default=None, help="videos to use (default: synthetic ones)")
    c.add_argument("--videos", type=int, default=6, help="number of synthetic videos (default 6)")
    c.add_argument("--seconds", type=float, default=20.0, help="length of each synthetic video (default 20)")
    c.add_argument("--height", type=int, default=720, help="height of the synthetic videos (default 720)")
    c.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes on each side (default: all cores)")
    c.set_defaults(run=run_curate)

    from jobs.commands.train import register_bench as register_train_bench

    register_train_bench(which)

    from shards.bench import __doc__ as loader_doc, add_arguments as add_loader_arguments

    loader = which.add_parser("loader", help="shard loader throughput vs a raw sequential read of the same bytes",
                              description=loader_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loader_arguments(loader)
    loader.set_defaults(run=run_loader)


def run_curate(args: argparse.Namespace) -> int:
    from common.config import load_recipe
    from curation.bench import make_bench_videos, run_bench
    from curation.config import CurationConfig

    config = load_recipe(CurationConfig, args.recipe, args.overrides)
    with tempfile.TemporaryDirectory(prefix="lvd-bench-videos-") as tmp:
        if args.inputs:
            videos = [Path(v) for v in args.inputs]
        else:
            print(f"writing {args.videos} synthetic videos ({args.seconds:g} s, {args.height}p)...")
            videos = make_bench_videos(Path(tmp), args.videos, args.seconds, args.height)
        result = run_bench(config, videos, args.workers)
    print("\n".join(result.lines()))
    return 0


def run_loader(args: argparse.Namespace) -> int:
    from shards.bench import run_bench

    return run_bench(args)
