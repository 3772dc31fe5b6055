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


# What README command (1) runs: the plugin and the CLI in the pytest process, the worker and its in-process
# backend for the default matrix's cells.
COMMAND_1_MODULES = ["harness.plugin", "harness.cli", "harness.run.worker", "harness.run.backends.transformers"]


def _installed_by(extras: set[str]) -> set[str]:
    """The distributions `pip install -e '.[extras]'` brings: qwen-compat's requirements, transitively."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = set(), [("qwen-compat", extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            key = canonicalize_name(req.name)
            if key not in found or req.extras:
                found.add(key)
                todo.append((req.name, set(req.extras)))
    return found


def test_readme_command_1s_install_is_enough_for_a_default_run():
    """The base install with the torch extra must hold every third-party module a default run imports: a
    module of an optional extra (httpx of `serve`, imported by the server module at load) broke command 1."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    probe = (
        f"import sys; [__import__(m) for m in {COMMAND_1_MODULES!r}]; "
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    owners, installed = metadata.packages_distributions(), _installed_by({"torch"})
    missing = {
        top: owners[top]
        for top in done.stdout.split()
        if top in owners
        and top != "harness"  # a top-level name no distribution owns is the stdlib's
        and not any(canonicalize_name(dist) in installed for dist in owners[top])  # a namespace: any owner
    }
    assert not missing, f"imported by a default run, not installed by README command 1: {missing}"


def test_a_served_backend_without_its_extra_is_the_environments_gap_with_the_install_line():
    """Without the serve extra's httpx, an openai cell is bad input naming `pip install -e '.[serve]'`, not a
    model failure; a WebUI cell names the webui extra."""
    probe = """
import sys
sys.modules["httpx"] = None  # as on a base install: `import httpx` raises ModuleNotFoundError
from harness.errors import UserError
from harness.run.worker import _served_backend
for backend in ("openai", "gradio"):
    try:
        _served_backend(backend)
    except UserError as err:
        print(backend, "|", err)
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" | ", 1) for line in done.stdout.splitlines())
    assert "needs the Python package `httpx`" in lines["openai"] and "pip install -e '.[serve]'" in lines["openai"]
    assert "pip install -e '.[webui]'" in lines["gradio"], done.stdout + done.stderr[-2000:]
