"""The pytest plugin: a matrix becomes parametrized `cell` tests; each runs in the isolated worker.

A suite is a plain pytest file whose test takes `cell` (the cell) or `cell_run` (the cell run in the
worker and judged); see suites/test_inference.py. The parts: `options` (flags, ini keys and
environment variables), `selection` (marks, this host's cells), `verdicts` (a verdict as the test's
outcome), `session` (one process's run: set-up, running, recording, the end).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UserError
from harness.models.families import FAMILIES
from harness.plugin import options, selection
from harness.plugin.session import RUN_KEY, CompatSession
from harness.plugin.verdicts import CellFailure, CellRun, HarnessError, failure_class

__all__ = ["CellFailure", "CellRun", "HarnessError", "failure_class", "cell_run"]


def pytest_addoption(parser):
    options.add(parser)


def _informational(config) -> bool:
    """Invocations that show something and run nothing."""
    option = config.option
    return bool(
        getattr(option, "help", False)
        or getattr(option, "version", False)
        or getattr(option, "markers", False)
        or getattr(option, "showfixtures", False)
        or getattr(option, "show_fixtures_per_test", False)
    )


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _value_taken_for_a_path(config) -> str | None:
    """pytest finds its rootdir and ini file before plugins' options are known, so in `--compat-matrix
    /abs/m.yaml` it takes the value for a test path: the project's ini is then not found (no testpaths:
    the harness's own tests get collected; no default matrix). The paragraph that says so, or None."""
    here = config.invocation_params.dir
    project = any(
        (d / "pytest.ini").exists() or "[tool.pytest" in _text(d / "pyproject.toml") for d in [here, *here.parents]
    )
    if config.inipath is not None or not project:
        return None
    words = list(config.invocation_params.args)
    takes_value = {f"--compat-{o.name}": o for o in options.OPTIONS if not o.flag}
    for flag, value in zip(words, words[1:], strict=False):
        if flag in takes_value and Path(value).is_absolute():
            return (
                f"pytest read '{value}' as a test path before qwen-compat could take it as the value of {flag}, "
                "so it did not find this project's pytest settings (testpaths, markers, the default matrix). "
                f"Fix: write {flag}={value} (with '='), or set it as an environment variable "
                f"({takes_value[flag].env}={value})."
            )
    return None


def pytest_configure(config):
    misread = _value_taken_for_a_path(config)
    if misread:
        raise pytest.UsageError(misread)
    selection.register(config, FAMILIES)
    session = CompatSession(config, informational=_informational(config))
    config.pluginmanager.register(session, "qwen_compat_session")
    if session.active and not session.informational:
        try:
            session.prepare()
        except UserError as err:
            raise pytest.UsageError(str(err)) from None
        session.configure_run()
        session.prestart_worker()


@pytest.fixture
def cell_run(request, cell) -> CellRun:
    """Run the cell in the isolated worker and judge it. With `compat_junit_properties`, measurements also
    go to pytest's own --junitxml as test-case properties (appended directly: pytest writes them under
    every junit_family, and `record_property` would warn under the default xunit2)."""
    session: CompatSession = request.config.pluginmanager.get_plugin("qwen_compat_session")
    run = session.run(cell)
    request.node.stash[RUN_KEY] = run
    if session.option("compat_junit_properties"):
        values = {**run.result.measurements, "category": run.verdict.category}
        request.node.user_properties += [(k, v) for k, v in values.items() if v is not None]
    if run.verdict.outcome == "error":
        raise HarnessError(run.verdict.message)
    return run
