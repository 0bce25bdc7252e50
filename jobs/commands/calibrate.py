"""`lvd calibrate`: choose curation thresholds by experiment, as SVD did (App. E): train a small proxy model on
each filtered subset of the shards (drop the bottom or top 12.5 / 25 / 50 % by a score), a baseline on all of
them and a random-drop control of each size, evaluate every proxy on the same held-out clips, and suggest the
filters that beat both as a curation `thresholds:` block."""

from __future__ import annotations

import argparse

from jobs.commands.common_args import add_ray_args, add_recipe_args

EPILOG = """examples:
  lvd calibrate recipes/calibrate/tiny.yaml --set shards=demo-data/shards-all --set output=demo-data/calibrate
  lvd calibrate recipes/calibrate/svd.yaml --address auto        # arms in parallel, one Ray task each
  lvd calibrate RECIPE --address auto --set runner.num_workers=8  # each arm a Ray Train group of 8 ranks
  lvd submit --backend slurm --nodes 8 --gpus-per-node 8 -- calibrate recipes/calibrate/svd.yaml
  lvd calibrate RECIPE --set shards=null --set run=runs/cur1     # write the run's usable clips as shards first
  lvd calibrate RECIPE --max-arms 2                                # train two arms now, the rest later

Writes OUTPUT/results.md, results.csv, results.json (the table), thresholds.yaml (apply it with
`lvd curate RECIPE --set output=RUN --rethreshold --set thresholds.SCORE.drop_bottom_pct=P`), report.html
(plots and table), and per arm OUTPUT/arms/ARM/ (its subset, the proxy's run, done.json). Re-running the
same command retrains nothing finished and resumes an interrupted arm from its last checkpoint. The metric
is the held-out denoising loss (recipe keys clip / fvd add CLIP similarity and FVD, reported next to it);
tiny random-init proxies say nothing about real quality."""


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. --max-arms 2") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; use 0 (plan and report only) or more")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="rank curation filters by training proxy models on filtered subsets",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    add_ray_args(p)
    p.add_argument("--max-arms", type=_count, default=None, metavar="N",
                   help="train at most N unfinished arms in this invocation (default: all)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.config import load_recipe
    from common.runinfo import write_run_info
    from training.calibration import results, runner
    from training.calibration.config import CalibrateConfig

    config = load_recipe(CalibrateConfig, args.recipe, args.overrides)
    update = {"output": str(Path(config.output).resolve())}
    if config.shards is not None and "://" not in config.shards:
        update["shards"] = str(Path(config.shards).resolve())
    if config.run is not None:
        update["run"] = str(Path(config.run).resolve())
    if config.clip is not None and Path(config.clip.checkpoint).exists():  # arms may run in another folder (Ray)
        update["clip"] = config.clip.model_copy(update={"checkpoint": str(Path(config.clip.checkpoint).resolve())})
    if config.fvd is not None and Path(config.fvd.checkpoint).exists():
        update["fvd"] = config.fvd.model_copy(update={"checkpoint": str(Path(config.fvd.checkpoint).resolve())})
    config = config.model_copy(update=update)
    runner.check_address(config, args.address)

    def say(text: str) -> None:
        print(f"lvd calibrate: {text}", flush=True)

    if config.run is not None:
        runner.write_run_shards(config, say, address=args.address)
    arms, num_heldout = runner.prepare(config)  # every arm's recipe validates before anything trains
    write_run_info(config.output, config, "calibrate", {"address": args.address})
    say(f"{len(arms)} arms on {config.shard_folder}, {num_heldout} held-out clips, proxy {config.train}")
    for arm, _ in arms:
        say(f"  {arm.name:<32} {arm.num_samples:>7} clips  {arm.rule}")
    runner.run_arms(config, arms, say, address=args.address, max_arms=args.max_arms)
    paths = results.write_outputs(config, [a for a, _ in arms], num_heldout)
    for line in results.summary_lines(paths, paths["json"]):
        print(line, flush=True)
    return 0
