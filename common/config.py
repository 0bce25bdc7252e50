"""Recipes: YAML files validated into typed configs, with `--set a.b=c` overrides.

Every config is a pydantic model that forbids unknown keys; a bad recipe fails before any work starts,
with a message that names the key, the bad value and how to fix it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

T = TypeVar("T", bound="Config")


class ConfigError(ValueError):
    """A recipe or an override that does not validate; the message names the key and the fix."""


class Config(pydantic.BaseModel):
    """Base of every lvd config: unknown keys are errors, values are checked on assignment too."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value); the value is parsed as YAML, so `x=3`, `x=[a, b]`, `x=null` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value; write e.g. --set motion.fps=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__}); quote it") from e
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `tree` with each `a.b=c` set; intermediate mappings are created when missing."""
    out = _deep_copy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section; set {where}=... instead")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass a YAML file such as recipes/curation/default.yaml")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings at the top level, got {type(tree).__name__}")
    return tree


def validate(model: type[T], tree: dict[str, Any], source: str = "recipe") -> T:
    """Validates `tree` into `model`, turning pydantic's report into one message per bad key."""
    try:
        return model.model_validate(tree)
    except pydantic.ValidationError as e:
        problems = [_describe(model, err) for err in e.errors()]
        raise ConfigError(f"{source} does not validate:\n  " + "\n  ".join(problems)) from None


# The recipe kinds and their commands, to tell a user who gave one to the wrong command (imported only then).
RECIPE_COMMANDS = {"curation.config:CurationConfig": ("lvd curate", "recipes/curation/cpu_fast.yaml"),
                   "training.stage_config:TrainConfig": ("lvd train", "recipes/train/tiny_stage1.yaml")}


def load_recipe(model: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    if path is not None:
        _check_kind(model, tree, path)
    return validate(model, tree, source=f"recipe {path}" if path else "config")


def _check_kind(model: type[pydantic.BaseModel], tree: dict[str, Any], path: str | Path) -> None:
    """One line when the recipe is another command's (most of its top-level keys unknown here, all of them
    known to that command's recipe), instead of one "unknown key" line per key."""
    unknown = [k for k in tree if k not in model.model_fields]
    if len(unknown) < 2 or len(unknown) * 2 < len(tree):
        return
    import importlib

    this = f"{model.__module__}:{model.__qualname__}"
    for target, (command, _) in RECIPE_COMMANDS.items():
        if target == this:
            continue
        module, name = target.split(":")
        other = getattr(importlib.import_module(module), name)
        if all(k in other.model_fields for k in tree):
            ours = RECIPE_COMMANDS.get(this, (None, None))
            also = f", or give this command a recipe such as {ours[1]}" if ours[1] else ""
            raise ConfigError(f"recipe {path} is for `{command}` (its keys {', '.join(unknown[:4])} are "
                              f"{command}'s settings); run `{command} {path}`{also}")


def _describe(model: type[pydantic.BaseModel], err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        fix = f"did you mean {'.'.join(loc[:-1] + [hint[0]])}?" if hint else f"valid keys here: {', '.join(valid)}"
        return f"{key}: unknown key; {fix}"
    msg = err["msg"]
    if msg.startswith("Value error, "):  # our own validators already say what to do
        msg = msg[len("Value error, ") :]
        return f"{key}: {msg}" if loc else msg
    return f"{key}: {msg} (got {err.get('input')!r})"


def _fields_at(model: type[pydantic.BaseModel], loc: list[str]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}).keys())
