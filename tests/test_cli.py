"""`resnet-hpo --help` answers without importing the heavy libraries its commands use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "search", "results", "best", "ensemble", "dashboard", "predict")
HEAVY = ("torch", "ray", "optuna")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_help_of_every_command_imports_neither_torch_nor_ray_nor_optuna() -> None:
    check = f"""
import sys
from search.cli import build_parser, main

commands = next(a for a in build_parser()._actions if a.dest == "command").choices
assert sorted(commands) == sorted({COMMANDS!r}), sorted(commands)
for argv in (["--help"], *([command, "--help"] for command in {COMMANDS!r})):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})), file=sys.stderr)
"""
    done = run_python(check)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]", done.stderr
    assert done.stdout.startswith("usage: resnet-hpo [-h]")  # the top level's first
    for command in COMMANDS:
        assert f"usage: resnet-hpo {command}" in done.stdout
