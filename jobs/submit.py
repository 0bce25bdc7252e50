"""Backend-agnostic submission: parse the wrapped `lvd ...` command with lvd's own parser, validate its recipe
here (a bad recipe must fail on the laptop, not an hour later in a cluster queue), then hand a JobSpec to a
backend and keep a record of what was sent.

Each submittable command says how it spreads over nodes (`launch`):
  ray     a Ray pipeline (curate, precompute, calibrate): on Slurm a Ray cluster is started inside the allocation and the
          command gets --address; on a Ray cluster or in a RayJob it joins the cluster the job runs on
          (--address auto).
  torch   distributed training (train): on Slurm, srun starts torchrun (or the DeepSpeed launcher) on every
          node with the rendezvous taken from the allocation. On a Ray cluster or in a RayJob the command is the
          job's driver as written (`train RECIPE --launcher ray --nproc N --address auto` uses Ray Train).
  single  one process (sample, shards, bench): runs once, on the first node (Slurm) or as the driver.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import re
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from common.config import ConfigError

Launch = Literal["ray", "torch", "single"]

# What a validator returns: (recipe path as written on the command line, validated config, output location).
Validated = tuple[str | None, Any, str | None]


def _config_class(path: str) -> type:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"the recipe class {path} is not available in this checkout ({e}); "
                          "update lvd on the machine you submit from") from None


def _recipe_command(config_path: str) -> Callable[[Any], Validated]:
    """A command of the form `lvd CMD RECIPE [--set k=v ...]` whose recipe has an `output` folder."""

    def validate(args) -> Validated:
        from common.config import load_recipe

        if not hasattr(args, "recipe"):
            raise ConfigError(f"lvd {args.command} has no recipe argument to validate; "
                              "its entry in jobs/submit.py SUBMITTABLE needs updating")
        config = load_recipe(_config_class(config_path), args.recipe, getattr(args, "overrides", []))
        return args.recipe, config, getattr(config, "output", None)

    return validate


def _validate_sample(args) -> Validated:
    """The config `lvd sample` itself would build."""
    from jobs.commands.sample import sample_config

    if (args.model is None) == (not args.random_init):
        raise ConfigError("lvd sample needs exactly one of --model DIR or --random-init")
    return args.recipe, sample_config(args), str(args.out)


def _validate_precompute(args) -> Validated:
    """Mirrors `lvd precompute`: its settings are the positional folders, --model and --set."""
    from common.config import apply_overrides, validate

    tree = apply_overrides({"shards": args.shards, "output": args.out_dir, "model": args.model}, args.overrides)
    config = validate(_config_class("training.precompute:PrecomputeConfig"), tree, source="precompute settings")
    return None, config, str(args.out_dir)


def _no_recipe(output_attr: str | None = None) -> Callable[[Any], Validated]:
    def validate(args) -> Validated:
        out = getattr(args, output_attr, None) if output_attr else None
        return None, None, str(out) if out is not None else None

    return validate


@dataclass(frozen=True)
class Submittable:
    launch: Launch
    validate: Callable[[Any], Validated]


SUBMITTABLE: dict[str, Submittable] = {
    "curate": Submittable("ray", _recipe_command("curation.config:CurationConfig")),
    "train": Submittable("torch", _recipe_command("training.stage_config:TrainConfig")),
    "calibrate": Submittable("ray", _recipe_command("training.calibration.config:CalibrateConfig")),
    "sample": Submittable("single", _validate_sample),
    "precompute": Submittable("ray", _validate_precompute),
    "shards": Submittable("single", _no_recipe("out_dir")),
    "bench": Submittable("single", _no_recipe()),
}

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 47  # a RayJob's name becomes part of pod and service names (63 characters at most)


@dataclass(frozen=True)
class JobSpec:
    """A validated lvd command, ready for any backend."""

    name: str                    # lvd-curate-20260101-120000-ab12: the job's name on every backend
    argv: tuple[str, ...]        # the lvd command line after `lvd`, exactly as given
    command: str                 # argv[0]
    launch: Launch
    cwd: Path                    # where the command's relative paths resolve
    recipe: str | None = None    # the recipe argument as written in argv (None: the command's default)
    config: Any = None           # the validated recipe
    output: str | None = None    # where the command writes, as written
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the job

    @property
    def recipe_path(self) -> Path | None:
        return (self.cwd / self.recipe).resolve() if self.recipe else None

    @property
    def output_path(self) -> str | None:
        """Absolute output location (URLs such as s3://... are kept as they are)."""
        if self.output is None or "://" in self.output:
            return self.output
        return str((self.cwd / self.output).resolve())

    def output_is_relative(self) -> bool:
        return self.output is not None and "://" not in self.output and not Path(self.output).is_absolute()

    def has_option(self, option: str) -> bool:
        return any(a == option or a.startswith(option + "=") for a in self.argv)

    def lvd_argv(self, *extra: str) -> list[str]:
        return ["lvd", *self.argv, *extra]

    def display(self) -> str:
        """The command on one line, for comments in scripts and manifests: a newline inside a value would
        otherwise end the comment and turn the rest of the value into code."""
        return self.entrypoint().encode("unicode_escape").decode("ascii")

    def entrypoint(self, *extra: str) -> str:
        """The command as one shell-quoted string, for APIs that take a string (Ray Jobs, RayJob)."""
        return shlex.join(self.lvd_argv(*extra))

    def with_recipe(self, new_recipe: str) -> tuple[str, ...]:
        """argv with the recipe argument replaced (for a backend that ships the recipe elsewhere)."""
        assert self.recipe is not None
        argv = list(self.argv)
        for i, a in enumerate(argv):
            if a == self.recipe:
                argv[i] = new_recipe
                return tuple(argv)
            if a == f"--recipe={self.recipe}":
                argv[i] = f"--recipe={new_recipe}"
                return tuple(argv)
        raise AssertionError(f"recipe {self.recipe!r} not found in {argv}")


def job_name(command: str, given: str | None = None) -> str:
    if given is not None:
        if len(given) > MAX_NAME or not _NAME.fullmatch(given):
            raise ConfigError(f"job name {given!r} must be at most {MAX_NAME} lowercase letters, digits and '-', "
                              "starting and ending with a letter or digit; e.g. --name cur-run1")
        return given
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"lvd-{command}-{stamp}-{secrets.token_hex(2)}"


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise ConfigError(f"--env {item!r} is not KEY=VALUE with KEY a shell variable name; "
                              "write e.g. --env HF_HUB_OFFLINE=1")
        env[key] = value
    return env


def prepare(argv: list[str], name: str | None = None, env: dict[str, str] | None = None) -> JobSpec:
    """Parses and validates `lvd ARGV` as the cluster will run it, from the current directory (where the job
    will start too); raises ConfigError when it would fail there."""
    from jobs.cli import build_parser

    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("nothing to submit: give the lvd command after --, e.g. "
                          "lvd submit --backend ray --address http://HEAD:8265 -- curate recipe.yaml")
    if argv[0] == "lvd":  # `-- lvd curate ...` reads naturally; accept it
        argv = argv[1:]
    command = argv[0] if argv else ""
    if command not in SUBMITTABLE:
        raise ConfigError(f"lvd {command} cannot be submitted; submittable commands: {', '.join(SUBMITTABLE)}")
    parser = build_parser()
    known = {c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices}
    if command not in known:
        raise ConfigError(f"lvd {command} is not a command of this lvd checkout; update lvd")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # `-- curate --help`: the help was printed; nothing to submit
            raise
        raise ConfigError(f"`lvd {shlex.join(argv)}` does not parse (see above); nothing was submitted") from None
    recipe, config, output = SUBMITTABLE[command].validate(args)
    return JobSpec(name=job_name(command, name), argv=tuple(argv), command=command,
                   launch=SUBMITTABLE[command].launch, cwd=Path.cwd(), recipe=recipe, config=config, output=output,
                   env=dict(env or {}))
