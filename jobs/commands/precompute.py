"""`lvd precompute`: shards -> the same shards with VAE latents and text-tower states added, encoded on Ray
tasks, so that training skips decoding and encoding (`lvd train` loads them by default: the stage
recipe's data.shards.latents is auto)."""

from __future__ import annotations

import argparse

from jobs.commands.common_args import add_ray_args

EPILOG = """settings (--set KEY=VALUE, values are YAML):
  query="keep"            which samples get latents (the others are copied unchanged)
  num_frames=14 fps=7      the frames encoded per clip (match the stage recipe's loader)
  resolutions=[[320,576]]  resolution buckets (as the stage's loader)
  text=true                also encode one caption per clip with the text tower
  workers=8 num_gpus=1     Ray tasks at a time (one per source shard) and GPUs per task (workers=0: in
                           this process); a re-run skips the shards already finished

example:
  lvd precompute shards/cur1 shards/cur1-latents --model runs/svd/stage1_image --set workers=8 --set num_gpus=1"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precompute", help="add VAE latents and text states to shards (Ray job)", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="source shard folder")
    p.add_argument("out_dir", help="new shard folder (samples + latents.safetensors + text.safetensors)")
    p.add_argument("--model", required=True, help="diffusers-format model folder whose VAE and text tower encode "
                                                  "(the stage's init_from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a precompute setting (repeatable; see below)")
    add_ray_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.config import apply_overrides, validate
    from training.precompute import PrecomputeConfig, precompute

    tree = apply_overrides({"shards": args.shards, "output": args.out_dir, "model": args.model}, args.overrides)
    config = validate(PrecomputeConfig, tree, source="precompute settings")
    summary = precompute(config, address=args.address)
    print("\n".join(summary.lines()))
    return 0
