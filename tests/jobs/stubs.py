"""Stand-ins for cluster tools (srun, scontrol, sbatch, kubectl, ...) that record the exact argument list
they were called with (and the RAY_AUTH* variables they were given, with the token file's mode and text), so
tests can check what a generated script or a backend really executes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STUB = r'''#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
stdin = sys.stdin.read() if "-" in args else ""  # `kubectl create -f -` reads the manifest from stdin
record = {{"cmd": [name, *args], "stdin": stdin,
          "env": {{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}}}
token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
if token_path and os.path.isfile(token_path):  # what a token file holds and who may read it, while in use
    with open(token_path) as t:
        record["token_file"] = {{"mode": oct(os.stat(token_path).st_mode & 0o777), "text": t.read()}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(record) + "\n")
answers = json.loads(os.environ.get("STUB_ANSWERS", "{{}}"))
key = " ".join([name, *args])
for prefix in sorted(answers, key=len, reverse=True):
    if key.startswith(prefix):
        out, code = answers[prefix]
        (sys.stdout if code == 0 else sys.stderr).write(out)
        sys.exit(code)
'''


def make_stubs(folder: Path, names: list[str]) -> Path:
    """Writes one recording stub per name into folder; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    return folder


def stub_env(folder: Path, log: Path, answers: dict[str, tuple[str, int]], path_tail: str = "/usr/bin:/bin") -> dict[str, str]:
    """Environment for running with the stubs first on PATH. answers: a prefix of "cmd arg ..." -> (text, exit
    code); the longest matching prefix answers (text on stdout, or on stderr when the code is not 0); other
    calls print nothing and succeed."""
    return {**os.environ, "PATH": f"{folder}:{path_tail}", "STUB_LOG": str(log), "STUB_ANSWERS": json.dumps(answers)}


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
