"""A cell's verdict as the test's outcome: the failure classes `xfail(raises=...)` can expect, and the rule
that the recorded outcome is the verdict's, whatever the test body does with `cell_run`."""

from __future__ import annotations

import pytest

from harness.judge.result import WorkerResult
from harness.judge.verdict import Verdict
from harness.matrix.cells import Cell


class CellFailure(AssertionError):
    """A cell failed; subclasses per category let `xfail(raises=...)` expect a specific failure."""

    category = "other"


_FAILURE_CLASSES: dict[str, type[CellFailure]] = {}


def failure_class(category: str) -> type[CellFailure]:
    if category not in _FAILURE_CLASSES:
        name = "".join(part.title() for part in category.split("-")) + "Failure"
        _FAILURE_CLASSES[category] = type(name, (CellFailure,), {"category": category})
    return _FAILURE_CLASSES[category]


class HarnessError(Exception):
    """The harness could not run the cell (bad input, a worker that would not start, a full disk)."""


class CellRun:
    """A cell, what the worker returned for it, and the verdict."""

    def __init__(self, cell: Cell, result: WorkerResult, verdict: Verdict, duration_s: float):
        self.cell, self.result, self.verdict, self.duration_s = cell, result, verdict, duration_s

    def failure_text(self) -> str:
        v = self.verdict
        tail = f"\n--- worker stderr (tail) ---\n{self.result.stderr_tail[-1500:]}" if self.result.stderr_tail else ""
        return f"[{v.category}] {v.message}\nremedy: {v.remedy}{tail}"

    def check(self) -> None:
        """Turn the verdict into the test's outcome."""
        if self.verdict.outcome == "skipped":
            pytest.skip(self.verdict.message)
        if self.verdict.outcome == "failed":
            raise failure_class(self.verdict.category)(self.failure_text())


def enforce(report, run: CellRun | None, item) -> None:
    """A test that took `cell_run` and ended without calling `.check()` on a failed or skipped verdict
    gets the verdict's outcome, so a suite cannot record a failed cell as passed. Runs after pytest's xfail
    handling: a failed verdict on an expected failure reads as xfailed, as `.check()` would have made it."""
    if run is None or report.when != "call" or run.verdict.outcome == "passed":
        return
    xpassed = hasattr(report, "wasxfail") and report.passed or "XPASS(strict)" in str(report.longrepr)
    if not (report.passed or xpassed):
        return  # the test failed or skipped on its own: nothing passed that should not have
    if run.verdict.outcome == "skipped":
        report.outcome, report.longrepr = "skipped", (str(item.path), item.location[1] or 0, run.verdict.message)
        return
    expected = item.get_closest_marker("xfail")
    raises = expected.kwargs.get("raises") if expected else None
    if expected and (raises is None or issubclass(failure_class(run.verdict.category), raises)):
        report.outcome, report.longrepr = "skipped", None
        report.wasxfail = expected.kwargs.get("reason", "")
        return
    report.outcome = "failed"
    report.longrepr = f"{run.failure_text()}\n(the test passed without calling cell_run.check(); the verdict decides)"
    if hasattr(report, "wasxfail"):
        del report.wasxfail


def outcome(report) -> str:
    """pytest's outcome in one word: passed, failed, error, skipped, xfailed, xpassed, xpassed-strict."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed and "XPASS(strict)" in str(report.longrepr):
        return "xpassed-strict"
    if report.when == "setup" and report.failed:
        return "error"
    return report.outcome
