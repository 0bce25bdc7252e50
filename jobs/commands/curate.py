"""`lvd curate`: raw videos -> scored clips, a ledger with every score and drop reason, and a funnel."""

from __future__ import annotations

import argparse
import sys

from jobs.commands.common_args import add_ray_args, add_recipe_args

EPILOG = """examples:
  lvd curate recipes/curation/cpu_fast.yaml --set inputs=[videos/] --set output=runs/cur1   # any CPU, no weights
  lvd curate recipes/curation/default.yaml --set inputs=[videos/] --set output=runs/cur1    # GPUs + weights
  lvd curate recipes/curation/default.yaml --set output=runs/cur1 --rethreshold --set thresholds.motion_score.min=0.01
  lvd curate recipes/curation/default.yaml --address ray://head:10001 --set inputs=[s3://bucket/raw/]

Re-running the same command resumes: videos already in the ledger are skipped. Model weights come from
local paths or the Hugging Face cache and are checked before anything is decoded (`lvd models RECIPE`
lists them); `lvd report OUTPUT` turns the finished run into an HTML page."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="cut, score and filter raw videos into clips (Ray pipeline)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    add_ray_args(p)
    p.add_argument("--rethreshold", action="store_true",
                   help="only re-decide the existing ledger in the output folder with the recipe's thresholds "
                        "and dedup settings (decodes nothing; rewrites decisions/ only, keeps the run's "
                        "config.yaml and inputs, prints what changed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.config import load_recipe
    from common.runinfo import write_run_info
    from curation.config import CurationConfig
    from curation.inputs import check_paths
    from curation.ledger import Ledger
    from curation.pipeline import check_models, finalize, print_funnel, ray_session, run_curation

    config = load_recipe(CurationConfig, args.recipe, args.overrides)
    if args.rethreshold:
        ledger = Ledger(config.output)
        if not ledger.has_rows():
            print(f"lvd curate: no ledger in {config.output}; run without --rethreshold first", file=sys.stderr)
            return 2
        # the run's config.yaml and run.json stay as they were: the new rules go to decisions/_summary.json
        with ray_session(config, args.address, Path(config.output), args.verbose):
            summary = finalize(config, ledger)
        summary.num_done_before = summary.funnel[0]["count"]
    else:
        check_paths(config.inputs, config.output, config.inputs_missing, local=args.address is None)  # before writing
        found = check_models(config, args.recipe)  # before anything is written: a run that cannot start leaves no folder
        write_run_info(config.output, config, "curate", {"address": args.address})
        summary = run_curation(config, address=args.address, progress=not args.no_progress, verbose=args.verbose,
                               found=found)
    print_funnel(summary)
    return 0
