"""One rank of a training stage: the module every launcher starts.

    python -m training.run recipes/train/tiny_stage1.yaml --set output=runs/t1          # one process
    torchrun --nproc_per_node 2 -m training.run RECIPE --set ...                        # one node
    torchrun --nnodes 2 --node_rank R --master_addr HEAD --master_port 29500 \\
             --nproc_per_node 8 -m training.run RECIPE                                   # Slurm: one per node
    deepspeed --num_gpus 8 --module training.run RECIPE                                  # DeepSpeed launcher
    deepspeed --num_accelerators 2 --module training.run RECIPE                          # ... on CPU

Re-running the same command resumes from OUT/checkpoints/latest. Rank 0 writes the stage's data plan into
OUT/plan unless it is there already (`lvd train` writes it before starting the ranks); the other ranks wait
for it (data.plan_timeout_s) and read only their batches of it. Ray Train runs the same Trainer through
training/launch.py (`lvd train RECIPE --launcher ray`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from common.config import ConfigError, load_recipe

    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="stage recipe (recipes/train/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting (repeatable; values are YAML)")
    # The DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from common.verbosity import apply
    from training.stage_config import TrainConfig

    apply()  # the launching `lvd train -v/-q` passed its level in the environment

    try:
        config = load_recipe(TrainConfig, args.recipe, args.overrides)
    except ConfigError as e:
        print(f"training.run: {e}", file=sys.stderr)
        return 2
    from shards.loader import CorruptDataError
    from training.data import PlanError
    from training.loop import Trainer
    from training.weights_only import UnsafeCheckpoint

    try:
        Trainer(config).run()
    except UnsafeCheckpoint as e:
        print(f"training.run: {e}", file=sys.stderr)
        return 2
    except PlanError as e:  # the data settings or the plan folder: one line, not a traceback from every rank
        print(f"training.run: data.shards: {e}", file=sys.stderr)
        return 2
    except CorruptDataError as e:  # the data, not the code: one line saying what to do (the launcher stops the other ranks)
        print(f"training.run: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
