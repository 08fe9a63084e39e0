"""README.md: every `qtool ...` command in a fenced block runs as written, in order, from a
copy of the repository's root, and exits 0 (or the code its comment names: `# exit 3`).
A new user reads the README top to bottom; nothing in it may name a file that does not
exist or a flag that does not work (issue 14)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_commands(text: str) -> list[tuple[str, list[str], int]]:
    """(line as written, argv, expected exit code) for each `qtool ` line of a ``` block,
    with backslash continuations joined and `# ...` comments dropped."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line.startswith("qtool "):
                continue
            code = 0
            if "#" in line:
                m = re.search(r"#.*\bexits? (\d+)", line)
                code = int(m.group(1)) if m else 0
            commands.append((line, shlex.split(line, comments=True), code))
    return commands


def test_the_readme_has_runnable_examples():
    commands = readme_commands(README.read_text())
    verbs = {argv[1] for _, argv, _ in commands}
    assert {"inspect", "calibrate", "merge-tables", "convert", "eval", "tune"} <= verbs
    assert sum(argv[1] == "convert" for _, argv, _ in commands) >= 6


def test_the_readme_says_how_to_put_qtool_on_path():
    text = README.read_text()
    assert "source .venv/bin/activate" in text
    assert ".venv/bin/qtool" in text


def test_the_readme_shows_no_placeholder_files():
    """Every path-like argument of an example exists in the repository or is written by an
    earlier example."""
    written: set[str] = set()
    for line, argv, _ in readme_commands(README.read_text()):
        args = argv[2:]
        for i, arg in enumerate(args):
            pathlike = re.search(r"\.(onnx|json|toml)$", arg) or ("/" in arg and not re.fullmatch(r"\d+/\d+", arg))
            if arg.startswith("-") or not pathlike:
                continue
            if i > 0 and args[i - 1] in ("-o", "--output", "--json", "--markdown", "--plot"):
                written.add(arg)
                continue
            assert (ROOT / arg).exists() or arg in written or _written_by_tune(arg, written), line


def _written_by_tune(arg: str, written: set[str]) -> bool:
    # tune writes OUT.recipe.toml and OUT.calib.json beside OUT
    stem = re.sub(r"\.(recipe\.toml|calib\.json|frontier\.md)$", ".onnx", arg)
    return stem in written


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of what the examples read (the bundled model, its data, the presets), so their
    outputs land in a temporary folder and the checkout stays clean."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("out", "*.py"))
    shutil.copytree(ROOT / "configs", work / "configs")
    return work


def test_every_readme_command_runs_as_written(workdir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(workdir / ".cache"))
    failures = []
    for line, argv, expected in readme_commands(README.read_text()):
        result = subprocess.run([sys.executable, "-m", "qtool", *argv[1:]], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=600)
        if result.returncode != expected:
            failures.append(f"{line}\n  exit {result.returncode} (expected {expected})\n"
                            + "\n".join("  " + ln for ln in result.stderr.strip().splitlines()[-4:]))
    assert not failures, "\n".join(failures)
