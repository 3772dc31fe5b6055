"""One pytest process's matrix run: set-up (host, cells, resume), running cells in the worker, recording
each finished cell, and the run's end (summaries, JUnit, baseline). The hooks that need this state are
methods here; `harness.plugin` registers the object.

Nothing but a real run touches the reports or starts a worker: `--help`, `--markers`,
`--collect-only` or a `-k` that selects nothing leave `reports/` as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from harness.devices import torch_build
from harness.devices.host import Host, resolve
from harness.errors import ReportWriteError, UserError
from harness.judge.verdict import judge, unchecked
from harness.matrix import cells as cells_mod
from harness.matrix import schema as matrix_mod
from harness.matrix.cells import Cell, on_host
from harness.matrix.gpus import table
from harness.plugin import options
from harness.plugin.selection import mark, nothing_here, selection_marks
from harness.plugin.verdicts import CellFailure, CellRun, HarnessError, enforce, failure_class, outcome
from harness.report import plots
from harness.report.lock import RunLock
from harness.report.progress import Progress
from harness.report.results import (
    CELL_FIELDS,
    ResultsFile,
    changed_since_recorded,
    environment,
    latest_records,
    load_results,
    references_dir,
)
from harness.run.disposition import disposition
from harness.run.runner import Runner

DEFAULT_MATRIX = "matrices/default.yaml"
RUN_KEY = pytest.StashKey["CellRun"]()


class CompatSession:
    """Per-process state of a matrix run: host, cells, worker runner, results file."""

    def __init__(self, config, informational: bool = False):
        self.config = config
        self.informational = informational
        self.matrix_given = options.given(config, "compat_matrix")
        # The default matrix belongs to the project (rootdir), wherever pytest is started from.
        self.matrix_path = self.option("compat_matrix") or os.path.relpath(config.rootpath / DEFAULT_MATRIX)
        suites = Path(config.rootpath, "suites").resolve()
        self.active = self.matrix_given or any(
            Path(a.split("::")[0]).resolve().is_relative_to(suites) for a in config.args
        )
        self.is_xdist_worker = hasattr(config, "workerinput")
        self.is_xdist_controller = getattr(config.option, "dist", "no") != "no" and not self.is_xdist_worker
        # One id for the run, shared by the controller and its xdist workers: the float32 references a worker
        # writes belong to this run, and the controller clears only earlier runs' (never its workers').
        self.run_id = (
            config.workerinput.get("qwen_compat_run_id")
            if self.is_xdist_worker
            else f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        )
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
        self.problems: list[str] = []  # writing failures: said at the end, and the exit status is not 0
        self.notes: list[str] = []
        self.session = None
        self.next_item = None  # the item pytest runs after the current one
        self._previous_sigterm = None
        self.torch_build = None
        self.usage_error: str | None = None
        self.stats = {"cells": 0, "model_loads": 0, "worker_starts": 0}
        self.started = time.monotonic()

    def option(self, dest: str):
        return options.value(self.config, dest)

    # -- set-up (no side effects: nothing is written, nothing is started) -------------------------
    def prepare(self) -> list[Cell]:
        if self._cells is not None:
            return self._cells
        option = self.option
        if not self.matrix_given and not Path(self.matrix_path).exists():
            raise UserError(
                "this suite's tests take `cell`, and no matrix says which cells there are.",
                key="--compat-matrix",
                fix="pass --compat-matrix FILE, set `compat_matrix = FILE` under [tool.pytest.ini_options] (or in "
                "pytest.ini), or export QWEN_COMPAT_MATRIX=FILE; `qwen-compat schema` describes the format.",
            )
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
        self.host = self.detected = resolve(option("compat_device"))
        if self.host.via.startswith("CUDA_VISIBLE_DEVICES="):
            raise UserError(
                f"{self.host.via} of this host's GPUs: CUDA would see none, and the run would test the CPU in place "
                "of this runner's card (a green run that tested nothing it was meant to).",
                key="CUDA_VISIBLE_DEVICES",
                fix="unset it, or name GPUs NVML lists (indices or GPU-/MIG- UUIDs, `nvidia-smi -L`); pass "
                "--compat-device cpu to test the CPU on purpose.",
            )
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
        self._check_torch()
        self._cells = on_host(cells_mod.expand(matrix, self.matrix_path), self.host.key)
        self.reports_dir = Path(option("compat_reports")) / self._folder_name()
        self.results = ResultsFile(self.reports_dir / "results.json")
        if option("compat_resume") and self.results.path.exists():
            data = load_results(self.results.path)
            self._check_same_environment(data.get("environment") or {})
            recorded = latest_records(data)
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

    def _folder_name(self) -> str:
        """The run's reports folder: the host's card, or, for a run whose every cell goes to one server the
        harness did not start, `endpoint-<host>-<port>` (its results are that server's, not this host's)."""
        servers = set()
        for cell in self._cells:
            serving = cell.serving or {}
            url = None if serving.get("launch") else serving.get("endpoint") or serving.get("webui")
            servers.add(urlsplit(url).netloc.replace(":", "-") if url else None)
        return f"endpoint-{servers.pop()}" if len(servers) == 1 and None not in servers else self.host.key

    def _check_same_environment(self, then: dict) -> None:
        """--compat-resume keeps recorded cells only where they would run the same: a changed card, driver or
        library version makes the old records describe another environment."""
        now = environment(self.host, self.matrix_path, self.torch_build and self.torch_build.to_dict())
        keys = ("device", "gpu_name", "driver", "torch", "transformers", "flash_attn", "vllm", "qwen_compat")
        changed = [f"{k} {then.get(k)} -> {now.get(k)}" for k in keys if k in then and then.get(k) != now.get(k)]
        if changed:
            raise UserError(
                f"--compat-resume: the environment changed since the recorded cells ran ({'; '.join(changed)}); "
                "their records would not describe this run.",
                file=str(self.results.path),
                key="--compat-resume",
                fix="run without --compat-resume to start the folder over, or resume in the environment that ran them.",
            )

    def _check_torch(self) -> None:
        """On a detected GPU, the installed torch must have kernels for it (and a driver new enough): else
        every cell would fail for the environment's reason, so the run stops before any cell, in one paragraph."""
        self.torch_build = torch_build.installed()
        real = self.detected
        if real.via not in ("nvml", "torch") or self.config.option.collectonly or self.informational:
            return
        self.torch_build = torch_build.probe()
        torch_build.check(
            self.torch_build, card=real.name, compute_capability=real.compute_capability, driver_cuda=real.cuda
        )

    def configure_run(self) -> None:
        """SIGTERM handled as Ctrl-C from the start, so that a cancelled CI job still leaves its reports."""
        if self.is_xdist_worker or self.config.option.collectonly:
            return
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
        resume = self.option("compat_resume")
        try:
            note = self.results.start(
                environment(self.host, self.matrix_path, self.torch_build and self.torch_build.to_dict()), resume=resume
            )
        except ReportWriteError as err:
            pytest.exit(str(err), returncode=pytest.ExitCode.INTERRUPTED)
        if note:
            self.notes.append(note)
        if not resume:  # float32 references belong to the run that made them: earlier runs' go
            for old in references_dir(self.reports_dir).glob("*"):
                if old.name != self.run_id:
                    shutil.rmtree(old, ignore_errors=True)
        self.began = True
        plots.import_in_background()  # the summary's plots are drawn at the end

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

    def marks(self, cell: Cell) -> list:
        marks = selection_marks(cell, self.host.key)
        if cell.id in self.done:
            return marks + [mark("skip", reason="already done in an earlier run (--compat-resume)")]
        expectation = disposition(cell, self.host.key)
        if expectation.source == "host":
            return marks  # another card's cell: deselected at collection (pytest_collection_modifyitems)
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
        if not self.option("compat_gpu_per_worker"):
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
                self._references(),
                server_logs=self.reports_dir / "server-logs",
                emulate=self.option("compat_emulate"),
                run_predicted_oom=self.option("compat_run_predicted_oom"),
                lenient=self.option("compat_lenient"),
            )
        return self.runner

    def prestart_worker(self) -> None:
        """A run with cells for this host starts its worker at configure time, so that the worker's imports
        (torch and transformers: seconds) overlap with collection; when selection leaves no cell to run,
        pytest_collection_finish stops it before it has been sent anything."""
        option = self.config.option
        quiet = self.informational or option.collectonly or getattr(option, "setupplan", False)
        if quiet or self.is_xdist_controller or not self._cells:
            return
        self._runner().prestart()

    def _stop_unused_worker(self) -> None:
        if self.runner is not None:
            self.runner.close(now=True)
            self.runner = None

    def _references(self) -> Path:
        """This run's float32 references; a resumed run keeps using the folder of the run it resumes."""
        root = references_dir(self.reports_dir)
        if self.option("compat_resume"):
            earlier = sorted(p for p in root.glob("*") if p.is_dir())
            if earlier:
                return earlier[-1]
        return root / self.run_id

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config, log):
        """--dist loadgroup: a model's cells on one worker, by the matrix's groups (see plugin/scheduling.py)."""
        if not self.active or config.getoption("dist") != "loadgroup" or self._cells is None:
            return None
        from harness.plugin.scheduling import cell_group_scheduler

        return cell_group_scheduler(config, log, {c.id: c.xdist_group for c in self._cells})

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        """pytest-xdist: each worker learns the run's id before it starts."""
        node.workerinput["qwen_compat_run_id"] = self.run_id

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
        self._send_ahead(verdict)
        return CellRun(cell, result, verdict, time.perf_counter() - min(start, self.runner.sent_at))

    def _send_ahead(self, verdict) -> None:
        """The next cell goes to the worker now, to be computed while pytest reports this one: only a cell that
        pytest runs next through `cell_run`, with no skip mark, and not after a failure under --maxfail/-x
        (the run may stop there)."""
        item = self.next_item
        following = _cell_of(item) if item is not None else None
        if not isinstance(following, Cell) or "cell_run" not in item.fixturenames:
            return
        if item.get_closest_marker("skip") or item.get_closest_marker("skipif"):
            return
        if self.config.option.maxfail and verdict.outcome != "passed":
            return
        self.runner.send_ahead(following)

    def stop(self, paragraph: str) -> None:
        self.problems.append(paragraph)
        if self.session is not None:
            self.session.shouldstop = "qwen-compat could not write its reports (see below)"

    def record(self, cell: Cell, run: CellRun | None, report) -> dict:
        """The results.json line of a finished cell: its axes, pytest's outcome, the verdict, measurements."""
        outcome_word = outcome(report)
        record = {field: getattr(cell, field) for field in CELL_FIELDS}
        if run is None:  # skipped or errored before the worker ran it
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
            category = (cell.expectation.categories or [None])[0] if outcome_word == "skipped" else "harness"
            record.update(
                outcome=outcome_word,
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
                outcome=outcome_word,
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
        record["unchecked"] = unchecked(record.get("measurements") or {})
        record["single_twin"] = cell.single_twin
        record["expectation"] = cell.expectation.__dict__
        record["definition"] = cell.definition()
        record["definition_sha"] = cell.fingerprint(record["definition"])
        return record

    # -- hooks --------------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        """Notes the item after this one (what `run` may send ahead); pytest's own protocol then runs the item."""
        self.next_item = nextitem

    def pytest_sessionstart(self, session):
        self.session = session
        if self.active and self.is_xdist_controller and not self.config.option.collectonly:
            self._lock_folder()  # the controller writes the reports; its workers only run cells

    def pytest_generate_tests(self, metafunc):
        if "cell" not in metafunc.fixturenames:
            return
        try:
            cells = self.prepare()
        except UserError as err:  # said once the collection ends: an exit raised inside a collector is a traceback
            self.usage_error = str(err)
            metafunc.parametrize("cell", [])
            return
        metafunc.parametrize("cell", [pytest.param(c, id=c.id, marks=self.marks(c)) for c in cells])

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        """After -m/-k: other cards' cells are deselected (the counts and JUnit say what ran here), this
        host's run in their run order; a selection that leaves this host nothing fails the run."""
        if self.usage_error:
            pytest.exit(self.usage_error, returncode=pytest.ExitCode.USAGE_ERROR)
        cell_items = [i for i in items if isinstance(_cell_of(i), Cell)]
        if not cell_items:
            return
        elsewhere = [i for i in cell_items if _cell_of(i).device != self.host.key]
        if elsewhere:
            config.hook.pytest_deselected(items=elsewhere)
            cell_items = [i for i in cell_items if _cell_of(i).device == self.host.key]
        ordered = {c.id: n for n, c in enumerate(cells_mod.run_order([_cell_of(i) for i in cell_items]))}
        others = [i for i in items if not isinstance(_cell_of(i), Cell)]
        items[:] = others + sorted(cell_items, key=lambda i: ordered[_cell_of(i).id])
        quiet = self.informational or config.option.collectonly or self.is_xdist_worker  # workers: the controller says
        if elsewhere and not cell_items and not quiet:
            targets = Counter(_cell_of(i).device for i in elsewhere)
            pytest.exit(
                nothing_here(self.host.key, self.host.name, targets), returncode=pytest.ExitCode.NO_TESTS_COLLECTED
            )

    def pytest_collection_finish(self, session):
        """After -k/-m selection: a run with this host's cells in it begins; any other run touches nothing."""
        if self.config.option.collectonly or not self.active or self.informational:
            return
        mine = [i for i in session.items if isinstance(_cell_of(i), Cell) and _cell_of(i).device == self.host.key]
        new = [i for i in mine if _cell_of(i).id not in self.done]
        if mine and not new:
            self._nothing_new([_cell_of(i) for i in mine])
        mine = new
        if not mine:
            self._stop_unused_worker()
            return
        self.planned = [_cell_of(i) for i in mine]
        if not self.is_xdist_worker:
            self._begin()
        if all(i.get_closest_marker("skip") for i in mine):
            self._stop_unused_worker()

    def _nothing_new(self, cells: list[Cell]) -> None:
        """--compat-resume with every selected cell recorded: say so; exit 0 only when they all held."""
        records = [self.done[c.id] for c in cells]
        bad = [r for r in records if r["outcome"] in ("failed", "error", "xpassed-strict")]
        counts = Counter(r["outcome"] for r in records)
        said = ", ".join(f"{n} {what}" for what, n in counts.most_common())
        paragraph = (
            f"qwen-compat: --compat-resume found nothing new to run: all {len(records)} selected cells are recorded "
            f"in {self.results.path} ({said})."
        )
        if bad:
            paragraph += f" {len(bad)} of them did not pass (first: {bad[0]['id']}), so the run fails."
        pytest.exit(paragraph, returncode=pytest.ExitCode.TESTS_FAILED if bad else pytest.ExitCode.OK)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        """The outermost wrapper: after pytest's xfail handling, the verdict has the last word on the
        outcome (a suite that never calls `.check()` cannot pass a failed cell), then the record is made."""
        report = yield
        cell = _cell_of(item)
        run = item.stash.get(RUN_KEY, None)
        enforce(report, run, item)
        finished = report.when == "call" or (report.when == "setup" and not report.passed)
        # Only this host's cells are reported: another card's cells belong to that card's runner.
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
        record["test"] = report.nodeid  # the JUnit test case's name, as pytest gives it
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
            from harness.report.junit import JUnitOptions
            from harness.report.summary import write_summaries

            junit = JUnitOptions.from_config(self.config, properties=self.option("compat_junit_properties"))
            try:
                self.notes += write_summaries(self.reports_dir, self.stats, junit)
            except ReportWriteError as err:
                self.problems.append(str(err))
        name = self.option("compat_save_baseline")
        if name and not interrupted and not self.problems:
            from harness.report import baselines

            root = Path(self.option("compat_reports"))
            try:
                baselines.save(name, root, root / "baselines")
            except ReportWriteError as err:
                self.problems.append(str(err))
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
                f"reports: {self.reports_dir}/results.json, results.jsonl, results.csv, junit.xml, summary.md, "
                "summary.html"
            )
        for problem in self.problems:
            terminalreporter.write_line(f"qwen-compat: {problem}", red=True, bold=True)

    def pytest_unconfigure(self, config):
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self.lock:
            self.lock.release()


def _sigterm_as_interrupt(signum, frame):
    """A cancelled or timed-out CI job: stop as Ctrl-C stops, so finished cells get their reports."""
    raise KeyboardInterrupt("SIGTERM")


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
