import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[2]
# a file of the source tree or a module run with python -m: help pages name lvd commands instead
SOURCE_REF = re.compile(r"[\w/]+\.py\b|python -m ")


def _subcommand_paths(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_subcommand_paths(build_parser())], ids=lambda p: " ".join(p) or "lvd")
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lvd") and len(out) > 200
    # help points to lvd commands, never into the source tree
    assert not SOURCE_REF.findall(out), SOURCE_REF.findall(out)
    leaf = not any(p[:len(path)] == path and len(p) > len(path) for p in _subcommand_paths(build_parser()))
    if path and leaf:
        assert "-v, --verbose" in out and "-q, --quiet" in out


def test_version_names_the_package_version_and_revision(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"lvd {importlib.metadata.version('lvd')} (git ")


def test_verbosity_flags_set_the_level_subprocesses_inherit(monkeypatch, tmp_path, capsys):
    import logging

    from common import verbosity

    for name in (verbosity.ENV, "TQDM_DISABLE"):  # set, then removed: undone at teardown whatever main() sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    ds = logging.getLogger("DeepSpeed")
    for flags, level, warning_shown in (([], "normal", False), (["-v"], "verbose", True), (["-q"], "quiet", False)):
        main(["report", str(tmp_path / "none"), *flags])
        assert verbosity.level() == level
        record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU", None, None)
        assert ds.filter(record) == warning_shown
    capsys.readouterr()


def test_every_registered_command_is_listed():
    names = set(p[0] for p in _subcommand_paths(build_parser()) if len(p) == 1)
    assert names == set(COMMANDS)


def test_bad_recipe_value_fails_before_any_work_naming_key_and_fix(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "curate", str(REPO / "recipes/curation/default.yaml"),
         "--set", f"output={out}", "--set", "cuts.clip_min_s=20", "--set", "decode.short_sied=64"],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "decode.short_sied: unknown key; did you mean decode.short_side?" in proc.stderr
    assert "clip_min_s" in proc.stderr
    assert not out.exists()


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "lvd"
    assert exe.exists(), "the lvd console script is missing: pip install -e ."
