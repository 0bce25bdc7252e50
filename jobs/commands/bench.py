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

    from curation.bench.scale import __doc__ as scale_doc

    sc = which.add_parser("scale", help="driver memory and time per video of curation at two dataset sizes",
                          description=scale_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("--videos", default="10000,100000", metavar="LIST",
                    help="comma-separated numbers of stand-in videos (default: %(default)s)")
    sc.add_argument("--json", default=None, metavar="FILE", help="also write the rows and ratios to FILE")
    sc.add_argument("--work-dir", default=None, help="folder for the temporary run folders (default: the system's)")
    sc.set_defaults(run=run_scale)

    from curation.bench.dedup import __doc__ as dedup_doc

    dd = which.add_parser("dedup", help="near-duplicate search: time, memory, recall of planted pairs, agreement "
                                        "with the exact all-pairs search", description=dedup_doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    dd.add_argument("--clips", type=int, default=1_000_000, help="synthetic clip vectors (default: %(default)s)")
    dd.add_argument("--dim", type=int, default=768, help="vector size (default: %(default)s, CLIP ViT-L/14)")
    dd.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    dd.add_argument("--work-dir", default=None, help="folder for the temporary files (default: the system's; "
                                                      "needs ~2.5x clips x dim x 4 bytes)")
    dd.set_defaults(run=run_dedup)

    from shards.bench.manifest import __doc__ as manifest_doc

    mf = which.add_parser("manifest", help="subset query and training plan over a large synthetic manifest, and one "
                                           "rank's peak memory reading its slice", description=manifest_doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    mf.add_argument("--rows", type=int, default=1_000_000, help="manifest rows (default: %(default)s)")
    mf.add_argument("--rows-per-file", type=int, default=100_000, help="rows per manifest file (default: %(default)s)")
    mf.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    mf.add_argument("--work-dir", default=None, help="folder for the temporary manifest and plan (default: the "
                                                     "system's; ~0.5 GB per million rows)")
    mf.set_defaults(run=run_manifest)

    from jobs.commands.train import register_bench as register_train_bench

    register_train_bench(which)

    from shards.bench.loader import __doc__ as loader_doc, add_arguments as add_loader_arguments

    loader = which.add_parser("loader", help="shard loader throughput vs a raw sequential read of the same bytes",
                              description=loader_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loader_arguments(loader)
    loader.set_defaults(run=run_loader)

    from curation.bench.stages import DEFAULT_RECIPE, __doc__ as stages_doc

    s = which.add_parser("stages", help="clips/s of the model stages (text, caption, clip): batched vs one clip per call",
                         description=stages_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", default=DEFAULT_RECIPE, help="curation recipe (default: %(default)s)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting (repeatable), e.g. --set clip.precision=bf16")
    s.add_argument("--stages", default=None, metavar="LIST",
                   help="comma-separated recipe sections to time, of text,caption,clip (default: every enabled one)")
    s.add_argument("--clips", type=int, default=32,
                   help="clips timed per batch size, rounded up to whole batches (default 32)")
    s.add_argument("--batch-sizes", default=None, metavar="LIST",
                   help="comma-separated batch sizes, e.g. 1,16,64 (default: 1 and the stage's batch_size); "
                        "the ratio compares each with the smallest")
    s.add_argument("--tiny", action="store_true",
                   help="build tiny random-weight stand-ins in a temporary folder and point the recipe's clip "
                        "and caption sections at them (no real weights needed)")
    s.add_argument("--device", default=None, metavar="cpu|cuda|cpu,cuda",
                   help="run the stages on the CPU (num_gpus 0) or one GPU (num_gpus 1), or both to compare "
                        "(default: where the recipe puts each stage)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per stage (default: what a Ray actor of the stage gets, floor(num_cpus))")
    s.set_defaults(run=run_stages)


def run_curate(args: argparse.Namespace) -> int:
    from common.config import load_recipe
    from curation.bench.curate import make_bench_videos, run_bench
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


def run_manifest(args: argparse.Namespace) -> int:
    from shards.bench.manifest import run_bench

    if args.rows < 1000 or args.rows_per_file < 100:
        raise SystemExit(f"lvd bench manifest: --rows must be at least 1000 and --rows-per-file at least 100 "
                         f"(got {args.rows}, {args.rows_per_file})")
    _make_work_dir(args.work_dir)
    run_bench(args.rows, args.json, args.work_dir, args.rows_per_file)
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from curation.bench.dedup import run_bench

    if args.clips < 100 or args.dim < 2:
        raise SystemExit(f"lvd bench dedup: --clips must be at least 100 and --dim at least 2 "
                         f"(got {args.clips}, {args.dim})")
    _make_work_dir(args.work_dir)
    run_bench(args.clips, args.dim, args.json, args.work_dir)
    return 0


def run_scale(args: argparse.Namespace) -> int:
    from curation.bench.scale import run_bench

    try:
        sizes = [int(v) for v in args.videos.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"lvd bench scale: --videos takes numbers separated by commas, got {args.videos!r}")
    if not sizes or min(sizes) < 1:
        raise SystemExit("lvd bench scale: --videos needs at least one positive number, e.g. 10000,100000")
    _make_work_dir(args.work_dir)
    run_bench(sizes, args.json, args.work_dir)
    return 0


def run_stages(args: argparse.Namespace) -> int:
    import sys

    from curation.bench.stages import bench_stages, load_config, parse_batch_sizes, parse_list

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lvd-bench-tiny-") as tmp:
        if args.tiny:
            say("building tiny random-weight stand-ins...")
        config = load_config(args.recipe, args.overrides, tiny_root=tmp if args.tiny else None)
        result = bench_stages(config, stages=parse_list(args.stages, "--stages"), clips=args.clips,
                              batch_sizes=parse_batch_sizes(args.batch_sizes),
                              devices=parse_list(args.device, "--device"), threads=args.threads, progress=say)
    print("\n".join(result.lines()))
    return 0


def run_loader(args: argparse.Namespace) -> int:
    from shards.bench.loader import run_bench

    return run_bench(args)


def _make_work_dir(work_dir: str | None) -> None:
    """--work-dir is created when missing (a temporary folder is made inside it)."""
    if work_dir:
        from pathlib import Path

        Path(work_dir).mkdir(parents=True, exist_ok=True)
