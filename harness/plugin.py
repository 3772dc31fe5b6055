"""The pytest plugin: a matrix becomes parametrized `cell` tests; each runs in the isolated worker.

Options: --matrix, --device, --reports, --resume, --allow-faults, --emulate, --run-predicted-oom.
A suite is a plain pytest file whose test takes `cell` (the cell) or `cell_run` (the cell run in
the worker and judged); see suites/test_inference.py.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

import pytest

from . import cells as cells_mod
from . import matrix as matrix_mod
from .capabilities import disposition
from .cells import Cell
from .device import Host, resolve
from .errors import UserError
from .families import FAMILIES
from .gpus import table
from .progress import Progress
from .reports import CELL_FIELDS, ResultsFile, environment, latest_records, load_results
from .verdict import Verdict, judge
from .worker import Runner, WorkerResult

DEFAULT_MATRIX = "matrices/default.yaml"
REFERENCE_DIR = ".reference-logits"
RUN_KEY = pytest.StashKey["CellRun"]()
DTYPE_MARKERS = ["float32", "float16", "bfloat16"]


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
    """The harness could not run the cell (bad input, a worker that would not start)."""


class CellRun:
    """A cell, what the worker returned for it, and the verdict."""

    def __init__(self, cell: Cell, result: WorkerResult, verdict: Verdict, duration_s: float):
        self.cell, self.result, self.verdict, self.duration_s = cell, result, verdict, duration_s

    def check(self) -> None:
        """Turn the verdict into the test's outcome."""
        v = self.verdict
        if v.outcome == "skipped":
            pytest.skip(v.message)
        if v.outcome == "failed":
            tail = (
                f"\n--- worker stderr (tail) ---\n{self.result.stderr_tail[-1500:]}" if self.result.stderr_tail else ""
            )
            raise failure_class(v.category)(f"[{v.category}] {v.message}\nremedy: {v.remedy}{tail}")


def pytest_addoption(parser):
    group = parser.getgroup("qwen-compat", "qwen-compat hardware-compatibility matrix")
    group.addoption("--matrix", default=None, help=f"matrix YAML file (default: <rootdir>/{DEFAULT_MATRIX})")
    group.addoption("--device", default="auto", help="auto (NVML, then torch, else cpu) or a GPU table key")
    group.addoption("--reports", default="reports", help="reports folder; results go to <reports>/<device>/")
    group.addoption("--resume", action="store_true", help="skip cells already in <reports>/<device>/results.json")
    group.addoption("--allow-faults", action="store_true", help="honour the matrix's `faults:` section")
    group.addoption(
        "--emulate",
        default=None,
        metavar="KEY",
        help="emulate a GPU table card on this GPU: its memory size and capability rules",
    )
    group.addoption(
        "--gpu-per-worker",
        action="store_true",
        help="with pytest-xdist: xdist worker N drives GPU N (CUDA_VISIBLE_DEVICES=N)",
    )
    group.addoption(
        "--save-baseline",
        default=None,
        metavar="NAME",
        help="after the run, keep its results as baseline NAME under <reports>/baselines/",
    )
    group.addoption(
        "--run-predicted-oom", action="store_true", help="run cells the memory plan predicts to exceed the card"
    )


def pytest_configure(config):
    for key in table():
        config.addinivalue_line("markers", f"{key}: cells targeting the {table()[key].name}")
    for key in FAMILIES:
        config.addinivalue_line("markers", f"{key}: cells of the {key} model family")
    for dtype in DTYPE_MARKERS:
        config.addinivalue_line("markers", f"{dtype}: cells run in {dtype}")
    config.addinivalue_line("markers", "gpu: cells that target a GPU")
    config.addinivalue_line("markers", "slow: cells of true-size or downloaded models")
    config.addinivalue_line("markers", "xdist_group(name): cells sharing a loaded model (pytest-xdist)")
    session = CompatSession(config)
    config.pluginmanager.register(session, "qwen_compat_session")
    if session.active:
        try:
            session.prepare()
        except UserError as err:
            raise pytest.UsageError(str(err)) from None
        xdist_controller = getattr(config.option, "dist", "no") != "no" and not session.is_xdist_worker
        if not (config.option.collectonly or xdist_controller) and session.host.key in {
            c.device for c in session.prepare()
        }:
            session.start_worker()


class CompatSession:
    """Per-process state of a matrix run: host, cells, worker runner, results file."""

    def __init__(self, config):
        self.config = config
        # The default matrix belongs to the project (rootdir), wherever pytest is started from.
        self.matrix_path = config.getoption("matrix") or os.path.relpath(config.rootpath / DEFAULT_MATRIX)
        suites = Path(config.rootpath, "suites").resolve()
        self.active = bool(config.getoption("matrix")) or any(
            Path(a.split("::")[0]).resolve().is_relative_to(suites) for a in config.args
        )
        self.is_xdist_worker = hasattr(config, "workerinput")
        self._cells: list[Cell] | None = None
        self.host: Host | None = None
        self.runner: Runner | None = None
        self.results: ResultsFile | None = None
        self.done: dict[str, dict] = {}
        self.progress: Progress | None = None
        self.stats = {"cells": 0, "model_loads": 0, "worker_starts": 0}
        self.started = time.monotonic()

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self) -> list[Cell]:
        if self._cells is not None:
            return self._cells
        matrix = matrix_mod.load(self.matrix_path)
        if matrix.faults and not self.config.getoption("allow_faults"):
            raise UserError(
                "the matrix has a `faults:` section, which injects crashes and hangs on purpose.",
                file=self.matrix_path,
                key="faults",
                fix="pass --allow-faults to run it (harness self-tests), or remove the section.",
            )
        if self.is_xdist_worker and self.config.getoption("gpu_per_worker"):
            # Set before the host is detected; the pytest process itself never initialises CUDA.
            os.environ["CUDA_VISIBLE_DEVICES"] = self.config.workerinput["workerid"].removeprefix("gw")
        emulate = self.config.getoption("emulate")
        self.host = resolve(self.config.getoption("device"))
        if emulate:
            real = self.host
            if real.key == "cpu":
                raise UserError(
                    f"--emulate {emulate} caps a GPU's memory, and this host has no GPU.",
                    key="--emulate",
                    fix="run it on a GPU runner, or use --device KEY to plan and collect "
                    "that card's cells here (`qwen-compat plan` predicts their memory).",
                )
            from .emulation import check_fits

            check_fits(emulate, real.name, real.memory_mib)
            self.host = resolve(emulate)
            self.host.emulated_on = real.name
        self._cells = cells_mod.expand(matrix, self.matrix_path)
        self.reports_dir = Path(self.config.getoption("reports")) / self.host.key
        self.results = ResultsFile(self.reports_dir / "results.json")
        if self.config.getoption("resume") and self.results.path.exists():
            self.done = {
                k: v
                for k, v in latest_records(load_results(self.results.path)).items()
                if v["outcome"] not in ("error",)
            }
        if not (self.is_xdist_worker or self.config.option.collectonly):  # --collect-only keeps earlier reports
            if not self.config.getoption("xmlpath", None):
                self.reports_dir.mkdir(parents=True, exist_ok=True)
                self.config.option.xmlpath = str(self.reports_dir / "junit.xml")
            self.results.start(environment(self.host, self.matrix_path), resume=self.config.getoption("resume"))
            if not self.config.getoption("resume"):  # float32 references belong to the run that made them
                shutil.rmtree(self.reports_dir / REFERENCE_DIR, ignore_errors=True)
        return self._cells

    @staticmethod
    @functools.cache
    def _mark(name: str, *args, **kwargs):
        """Marks are shared between cells: a 10,000-cell matrix creates a few dozen, not 60,000."""
        return getattr(pytest.mark, name)(*args, **kwargs) if args or kwargs else getattr(pytest.mark, name)

    def marks(self, cell: Cell) -> list:
        mark = self._mark
        marks = [mark(cell.device), mark(cell.family), mark(cell.dtype), mark("xdist_group", cell.group)]
        if table()[cell.device].is_gpu:
            marks.append(mark("gpu"))
        if "tiny" not in cell.source:
            marks.append(mark("slow"))
        if cell.id in self.done:
            return marks + [mark("skip", reason="already done in an earlier run (--resume)")]
        expectation = disposition(cell, self.host.key)
        if expectation.source == "host":
            return marks + [mark("skip", reason=expectation.reason)]
        cell.expectation = expectation
        reason = f"[{'/'.join(expectation.categories) or 'expected'}] {expectation.reason}".strip()
        if expectation.outcome == "skip":
            marks.append(mark("skip", reason=reason))
        elif expectation.outcome == "xfail":
            raises = tuple(failure_class(c) for c in expectation.categories) or CellFailure
            marks.append(mark("xfail", reason=reason, strict=expectation.strict, raises=raises))
        return marks

    # -- running ----------------------------------------------------------------------------------
    def _runner(self) -> Runner:
        if self.runner is None:
            self.runner = Runner(
                self.reports_dir / REFERENCE_DIR,
                emulate=self.config.getoption("emulate"),
                run_predicted_oom=self.config.getoption("run_predicted_oom"),
            )
        return self.runner

    def start_worker(self) -> None:
        """Start the worker now: its ~5 s of torch imports overlap with pytest's start-up and collection."""
        self._runner().prestart()

    def run(self, cell: Cell) -> CellRun:
        start = time.perf_counter()
        try:
            result = self._runner().run(cell)
        except RuntimeError as exc:
            raise HarnessError(str(exc)) from None
        verdict = judge(cell, result)
        return CellRun(cell, result, verdict, time.perf_counter() - start)

    def record(self, cell: Cell, run: CellRun | None, report) -> dict:
        """The results.json line of a finished cell: its axes, pytest's outcome, the verdict, measurements."""
        outcome = _outcome(report)
        record = {field: getattr(cell, field) for field in CELL_FIELDS}
        if run is None:  # skipped or errored before the worker ran it
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
            category = (cell.expectation.categories or [None])[0] if outcome == "skipped" else "harness"
            record.update(
                outcome=outcome,
                category=category,
                message=reason.removeprefix("Skipped: ").strip(),
                remedy="",
                matched=None,
                duration_s=0.0,
                measurements={},
                prediction=None,
                model_loaded=False,
                worker_started=False,
                exit=None,
                stderr_tail="",
                output_text=None,
            )
        else:
            v, r = run.verdict, run.result
            record.update(
                outcome=outcome,
                category=v.category,
                message=v.message,
                remedy=v.remedy,
                matched=v.matched,
                duration_s=round(run.duration_s, 4),
                measurements=r.measurements,
                prediction=r.prediction or None,
                model_loaded=r.model_loaded,
                worker_started=r.worker_started,
                exit=(
                    {"returncode": r.returncode, "signal": r.signal_name, "load_timed_out": r.load_timed_out}
                    if r.died
                    else None
                ),
                stderr_tail=r.stderr_tail[-2000:] if r.died else "",
                output_text=r.generation.get("text"),
            )
        record["expectation"] = cell.expectation.__dict__
        return record

    # -- hooks --------------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        if "cell" not in metafunc.fixturenames:
            return
        try:
            cells = self.prepare()
        except UserError as err:
            pytest.exit(str(err), returncode=pytest.ExitCode.USAGE_ERROR)
        metafunc.parametrize("cell", [pytest.param(c, id=c.id, marks=self.marks(c)) for c in cells])

    def pytest_collection_modifyitems(self, items):
        cell_items = [i for i in items if isinstance(_cell_of(i), Cell)]
        if not cell_items:
            return
        ordered = {c.id: n for n, c in enumerate(cells_mod.run_order([_cell_of(i) for i in cell_items]))}
        others = [i for i in items if not isinstance(_cell_of(i), Cell)]
        items[:] = others + sorted(cell_items, key=lambda i: ordered[_cell_of(i).id])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        cell = _cell_of(item)
        finished = report.when == "call" or (report.when == "setup" and not report.passed)
        # Only this host's cells are reported: another card's cells belong to that card's runner.
        if isinstance(cell, Cell) and finished and cell.id not in self.done and cell.device == self.host.key:
            report.qwen_compat = self.record(cell, item.stash.get(RUN_KEY, None), report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report, config):
        """Without -v, the per-cell progress line replaces pytest's dot."""
        category, letter, word = yield
        if getattr(report, "qwen_compat", None) is not None and config.get_verbosity() <= 0:
            letter = ""
        return category, letter, word

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        record = getattr(report, "qwen_compat", None)
        if record is None or self.is_xdist_worker or self.results is None:
            return
        self.results.append(record)
        self.stats["cells"] += 1
        self.stats["model_loads"] += record["model_loaded"]
        self.stats["worker_starts"] += record["worker_started"]
        if self.progress is None:
            terminal = self.config.pluginmanager.get_plugin("terminalreporter")
            self.progress = Progress(
                lambda line: _write_progress(terminal, line), color=bool(terminal and terminal.hasmarkup)
            )
        self.progress.cell_done(record)

    def pytest_sessionfinish(self, session):
        if self.runner:
            self.runner.close()
        if self.is_xdist_worker or self.results is None or not self.stats["cells"]:
            return
        from .summary import write_summaries

        self.stats["wall_s"] = round(time.monotonic() - self.started, 2)
        write_summaries(self.reports_dir, self.stats)
        name = self.config.getoption("save_baseline")
        if name:
            from . import baselines

            root = Path(self.config.getoption("reports"))
            baselines.save(name, root, root / "baselines")

    def pytest_terminal_summary(self, terminalreporter):
        if self.results is None or self.is_xdist_worker or not self.stats["cells"]:
            return
        s = self.stats
        terminalreporter.write_sep("-", "qwen-compat")
        terminalreporter.write_line(
            f"{s['cells']} cells on {self.host.key}; model loads: {s['model_loads']}; "
            f"worker starts: {s['worker_starts']}"
        )
        terminalreporter.write_line(f"reports: {self.reports_dir}/results.json, junit.xml, summary.md, summary.html")


def _outcome(report) -> str:
    """pytest's outcome in one word: passed, failed, error, skipped, xfailed, xpassed, xpassed-strict."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed and "XPASS(strict)" in str(report.longrepr):
        return "xpassed-strict"
    if report.when == "setup" and report.failed:
        return "error"
    return report.outcome


def _write_progress(terminal, line: str) -> None:
    """A line of its own after pytest's: with -v below pytest's line for the cell; without -v in place of
    the dot, leaving pytest's notion of the current file alone so that it does not print it again."""
    if terminal is None:
        print(line)
    elif terminal.verbosity > 0:
        terminal.write("\n" + line)  # pytest starts its next line itself
    else:
        if terminal.currentfspath is not None and not getattr(terminal, "_qwen_compat_line", False):
            terminal.write("\n")  # end the "suites/test_inference.py " prefix once
        terminal.write(line + "\n")
        terminal._qwen_compat_line = True


def _cell_of(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("cell") if callspec else None


@pytest.fixture
def cell_run(request, cell, record_property) -> CellRun:
    """Run the cell in the isolated worker and judge it; measurements go to the JUnit report."""
    session: CompatSession = request.config.pluginmanager.get_plugin("qwen_compat_session")
    run = session.run(cell)
    request.node.stash[RUN_KEY] = run
    for key, value in run.result.measurements.items():
        record_property(key, value)
    record_property("category", run.verdict.category)
    if run.verdict.outcome == "error":
        raise HarnessError(run.verdict.message)
    return run
