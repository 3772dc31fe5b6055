"""Shared fixtures for the harness's own tests."""

import dataclasses
import os
import shutil
import sys
import textwrap
from pathlib import Path

import matplotlib.figure  # noqa: F401  (see below)
import pytest

# In-process pytester runs drop modules first imported inside them; numpy cannot be imported twice
# in one process, so the summary's plotting stack is imported once here, for the whole session.
pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vllm: runs the real vLLM (its CPU build, installed into the user's cache when absent)"
    )


@pytest.fixture(scope="session", autouse=True)
def checkpoint_cache(tmp_path_factory):
    """One checkpoint cache for the whole test session, fresh for each session (a clean clone's view)."""
    folder = tmp_path_factory.mktemp("qwen-compat-cache")
    old = os.environ.get("QWEN_COMPAT_CACHE")
    os.environ["QWEN_COMPAT_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("QWEN_COMPAT_CACHE", None)
    else:
        os.environ["QWEN_COMPAT_CACHE"] = old


@pytest.fixture(scope="session")
def suite_cmd():
    """The command that runs the default suite from `folder` in a fresh pytest process, plus `args`."""

    def command(folder: Path, *args: str) -> list[str]:
        shutil.copy(REPO / "suites" / "test_inference.py", folder / "test_suite.py")
        return [
            sys.executable,
            "-m",
            "pytest",
            str(folder / "test_suite.py"),
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(folder),
            *args,
        ]

    return command


@pytest.fixture
def tiny_cell():
    """A cell of a one-model matrix, expanded the real way, with some fields replaced."""
    from harness.matrix.cells import expand
    from harness.matrix.schema import Matrix

    def make(family: str = "qwen2_vl", **fields):
        matrix = Matrix.model_validate({"models": [{"tiny": family}], "defaults": {"max_new_tokens": 4}})
        return dataclasses.replace(expand(matrix, "m.yaml")[0], **fields)

    return make


@pytest.fixture
def matrix_file(pytester):
    """Write a matrix YAML into the pytester folder and return its path."""

    def write(text: str, name: str = "matrix.yaml") -> Path:
        path = pytester.path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def suite(pytester):
    """The default suite, copied into the pytester folder."""
    pytester.makepyfile(test_suite=(REPO / "suites" / "test_inference.py").read_text())
    pytester.makeini("[pytest]\n")  # pytest's default junit_family: the measurements must reach junit.xml as is
    return pytester


@pytest.fixture
def wait_for_cells():
    """Wait until a run in another process has written `count` cells to `results` (fails after `timeout_s`)."""
    import time

    from harness.report.results import load_results

    def wait(results: Path, count: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not (results.exists() and len(load_results(results)["cells"]) >= count):
            assert time.monotonic() < deadline, f"{results} did not reach {count} cells in {timeout_s:g} s"
            time.sleep(0.2)

    return wait
