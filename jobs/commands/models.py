"""`lvd models`: the model weights each recipe needs, and whether this machine has them.

Weights come from a local path or the Hugging Face cache; runs never download. On a machine with network,
`--download` fetches the Hugging Face ones into the cache (copy the cache to machines without network).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

EPILOG = """examples:
  lvd models recipes/curation/default.yaml
  lvd models recipes/curation/*.yaml recipes/train/stage3_hq.yaml
  lvd models recipes/curation/default.yaml --download       # needs network; fills the Hugging Face cache

exit status: 0 when everything is present, 1 when something is missing."""


INDENT = " " * 18
WIDTH = 100  # long sources and notes wrap under the role instead of running off the terminal


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model weights recipes need and whether they are present",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+", help="curation or training recipes (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting in every recipe, e.g. --set clip.checkpoint=/models/clip")
    p.add_argument("--download", action="store_true",
                   help="fetch missing hf-hub: checkpoints into the Hugging Face cache (needs network)")
    p.set_defaults(run=run)


def recipe_checkpoints(recipe: str, overrides: list[str]):
    """(kind, specs) of a curation or training recipe; training lists init_from and the text tower."""
    from common.checkpoints import CheckpointSpec
    from common.config import ConfigError, load_recipe
    from curation.config import CurationConfig
    from curation.pipeline import model_checkpoints
    from training.stage_config import TrainConfig

    errors = []
    for kind, cls in (("curation", CurationConfig), ("train", TrainConfig)):
        try:
            config = load_recipe(cls, recipe, overrides)
        except ConfigError as e:
            errors.append(f"as a {kind} recipe: {e}")
            continue
        if kind == "curation":
            return kind, model_checkpoints(config)
        specs = []
        if config.init_from:
            specs.append(CheckpointSpec("init_from", config.init_from,
                                        note="weights to start from (an earlier stage's output appears when it ends)"))
        if config.model.text.pretrained:
            specs.append(CheckpointSpec("model.text.pretrained", config.model.text.pretrained,
                                        note="OpenCLIP text tower weights"))
        return kind, specs
    raise ConfigError(f"{recipe} is neither a valid curation nor training recipe:\n  " + "\n  ".join(errors))


def run(args: argparse.Namespace) -> int:
    from common.checkpoints import KNOWN_SIZES, MissingCheckpoint, download, is_hf, is_random_stand_in, resolve

    missing = 0
    for recipe in args.recipes:
        kind, specs = recipe_checkpoints(recipe, args.overrides)
        print(f"{recipe} ({kind} recipe): {len(specs)} checkpoint{'s' if len(specs) != 1 else ''}")
        for spec in specs:
            try:
                path = download(spec) if args.download and is_hf(spec.source) else resolve(spec)
                state = "random stand-in" if is_random_stand_in(Path(path)) else "present"
                where = f"-> {path}" if Path(path) != Path(spec.source).absolute() else ""
            except MissingCheckpoint as e:
                missing += 1
                state, where = "MISSING", e.problem
            except Exception as e:  # noqa: BLE001 - a failed download is reported per checkpoint
                missing += 1
                state, where = "MISSING", f"download failed: {type(e).__name__}: {e}"
            size = KNOWN_SIZES.get(spec.source)
            print(f"  {state:<15} {spec.role}" + (f" ({size})" if size and state == "MISSING" else ""))
            for text in (spec.source, spec.note, where):
                if text and text != spec.role:
                    print(textwrap.fill(text, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT + "  ",
                                        break_on_hyphens=False))
    if missing:
        first = args.recipes[0] if len(args.recipes) == 1 else "RECIPE"
        print(f"{missing} checkpoint{'s' if missing != 1 else ''} missing: `lvd models {first} --download` "
              "fetches the hf-hub: ones (needs network)", file=sys.stderr)
    return 1 if missing else 0
