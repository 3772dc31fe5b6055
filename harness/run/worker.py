"""The worker process (`python -m harness.run.worker`): the child side of isolation.

Imports torch once, then answers the parent's cells one JSON line at a time. Each cell goes to its
backend (`cell.backend`): `transformers` keeps the group's model loaded in this process, `openai`
sends the cell to its group's server and `gradio` has it as a conversation with its group's WebUI,
each started here for the group when the model entry says `launch:` and stopped when the group
changes. Any failure of a cell is caught and answered as data for the verdict; a crash or hang ends
the process, and the parent (`harness.run.runner`) tells.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from harness.errors import HarnessFault, UserError
from harness.judge.result import STDERR_TAIL_CHARS
from harness.matrix.cells import SERVED_BACKENDS, Cell
from harness.run.backends import RunContext

WORKER_TMP_PREFIX = "qwen-compat-worker-"  # the runner gives each worker a TMPDIR of this name, its own


class Worker:
    """Routes each cell to its backend; one server-backed group at a time."""

    def __init__(self, out):
        from harness.run.backends.transformers import TransformersBackend

        self.out = out
        self.transformers = TransformersBackend()
        self.served = None  # the current group's OpenAIBackend or GradioBackend
        self.served_group: str | None = None
        self._logs: Path | None = None

    def server_logs(self, request: dict) -> Path:
        """The run's folder for launched servers' logs, or one temporary folder for this worker."""
        if request.get("server_logs"):
            return Path(request["server_logs"])
        if self._logs is None:
            self._logs = Path(tempfile.mkdtemp(prefix="qwen-compat-servers-"))
        return self._logs

    def emit(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def backend(self, cell: Cell, server_logs: Path):
        if cell.backend not in SERVED_BACKENDS:
            self.stop_served()
            return self.transformers
        if self.served_group != cell.group:
            self.stop_served()
            self.transformers.stop()  # a launched server gets the memory the in-process model held
            backend, target = _served_backend(cell.backend)
            self.served = backend(target(**cell.serving), server_logs)
            self.served_group = cell.group
        return self.served

    def stop_served(self) -> None:
        if self.served:
            self.served.stop()
        self.served = self.served_group = None

    def run(self, cell: Cell, request: dict) -> dict:
        context = RunContext(
            emit=self.emit,
            reference_dir=Path(request["reference_dir"]),
            server_logs=self.server_logs(request),
            emulate=request.get("emulate"),
            run_predicted_oom=request.get("run_predicted_oom", False),
            lenient=request.get("lenient", False),
        )
        return self.backend(cell, context.server_logs).run(cell, context)


def _memory_plan_if_out_of_memory(cell: Cell, message: str) -> dict:
    """For an out-of-memory failure, the plan the verdict's remedy quotes (the parent cannot plan: no torch)."""
    from harness.judge.failures import classify

    if classify(message).category != "out-of-memory":
        return {}
    from harness.judge.remedies import memory_plan

    try:
        return memory_plan(cell)
    except Exception as exc:  # noqa: BLE001 - a plan is advice
        print(f"qwen-compat: no memory plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}


SERVED_EXTRAS = {"openai": "serve", "gradio": "webui"}  # the pyproject extra each served backend's client needs


def _served_backend(name: str):
    """The backend class and target of a served backend, imported only when a cell needs it; a client package
    of its extra that is not installed is this environment's gap, said with the install line, never the model's."""
    try:
        if name == "gradio":
            from harness.run.backends import gradio

            return gradio.GradioBackend, gradio.Target
        from harness.run.backends.openai import group as openai

        return openai.OpenAIBackend, openai.Target
    except ModuleNotFoundError as exc:
        raise UserError(
            f"backend: {name} needs the Python package `{exc.name}`, which this environment lacks.",
            key="backend",
            fix=f"pip install -e '.[{SERVED_EXTRAS[name]}]' (or pip install 'qwen-compat[{SERVED_EXTRAS[name]}]').",
        ) from None


def _as_harness_fault(exc: BaseException) -> BaseException:
    """A full disk while a cell runs (the offload folder, the checkpoint cache, a temporary file) is the runner's
    failure, never the model's; a report that could not be written keeps its own error (it stops the run)."""
    from harness.errors import HarnessFault, ReportWriteError, is_disk_full

    if isinstance(exc, ReportWriteError | HarnessFault) or not is_disk_full(exc):
        return exc
    return HarnessFault(
        "the runner's disk is full",
        exc,
        fix="free space on the disk of the temporary folder, the checkpoint cache (QWEN_COMPAT_CACHE) and the "
        "reports, then run again with --compat-resume.",
    )


def failure_reply(cell: Cell, exc: BaseException) -> dict:
    """The answer for a cell that raised: the error as data for the verdict, a full disk as the harness's."""
    import traceback

    said = _as_harness_fault(exc)
    return {
        "ok": False,
        "error_type": type(said).__name__,
        "harness_error": isinstance(said, (UserError, HarnessFault)),
        "error_message": str(said),
        "traceback": "".join(traceback.format_exception(exc))[-STDERR_TAIL_CHARS:],
        "prediction": _memory_plan_if_out_of_memory(cell, str(said)),
    }


REMOVE_AND_EXIT = "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True); sys.exit(int(sys.argv[2]))"


def _leave(code: int) -> NoReturn:
    """End this worker, taking its temporary folder (offloaded weights, server logs) with it, whoever ends it:
    an orphan's parent is not there to remove it. It replaces itself (exec) by a one-line removal, which stops
    its other threads at once (a removal beside them races their writes: a model still offloading recreates
    files behind rmtree) and skips the interpreter's teardown of torch and transformers (~2 s here)."""
    sys.stderr.flush()
    own = tempfile.gettempdir()
    if Path(own).name.startswith(WORKER_TMP_PREFIX):  # never a TMPDIR the worker was not given as its own
        with contextlib.suppress(OSError):  # no interpreter to exec: the runner removes it, if it is there
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", REMOVE_AND_EXIT, own, str(code)])
    os._exit(code)


def _exit_with_parent() -> None:
    """End this worker if the process driving it dies (even by SIGKILL), whatever the cell is doing."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        _leave(1)

    threading.Thread(target=watch, daemon=True).start()


def _serve() -> None:
    """Import torch, say ready, then answer the parent's cells until it says exit (or its pipe ends)."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr, never into the protocol stream
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch  # noqa: F401  (the import cost is paid once, before "ready")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    worker = Worker(protocol)
    gc.freeze()  # the imports' ~230k objects leave the collector's full passes (0.13 s each here: worker_gc.py)
    worker.emit({"event": "ready", "pid": os.getpid()})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "exit":
                break
            cell = Cell.from_dict(request["cell"])
            try:
                reply = worker.run(cell, request)
            except BaseException as exc:  # every failure of a cell is data for the verdict
                reply = failure_reply(cell, exc)
            worker.emit(reply)
    finally:
        worker.stop_served()
        worker.transformers.stop()  # a placed group's offload folder goes with its model


def main() -> None:
    import faulthandler
    import traceback

    faulthandler.enable(all_threads=False)  # a segfault leaves the crashing thread's traceback in the stderr tail
    _exit_with_parent()
    try:
        _serve()
    except BaseException:  # as the interpreter would: the traceback for the runner's stderr tail, exit status 1
        traceback.print_exc()
        _leave(1)  # a parent killed mid-cell breaks the protocol pipe (BrokenPipeError) here, often before the watch
    _leave(0)  # and its end of stdin ends the loop, maybe before the watch sees the new parent


if __name__ == "__main__":
    main()
