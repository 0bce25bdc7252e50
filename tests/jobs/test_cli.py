import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[2]


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
