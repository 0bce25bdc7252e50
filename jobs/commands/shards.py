"""`lvd shards`: curation run -> WebDataset shards + manifest; verify, stats, subset queries.

`lvd train` reads what these commands write (stage recipes select a subset by query); the loader's
throughput benchmark is `lvd bench loader`."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

WRITE_EPILOG = """settings (--set KEY=VALUE, values are YAML):
  shard_max_bytes=1GB      target shard size (256MiB, 200KB, 1000000 ...)
  shard_max_samples=N      also close a shard after N samples (default: no limit)
  jpeg_quality=95          first/last frame jpgs
  frame_max_side=N         downscale the frame jpgs to this long side (default: clip resolution)
  workers=N                Ray CPUs: ledger files packed in parallel, one task each (default 1: in this
                           process; with RAY_ADDRESS set, the tasks run on that cluster)

examples:
  lvd shards write runs/cur1 shards/cur1
  lvd shards write runs/cur1 shards/cur1-all --all-usable --set shard_max_bytes=512MiB --set workers=8

One sample per kept clip: <clip_id>.mp4, .json (every ledger and decision column), .first.jpg, .last.jpg
(and .emb.safetensors for clips with embeddings). Each ledger file is a group packed by one task into
shard-GGGGGG-NNNNN.tar, video by video within the file. Shards are written under a temporary name and
renamed when complete; re-running the same command after an interruption resumes shard by shard and
produces the same shards."""

QUERY_EPILOG = """query syntax (no arithmetic; keywords in any case):
  COLUMN OP VALUE                 OP: < <= > >= == != =; VALUE: a column, a number, 'text', or a percentile
  COLUMN [not] between A and B    (inclusive)
  COLUMN [not] in ('a', 'b')
  COLUMN is [not] null
  a boolean column (keep, pass_motion_score), not, and, or, ( )
  percentile(COLUMN, Q) or its short form pct(COLUMN, Q): the Q-th percentile of the column over every
  sample of the manifest that has a value (as curation's drop_bottom_pct), not over the rows other
  conditions leave. A comparison with a missing value is false (`x is null` finds those samples).
e.g.
  aesthetic >= 5 and motion_score between 0.01 and 0.3 and text_area < 0.07
  keep and aesthetic >= pct(aesthetic, 20)               (SVD-style: drop the bottom 20%)
  video_id in ('a1b2', 'c3d4') or not pass_motion_score
  motion_bucket is not null

examples:
  lvd shards query shards/cur1 "aesthetic >= 5 and text_area < 0.07" --out stage3.parquet
  lvd shards query shards/cur1 "keep and motion_score > 0.02" --compact shards/stage3"""


PLAN_EPILOG = """examples:
  lvd shards plan shards/cur1 plans/stage2 --epochs 4 --set "query=keep and aesthetic >= pct(aesthetic, 20)" \\
      --set batch_size=8 --set num_frames=[14] --set "resolutions=[[320, 576], [576, 320]]"

A rank reads its batches with shards.plan_file.RankSlice(PLAN, rank, world_size) (or
ShardLoader(config, plan=PLAN)): one row group of an epoch file at a time, keeping only its own batches, so
its memory does not grow with the dataset. `lvd train` writes its stage's plan itself, into OUTPUT/plan."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write, verify, inspect and query WebDataset shards",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    w = which.add_parser("write", help="pack a curation run's clips into WebDataset shards with a manifest",
                         description="Packs the clips of a curation run (its ledger and clip files) into tar shards "
                                     "of about shard_max_bytes each, one Ray task per ledger file, and writes the "
                                     "manifest/ dataset (one parquet file per shard: sample -> shard, "
                                     "byte range, checksum, every score).",
                         epilog=WRITE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("run_dir", help="curation output folder (holds ledger/, decisions/ and clips/ of a decided "
                                   "`lvd curate` run)")
    w.add_argument("out_dir", help="folder to write the shards into (empty, or the same folder to resume)")
    w.add_argument("--all-usable", action="store_true",
                   help="write every clip with status ok, not only those the thresholds kept; the manifest carries "
                        "keep and pass_* so that each training stage selects by query (loaders then require a query)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="writer setting, e.g. --set shard_max_bytes=512MiB (repeatable; see below)")
    w.add_argument("--no-progress", action="store_true", help="no progress line")
    w.set_defaults(run=run_write)

    v = which.add_parser("verify", help="check every shard against the manifest's sizes, checksums and names",
                         description="Reads every shard and compares its size and sha256 with the manifest; a "
                                     "damaged shard is then checked sample by sample to name the damaged samples. "
                                     "Checks every key, shard and tar member name with the writer's rule (no '/', "
                                     "no '..', no absolute paths, no control characters, regular files only). "
                                     "Exit status 1 when anything is damaged, missing or refused.")
    v.add_argument("shards", help="shard folder or fsspec URL (holds manifest/ and shards.parquet)")
    v.add_argument("--quick", action="store_true", help="compare sizes only (finds truncation, not flipped bytes; "
                                                        "names from the manifest only, not the tar headers)")
    v.add_argument("--workers", type=int, default=4, help="shards hashed in parallel (default 4)")
    v.set_defaults(run=run_verify)

    s = which.add_parser("stats", help="sample counts, sizes and score distributions from the manifest",
                         description="Counts, sizes, resolutions, flags and the distribution of every score "
                                     "(min, p10, median, p90, max, mean), from the manifest alone (no tar reads).",
                         epilog='example:\n  lvd shards stats shards/cur1 --query "aesthetic >= 5"',
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("shards", help="shard folder or fsspec URL")
    s.add_argument("--query", default=None, help="only the samples this query selects")
    s.set_defaults(run=run_stats)

    q = which.add_parser("query", help="resolve a subset query to a sample list (optionally a compacted copy)",
                         description="Evaluates a query over the manifest and prints how many samples it selects. "
                                     "--out saves the key list for a loader (LoaderConfig.subset); --compact writes "
                                     "the selected samples into new shards (no re-encoding).",
                         epilog=QUERY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", help="shard folder or fsspec URL")
    q.add_argument("query", help="the subset, e.g. \"aesthetic >= 5 and text_area < 0.07\"")
    q.add_argument("--out", default=None, help="write the selected keys to this parquet file")
    q.add_argument("--compact", default=None, metavar="OUT_DIR", help="copy the selected samples into new shards here")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="writer setting for --compact, e.g. --set shard_max_bytes=256MiB")
    q.add_argument("--show", type=int, default=5, help="print this many selected keys (default 5)")
    q.set_defaults(run=run_query)

    pl = which.add_parser("plan", help="write a training stage's plan once: subset, buckets, per-epoch batch order",
                          description="Builds the loader's plan (subset, buckets, batches of each epoch) once and "
                                      "writes it as parquet; each training rank then reads only its own batches. "
                                      "Settings are the loader's (data.shards of a training recipe).",
                          epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("shards", help="shard folder or fsspec URL")
    pl.add_argument("out", help="folder to write the plan into (plan.json, subset.parquet, epoch-*.parquet)")
    pl.add_argument("--epochs", type=int, default=1, help="epochs to plan (default 1)")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="loader setting, e.g. --set query='aesthetic >= 5' --set batch_size=8 (repeatable)")
    pl.set_defaults(run=run_plan)


def _fail(args: argparse.Namespace, e: Exception) -> int:
    print(f"lvd shards {args.shards_command}: {e}", file=sys.stderr)
    return 2


def _writer_config(overrides: list[str], all_usable: bool = False):
    from common.config import apply_overrides, validate
    from shards.config import ShardWriteConfig

    tree = apply_overrides({}, overrides)
    if all_usable:
        tree["selection"] = "all_usable"
    return validate(ShardWriteConfig, tree, source="shard settings")


@contextmanager
def _ray_for(workers: int):
    """One write task per ledger file: on the Ray cluster at RAY_ADDRESS when set, else on a local Ray with
    `workers` CPUs (workers=1: in this process, no Ray)."""
    import os

    from common.local_ray import ray_connected

    address = os.environ.get("RAY_ADDRESS")
    if workers <= 1 and not address:
        yield
        return
    with ray_connected(address, num_cpus=workers):
        yield


def run_write(args: argparse.Namespace) -> int:
    from shards.writer import write_shards

    config = _writer_config(args.overrides, args.all_usable)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            print(f"\r{done}/{total} clips", end="" if done < total else "\n", file=sys.stderr, flush=True)
    try:
        with _ray_for(config.workers):
            summary = write_shards(args.run_dir, args.out_dir, config, progress)
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, e)
    print("\n".join(summary.lines()))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify

    try:
        report = verify(args.shards, workers=args.workers, quick=args.quick)
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, e)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def run_stats(args: argparse.Namespace) -> int:
    from shards.manifest import Manifest
    from shards.verify import stats

    try:
        manifest = Manifest.load(args.shards)
        rows = manifest.select(args.query) if args.query else None
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, e)
    print("\n".join(stats(manifest, rows)))
    return 0


def run_query(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from shards.manifest import Manifest, save_subset
    from shards.writer import rewrite_shards

    config = _writer_config(args.overrides) if args.compact else None
    try:
        manifest = Manifest.load(args.shards)
        rows = manifest.select(args.query)
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, e)
    n = manifest.num_samples
    size = pc.sum(manifest.take(rows, ["size_bytes"]).column("size_bytes")).as_py() or 0
    print(f"{len(rows)} of {n} samples ({len(rows) / max(n, 1):.1%}), {size / 1e9:.3f} GB")
    keys = manifest.take(rows[: args.show], ["key"]).column("key").to_pylist()
    if keys:
        print("  " + ", ".join(keys) + (", ..." if len(rows) > len(keys) else ""))
    if args.out:
        save_subset(manifest, rows, args.out, args.query)
        print(f"keys written to {args.out} (LoaderConfig.subset)")
    if args.compact:
        if len(rows) == 0:
            return _fail(args, ValueError("the query selects nothing; there is nothing to compact"))
        try:
            summary = rewrite_shards(manifest, rows, args.compact, config)
        except (ValueError, FileNotFoundError) as e:
            return _fail(args, e)
        print("\n".join(summary.lines()))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from common.config import apply_overrides, validate
    from shards.config import LoaderConfig
    from shards.manifest import Manifest
    from shards.plan_file import write_plan

    try:
        config = validate(LoaderConfig, apply_overrides({"shards": args.shards}, args.overrides), source="loader settings")
        summary = write_plan(Manifest.load(args.shards), config, args.out, args.epochs)
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, e)
    print("\n".join(summary.lines()))
    return 0
