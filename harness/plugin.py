"""The pytest plugin: a matrix becomes parametrized `cell` tests; each runs in the isolated worker.

Options share one prefix, as pytest-benchmark's do: --compat-matrix, --compat-device,
--compat-reports, --compat-resume, --compat-allow-faults, --compat-emulate, --compat-gpu-per-worker,
--compat-save-baseline, --compat-run-predicted-oom. A suite is a plain pytest file whose test takes
`cell` (the cell) or `cell_run` (the cell run in the worker and judged); see suites/test_inference.py.

Nothing but a real run touches the reports or starts a worker: `--help`, `--markers`,
`--collect-only` or a `-k` that selects nothing leave `reports/` as it was.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness.devices.host import Host, resolve
from harness.errors import ReportWriteError, UserError
from harness.judge.result import WorkerResult
from harness.judge.verdict import Verdict, judge
from harness.matrix import cells as cells_mod
from harness.matrix import schema as matrix_mod
from harness.matrix.cells import Cell
from harness.matrix.gpus import table
from harness.models.families import FAMILIES
from harness.report.lock import RunLock
from harness.report.progress import Progress
from harness.report.results import (
    CELL_FIELDS,
    ResultsFile,
    changed_since_recorded,
    environment,
    latest_records,
    load_results,
    write_report,
)
from harness.run.disposition import disposition
from harness.run.runner import Runner

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
    """The harness could not run the cell (bad input, a worker that would not start, a full disk)."""


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
    group.addoption("--compat-matrix", default=None, help=f"matrix YAML file (default: <rootdir>/{DEFAULT_MATRIX})")
    group.addoption("--compat-device", default="auto", help="auto (NVML, then torch, else cpu) or a GPU table key")
    group.addoption("--compat-reports", default="reports", help="reports folder; results go to <reports>/<device>/")
    group.addoption(
        "--compat-resume",
        action="store_true",
        help="skip cells already in <reports>/<device>/results.json whose definition is unchanged",
    )
    group.addoption("--compat-allow-faults", action="store_true", help="honour the matrix's `faults:` section")
    group.addoption(
        "--compat-emulate",
        default=None,
        metavar="KEY",
        help="emulate a GPU table card on this GPU: its memory size and capability rules",
    )
    group.addoption(
        "--compat-gpu-per-worker",
        action="store_true",
        help="with pytest-xdist: each worker drives its own GPU of those CUDA_VISIBLE_DEVICES gives the job",
    )
    group.addoption(
        "--compat-save-baseline",
        default=None,
        metavar="NAME",
        help="after the run, keep its results as baseline NAME under <reports>/baselines/",
    )
    group.addoption(
        "--compat-run-predicted-oom",
        action="store_true",
        help="run cells the memory plan predicts to exceed the card",
    )


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


def pytest_configure(config):
    for key in table():
        config.addinivalue_line("markers", f"{key}: cells targeting the {table()[key].name}")
    for key in FAMILIES:
        config.addinivalue_line("markers", f"{key}: cells of the {key} model family")
    for dtype in DTYPE_MARKERS:
        config.addinivalue_line("markers", f"{dtype}: cells run in {dtype}")
    config.addinivalue_line("markers", "gpu: cells that target a GPU")
    config.addinivalue_line("markers", "slow: cells of true-size or downloaded models")
    config.addinivalue_line("markers", "placement: cells whose model is placed by device_map (not `single`)")
    config.addinivalue_line("markers", "xdist_group(name): cells sharing a loaded model (pytest-xdist)")
    session = CompatSession(config)
    config.pluginmanager.register(session, "qwen_compat_session")
    if session.active and not _informational(config):
        try:
            session.prepare()
        except UserError as err:
            raise pytest.UsageError(str(err)) from None
        session.configure_run()


class CompatSession:
    """Per-process state of a matrix run: host, cells, worker runner, results file."""

    def __init__(self, config):
        self.config = config
        # The default matrix belongs to the project (rootdir), wherever pytest is started from.
        self.matrix_path = config.getoption("compat_matrix") or os.path.relpath(config.rootpath / DEFAULT_MATRIX)
        suites = Path(config.rootpath, "suites").resolve()
        self.active = bool(config.getoption("compat_matrix")) or any(
            Path(a.split("::")[0]).resolve().is_relative_to(suites) for a in config.args
        )
        self.is_xdist_worker = hasattr(config, "workerinput")
        self.is_xdist_controller = getattr(config.option, "dist", "no") != "no" and not self.is_xdist_worker
        self._cells: list[Cell] | None = None
        self.host: Host | None = None
        self.runner: Runner | None = None
        self.results: ResultsFile | None = None
        self.lock: RunLock | None = None
        self.began = False  # the run has written its results file: it is a real run
        self.done: dict[str, dict] = {}
        self.recorded: dict[str, dict] = {}  # this run's finished cells, by id
        self.progress: Progress | None = None
        self.planned: list[Cell] = []
        self.junit_tmp: Path | None = None
        self.problems: list[str] = []  # writing failures: said at the end, and the exit status is not 0
        self.notes: list[str] = []
        self.session = None
        self._previous_sigterm = None
        self.stats = {"cells": 0, "model_loads": 0, "worker_starts": 0}
        self.started = time.monotonic()

    # -- set-up (no side effects: nothing is written, nothing is started) -------------------------
    def prepare(self) -> list[Cell]:
        if self._cells is not None:
            return self._cells
        option = self.config.getoption
        matrix = matrix_mod.load(self.matrix_path)
        if matrix.faults and not option("compat_allow_faults"):
            raise UserError(
                "the matrix has a `faults:` section, which injects crashes and hangs on purpose.",
                file=self.matrix_path,
                key="faults",
                fix="pass --compat-allow-faults to run it (harness self-tests), or remove the section.",
            )
        if option("compat_save_baseline"):
            from harness.report.baselines import check_name

            check_name(option("compat_save_baseline"))
        if option("compat_gpu_per_worker"):
            self._assign_gpu()
        emulate = option("compat_emulate")
        self.host = resolve(option("compat_device"))
        if emulate:
            real = self.host
            if real.key == "cpu":
                raise UserError(
                    f"--compat-emulate {emulate} caps a GPU's memory, and this host has no GPU.",
                    key="--compat-emulate",
                    fix="run it on a GPU runner, or use --compat-device KEY to plan and collect "
                    "that card's cells here (`qwen-compat plan` predicts their memory).",
                )
            from harness.devices.emulation import check_fits

            check_fits(emulate, real.name, real.memory_mib)
            self.host = resolve(emulate, "--compat-emulate")
            self.host.emulated_on = real.name
        self._cells = cells_mod.expand(matrix, self.matrix_path)
        self.reports_dir = Path(option("compat_reports")) / self.host.key
        self.results = ResultsFile(self.reports_dir / "results.json")
        if option("compat_resume") and self.results.path.exists():
            recorded = latest_records(load_results(self.results.path))
            # Errored cells run again anyway (a fixed input is how they are mended): only the cells
            # resume would keep must still be what the matrix asks for.
            self.done = {k: v for k, v in recorded.items() if v["outcome"] != "error"}
            changed = changed_since_recorded(self.done, self._cells)
            if changed:
                shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
                raise UserError(
                    f"--compat-resume: {len(changed)} recorded cells changed since they ran: {shown}. Their "
                    "records would not describe what the matrix now asks for.",
                    file=str(self.results.path),
                    key="--compat-resume",
                    fix="run without --compat-resume to start the folder over, or restore the matrix as it was.",
                )
        return self._cells

    def configure_run(self) -> None:
        """What a run needs from the start: JUnit written beside the results (kept only for a real
        run), and SIGTERM handled as Ctrl-C so that a cancelled CI job still leaves its reports."""
        if self.is_xdist_worker or self.config.option.collectonly:
            return
        if not self.config.getoption("xmlpath", None):
            self.junit_tmp = Path(tempfile.mkdtemp(prefix="qwen-compat-junit-")) / "junit.xml"
            self.config.option.xmlpath = str(self.junit_tmp)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    def _lock_folder(self) -> None:
        if self.lock is None:
            self.lock = RunLock(self.reports_dir)
            try:
                self.lock.acquire()
            except UserError as err:
                self.lock = None
                pytest.exit(str(err), returncode=pytest.ExitCode.USAGE_ERROR)

    def _begin(self) -> None:
        """The first moment of a real run: take the folder, start (or repair) the results file."""
        if self.began:
            return
        self._lock_folder()
        resume = self.config.getoption("compat_resume")
        try:
            note = self.results.start(environment(self.host, self.matrix_path), resume=resume)
        except ReportWriteError as err:
            pytest.exit(str(err), returncode=pytest.ExitCode.INTERRUPTED)
        if note:
            self.notes.append(note)
        if not resume:  # float32 references belong to the run that made them
            shutil.rmtree(self.reports_dir / REFERENCE_DIR, ignore_errors=True)
        self.began = True

    def _assign_gpu(self) -> None:
        """--compat-gpu-per-worker: each xdist worker drives its own entry of what CUDA_VISIBLE_DEVICES gave the
        job. Set before the host is detected (the pytest process never initialises CUDA); the controller checks
        once that there are enough GPUs, so a short job fails with one paragraph before any worker starts."""
        from harness.devices import nvml
        from harness.devices.visible import worker_value

        current, found = os.environ.get("CUDA_VISIBLE_DEVICES"), nvml.load()
        if self.is_xdist_worker:
            worker = self.config.workerinput
            os.environ["CUDA_VISIBLE_DEVICES"] = worker_value(current, worker["workerid"], worker["workercount"], found)
        elif getattr(self.config.option, "dist", "no") != "no":
            worker_value(current, "gw0", len(self.config.option.tx), found)

    @staticmethod
    @functools.cache
    def _mark(name: str, *args, **kwargs):
        """Marks are shared between cells: a 10,000-cell matrix creates a few dozen, not 60,000."""
        return getattr(pytest.mark, name)(*args, **kwargs) if args or kwargs else getattr(pytest.mark, name)

    def marks(self, cell: Cell) -> list:
        mark = self._mark
        marks = [mark(cell.device), mark(cell.family), mark(cell.dtype), mark("xdist_group", cell.xdist_group)]
        if table()[cell.device].is_gpu:
            marks.append(mark("gpu"))
        if cell.placement != "single":
            marks.append(mark("placement"))
        if "tiny" not in cell.source:
            marks.append(mark("slow"))
        if cell.id in self.done:
            return marks + [mark("skip", reason="already done in an earlier run (--compat-resume)")]
        expectation = disposition(cell, self.host.key)
        if expectation.source == "host":
            return marks + [mark("skip", reason=expectation.reason)]
        cell.expectation = expectation
        shared = self._shared_gpus(cell)
        if shared:
            return marks + [mark("skip", reason=shared)]
        reason = f"[{'/'.join(expectation.categories) or 'expected'}] {expectation.reason}".strip()
        if expectation.outcome == "skip":
            marks.append(mark("skip", reason=reason))
        elif expectation.outcome == "xfail":
            raises = tuple(failure_class(c) for c in expectation.categories) or CellFailure
            marks.append(mark("xfail", reason=reason, strict=expectation.strict, raises=raises))
        return marks

    def _shared_gpus(self, cell: Cell) -> str | None:
        """Why a GPU cell whose placement spreads over GPUs cannot run here: under pytest-xdist without
        --compat-gpu-per-worker every worker sees every GPU, and device_map would put it on GPUs another worker uses;
        with it, each worker owns one GPU, which a placement asking for more cannot get."""
        from harness.matrix.placement import gpus_requested

        if not (self.is_xdist_worker and table()[cell.device].is_gpu) or cell.placement == "single":
            return None
        if not self.config.getoption("compat_gpu_per_worker"):
            return (
                f"placement {cell.placement_id} under pytest-xdist without --compat-gpu-per-worker would share GPUs "
                "with other workers: run it with --compat-gpu-per-worker, or without -n"
            )
        wanted = gpus_requested(cell.placement) or 1
        if wanted > 1:
            return (
                f"placement {cell.placement_id} asks for {wanted} GPUs, and under --compat-gpu-per-worker each xdist "
                "worker owns one: run it without -n (the worker then takes every visible GPU)"
            )
        return None

    # -- running ----------------------------------------------------------------------------------
    def _runner(self) -> Runner:
        if self.runner is None:
            self.runner = Runner(
                self.reports_dir / REFERENCE_DIR,
                server_logs=self.reports_dir / "server-logs",
                emulate=self.config.getoption("compat_emulate"),
                run_predicted_oom=self.config.getoption("compat_run_predicted_oom"),
            )
        return self.runner

    def run(self, cell: Cell) -> CellRun:
        start = time.perf_counter()
        try:
            result = self._runner().run(cell)
        except RuntimeError as exc:
            raise HarnessError(str(exc)) from None
        if result.error_type == "ReportWriteError":  # the runner's disk, not the model: stop, count nothing
            self.stop(result.error_message)
            raise HarnessError(result.error_message)
        verdict = judge(cell, result)
        return CellRun(cell, result, verdict, time.perf_counter() - start)

    def stop(self, paragraph: str) -> None:
        self.problems.append(paragraph)
        if self.session is not None:
            self.session.shouldstop = "qwen-compat could not write its reports (see below)"

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
        record["single_twin"] = cell.single_twin
        record["expectation"] = cell.expectation.__dict__
        record["definition"] = cell.definition()
        record["definition_sha"] = cell.fingerprint()
        return record

    # -- hooks --------------------------------------------------------------------------------------
    def pytest_sessionstart(self, session):
        self.session = session
        if self.active and self.is_xdist_controller and not self.config.option.collectonly:
            self._lock_folder()  # the controller writes the reports; its workers only run cells

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

    def pytest_collection_finish(self, session):
        """After -k/-m selection: a run with this host's cells in it begins; any other run touches nothing."""
        if self.config.option.collectonly or not self.active or _informational(self.config):
            return
        mine = [i for i in session.items if isinstance(_cell_of(i), Cell) and _cell_of(i).device == self.host.key]
        mine = [i for i in mine if _cell_of(i).id not in self.done]
        if not mine:
            return
        self.planned = [_cell_of(i) for i in mine]
        if not self.is_xdist_worker:
            self._begin()
        if any(not i.get_closest_marker("skip") for i in mine):
            self._runner().prestart()  # its torch imports overlap with the first cells' set-up

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        cell = _cell_of(item)
        finished = report.when == "call" or (report.when == "setup" and not report.passed)
        # Only this host's cells are reported: another card's cells belong to that card's runner.
        run = item.stash.get(RUN_KEY, None)
        if (
            isinstance(cell, Cell)
            and finished
            and cell.id not in self.done
            and cell.device == self.host.key
            and not (self.problems and run is None)  # a cell stopped by a write failure is not a result
        ):
            report.qwen_compat = self.record(cell, run, report)
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
        if record is None or self.is_xdist_worker or self.results is None or self.problems:
            return
        self._begin()
        key = record.get("single_twin")
        twin = key and (self.recorded.get(key) or self.done.get(key))
        if twin and record.get("measurements"):
            from harness.matrix.placement import slowdown

            factors = slowdown(record["measurements"], twin.get("measurements") or {})
            record["slowdown_vs_single"] = {**factors, "single": twin["id"]} if factors else None
        self.recorded[record["id"]] = record
        try:
            self.results.append(record)
        except ReportWriteError as err:
            self.stop(str(err))
            return
        self.stats["cells"] += 1
        self.stats["model_loads"] += record["model_loaded"]
        self.stats["worker_starts"] += record["worker_started"]
        if self.progress is None:
            terminal = self.config.pluginmanager.get_plugin("terminalreporter")
            self.progress = Progress(
                lambda line: _write_progress(terminal, line),
                color=bool(terminal and terminal.hasmarkup),
                planned=self.planned,
                started=self.started,
            )
        self.progress.cell_done(record)

    def pytest_sessionfinish(self, session, exitstatus):
        interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
        if self.runner:
            self.runner.close(now=interrupted)  # a cancelled job leaves no worker behind
        if self.is_xdist_worker or not self.began:
            return
        self.stats["wall_s"] = round(time.monotonic() - self.started, 2)
        self.stats["interrupted"] = interrupted
        if self.stats["cells"]:
            from harness.report.summary import write_summaries

            try:
                write_summaries(self.reports_dir, self.stats)
            except ReportWriteError as err:
                self.problems.append(str(err))
        name = self.config.getoption("compat_save_baseline")
        if name and not interrupted and not self.problems:
            from harness.report import baselines

            root = Path(self.config.getoption("compat_reports"))
            baselines.save(name, root, root / "baselines")
        if self.problems:
            session.exitstatus = pytest.ExitCode.INTERRUPTED

    def pytest_terminal_summary(self, terminalreporter):
        if self.is_xdist_worker:
            return
        for note in self.notes:
            terminalreporter.write_line(f"qwen-compat: {note}")
        if self.began and self.stats["cells"]:
            s = self.stats
            terminalreporter.write_sep("-", "qwen-compat")
            if self.progress:
                terminalreporter.write_line(self.progress.final_line(time.monotonic() - self.started))
            terminalreporter.write_line(
                f"{s['cells']} cells on {self.host.key}; model loads: {s['model_loads']}; "
                f"worker starts: {s['worker_starts']}"
            )
            terminalreporter.write_line(
                f"reports: {self.reports_dir}/results.json, junit.xml, summary.md, summary.html"
            )
        for problem in self.problems:
            terminalreporter.write_line(f"qwen-compat: {problem}", red=True, bold=True)

    def pytest_unconfigure(self, config):
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self.junit_tmp is not None:
            if self.began and self.junit_tmp.exists():
                try:
                    write_report(self.reports_dir / "junit.xml", self.junit_tmp.read_text(), lost="junit.xml")
                except ReportWriteError as err:
                    print(f"qwen-compat: {err} (the JUnit report is at {self.junit_tmp})")
                    return
            shutil.rmtree(self.junit_tmp.parent, ignore_errors=True)
        if self.lock:
            self.lock.release()


def _sigterm_as_interrupt(signum, frame):
    """A cancelled or timed-out CI job: stop as Ctrl-C stops, so finished cells get their reports."""
    raise KeyboardInterrupt("SIGTERM")


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
def cell_run(request, cell) -> CellRun:
    """Run the cell in the isolated worker and judge it; measurements go to the JUnit report as test-case
    properties (appended directly: pytest writes them under every junit_family, and `record_property`
    would warn under the default xunit2)."""
    session: CompatSession = request.config.pluginmanager.get_plugin("qwen_compat_session")
    run = session.run(cell)
    request.node.stash[RUN_KEY] = run
    properties = request.node.user_properties
    for key, value in run.result.measurements.items():
        properties.append((key, value))
    properties.append(("category", run.verdict.category))
    if run.verdict.outcome == "error":
        raise HarnessError(run.verdict.message)
    return run
