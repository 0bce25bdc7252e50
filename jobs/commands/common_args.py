"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting, e.g. --set output=runs/x (repeatable; values are YAML)")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (e.g. ray://head:10001 or auto); "
                             "without it a local Ray starts and stops inside the run")
