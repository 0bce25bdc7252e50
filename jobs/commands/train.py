"""`lvd train`: one training stage from a recipe (recipes/train/*.yaml), with DeepSpeed, on one process, several
processes (torchrun or the DeepSpeed launcher), several nodes (torchrun per node, e.g. under Slurm), or a Ray
cluster (Ray Train). Re-running the same command resumes from the stage's last checkpoint."""

from __future__ import annotations

import argparse
import sys

from jobs.commands.common_args import add_ray_args, add_recipe_args

EPILOG = """examples:
  lvd train recipes/train/tiny_stage1.yaml --set data.shards.shards=demo-data/shards
  lvd train recipes/train/tiny_stage1.yaml --nproc 2                      # torchrun, 2 processes
  lvd train recipes/train/stage2_video.yaml --launcher deepspeed --nproc 8
  lvd train recipes/train/stage2_video.yaml --nproc 8 --nnodes 4 --node-rank $SLURM_NODEID \\
      --master-addr $HEAD_NODE --master-port 29500                        # one command per node (Slurm)
  lvd train recipes/train/stage3_hq.yaml --launcher ray --nproc 32 --address auto

The stage writes OUTPUT/checkpoints/, OUTPUT/model/ (diffusers format: `lvd sample --model OUTPUT`, or the
next stage's init_from), OUTPUT/metrics.jsonl, OUTPUT/tensorboard/, OUTPUT/samples/ and OUTPUT/summary.json;
with eval.query (or eval.subset) set, the held-out loss goes to OUTPUT/eval.jsonl and OUTPUT/eval.json."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one stage (DeepSpeed; local, torchrun, DeepSpeed launcher or Ray Train)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    add_ray_args(p)
    p.add_argument("--launcher", choices=("local", "torchrun", "deepspeed", "ray"), default=None,
                   help="local: this process (one rank); torchrun / deepspeed: that launcher starts --nproc ranks on "
                        "this node; ray: Ray Train workers (default: local for one process, else torchrun; ray when "
                        "--address is given)")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (torchrun / deepspeed), or Ray workers in all")
    p.add_argument("--nnodes", type=int, default=1, help="torchrun: nodes in the job (run the command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="torchrun: this node's index")
    p.add_argument("--master-addr", default="127.0.0.1", help="torchrun: the rendezvous host (node 0)")
    p.add_argument("--master-port", type=int, default=None, help="torchrun / deepspeed: the rendezvous port")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.config import load_recipe
    from training.stage_config import TrainConfig

    config = load_recipe(TrainConfig, args.recipe, args.overrides)  # fail on a bad recipe before any launch
    launcher = args.launcher or ("ray" if args.address else "local" if args.nproc == 1 and args.nnodes == 1
                                 else "torchrun")
    if args.nproc < 1:
        print("lvd train: --nproc must be at least 1", file=sys.stderr)
        return 2
    from training import launch

    # a cluster's ranks may see shards this machine does not; other nodes' ranks wait for node 0's plan
    if not args.address and args.node_rank == 0:
        launch.check_data(config, world_size=args.nproc * args.nnodes)
    if launcher == "local":
        if args.nproc != 1 or args.nnodes != 1:
            print("lvd train: --launcher local runs one process; use torchrun, deepspeed or ray for more", file=sys.stderr)
            return 2
        from shards.loader import CorruptDataError

        try:
            launch.run_local(config)
        except CorruptDataError as e:
            print(f"lvd train: {e}", file=sys.stderr)
            return 1
        return 0
    if launcher == "torchrun":
        rdzv = launch.Rendezvous(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        return launch.run_subprocess(launch.torchrun_command(args.recipe, args.overrides, args.nproc, rdzv))
    if launcher == "deepspeed":
        return launch.run_subprocess(launch.deepspeed_command(args.recipe, args.overrides, args.nproc, args.master_port))
    result = launch.run_ray(config, num_workers=args.nproc, address=args.address)
    if result.error is not None:
        print(f"lvd train: Ray Train run failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def register_bench(which: argparse._SubParsersAction) -> None:
    """`lvd bench train`, registered by jobs/commands/bench.py."""
    b = which.add_parser("train", help="training samples/s and data-wait share: real shards vs in-memory batches",
                         description="Runs the training loop (DeepSpeed, one rank, the tiny model) on shards of a fake "
                                     "curation run, streamed and decoded by the shard loader, and on synthetic batches "
                                     "already in memory, and prints samples/s and the share of step time spent "
                                     "waiting for data for each (goal: data wait < 2%).")
    b.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    b.add_argument("--warmup", type=int, default=5, help="first steps not counted (default 5)")
    b.add_argument("--batch-size", type=int, default=2, help="samples per batch (default 2)")
    b.add_argument("--frames", type=int, default=4, help="frames per clip (default 4)")
    b.add_argument("--size", default="32x48", help="HEIGHTxWIDTH of the training frames (default 32x48)")
    b.add_argument("--clips", type=int, default=24, help="clips in the fake shards (default 24)")
    b.add_argument("--workers", type=int, default=2, help="shard loader worker processes (default 2)")
    b.add_argument("--latents", action="store_true", help="also time shards with precomputed latents and text")
    b.add_argument("--shards", default=None, help="use these shards instead of fake ones (their clips must fit "
                                                  "--frames at 4 fps)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the benchmark's stage recipe, e.g. --set deepspeed.zero_stage=2")
    b.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from training.bench import run_bench as bench

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"lvd bench train: --size {args.size!r} is not HEIGHTxWIDTH, e.g. 32x48", file=sys.stderr)
        return 2
    lines = bench(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, num_frames=args.frames,
                  size=(h, w), clips=args.clips, workers=args.workers, latents=args.latents, shards=args.shards,
                  overrides=args.overrides)
    print("\n".join(lines))
    return 0
