"""The layers rule and the style rule, kept by the test suite so that CI fails on a new upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def test_imports_follow_the_layers_of_pyproject_toml():
    done = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_ruff_passes_over_the_tree():
    done = subprocess.run(
        [_tool("ruff"), "check", "harness", "tests", "benchmarks", "suites"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_only_the_top_level_modules_sit_directly_under_harness():
    top = {p.stem for p in (REPO / "harness").glob("*.py")}
    assert top == {"__init__", "errors", "secrets", "cli", "doctor", "smoke"}, top
