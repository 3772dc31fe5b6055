"""The parent side of isolation: cells run in a worker process, so a CUDA error, segfault or hang
ends one cell, never the run.

`Runner` (imported by the pytest process; never imports torch) starts one worker (`python -m
harness.run.worker`, a fresh interpreter, never a fork), sends it cells as JSON lines, waits with the
cell's timeout (the model load, announced by the worker, has its own), can send the next cell ahead
(the worker computes it while pytest reports the last one), and replaces the worker
only after a crash, a timeout, or an error that poisons the worker's CUDA context. Each worker has a
temporary folder of its own (its TMPDIR: offloaded weights, servers' scratch), removed when the worker
ends however it ends.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.judge.failures import is_sticky
from harness.judge.result import STDERR_TAIL_CHARS, WorkerResult
from harness.matrix.cells import Cell
from harness.run.worker import WORKER_TMP_PREFIX
from harness.secrets import scrub, secret_values

STARTUP_TIMEOUT_S = 600.0


class Runner:
    """Drives one worker process over a run; each result says whether its cell started a worker or
    loaded a model, and `starts` counts worker processes."""

    command = [sys.executable, "-m", "harness.run.worker"]

    def __init__(
        self,
        reference_dir: Path,
        env: dict | None = None,
        emulate: str | None = None,
        run_predicted_oom: bool = False,
        lenient: bool = False,
        server_logs: Path | None = None,
    ):
        self.reference_dir = Path(reference_dir)
        self.server_logs = server_logs  # where launched servers' logs are kept (None: a temporary folder)
        self.env = {**os.environ, **(env or {})}
        self.emulate = emulate
        self.run_predicted_oom = run_predicted_oom
        self.lenient = lenient
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._eof = False
        self.start_error: str | None = None
        self._stderr = None
        self._tmp: str | None = None  # the worker's own TMPDIR
        self._ahead: tuple[Cell, float] | None = None  # the cell sent ahead, and when
        self.sent_at = 0.0  # when the last cell run was sent to the worker (perf_counter)

    # -- process management -------------------------------------------------------------------
    def prestart(self) -> None:
        """Start the worker now, so its seconds of imports overlap with pytest's collection."""
        if self._proc is None:
            self._spawn()

    def _spawn(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._tmp = tempfile.mkdtemp(prefix=WORKER_TMP_PREFIX)  # removed with the worker, even one killed
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**self.env, "TMPDIR": self._tmp},
        )
        self.starts += 1
        self._ready = False
        self._buffer = b""
        self._eof = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)

    def _await_ready(self) -> None:
        ready = self._read(STARTUP_TIMEOUT_S)
        if not ready or ready.get("event") != "ready":
            from harness.judge.failures import classify

            tail = scrub(self._stderr_tail())
            self._kill()
            found = classify(tail)
            last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
            # Every later cell would fail the same way: say it once, quickly, for each of them.
            self.start_error = f"the qwen-compat worker did not start ({found.category}): {last}. Fix: {found.remedy}"
            raise RuntimeError(self.start_error)
        self._ready = True

    def _kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
        if self._proc:
            self._proc.wait()
            self._selector.close()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._stderr.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._proc, self._ahead = None, None

    def close(self, now: bool = False) -> None:
        """End the worker: politely between cells, at once (`now`) when the run was interrupted, or when
        it never said it was ready (still importing: it holds no model, no server, nothing to release)."""
        if self._proc and self._proc.poll() is None and self._ready and not now:
            try:
                self._send({"op": "exit"})
                self._proc.wait(timeout=10)
            except Exception:
                pass
        self._kill()

    def _send(self, message: dict) -> None:
        self._proc.stdin.write((json.dumps(message) + "\n").encode())
        self._proc.stdin.flush()

    def _read(self, timeout: float) -> dict | None:
        """One protocol line, or None on timeout or end of stream.

        Reads the pipe unbuffered into our own buffer: two lines that arrive together (the "loaded"
        event and a fast cell's reply) must not leave the second where select() cannot see it.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(timeout=left):
                return None
            chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
            if not chunk:
                self._eof = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL_CHARS))
        return self._stderr.read().decode(errors="replace")

    # -- running cells --------------------------------------------------------------------------
    def run(self, cell: Cell) -> WorkerResult:
        """Run the cell in the worker, or take its reply when it was sent ahead (`send_ahead`)."""
        if self.start_error:
            raise RuntimeError(self.start_error)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0].id != cell.id:
            self._reply(ahead[0], started=False)  # sent ahead, then not run (its set-up failed): dropped
            ahead = None
        if ahead is not None:
            self.sent_at = ahead[1]
            return self._reply(cell, started=False)
        started = False
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            self._await_ready()
            started = True
        self._send(self._request(cell))
        self.sent_at = time.perf_counter()
        return self._reply(cell, started)

    def send_ahead(self, cell: Cell) -> None:
        """Send the run's next cell now, so that the worker computes it while this process judges and reports
        the last one; `run(cell)` then takes its reply. Only to a worker that is ready and idle: starting one,
        or replacing a dead one, stays in `run`, where the cell's result says so."""
        if self._ahead is not None or not self._ready or self._proc is None or self._proc.poll() is not None:
            return
        try:
            self._send(self._request(cell))
        except OSError:  # the worker died between cells: run() starts another
            self._kill()
            return
        self._ahead = (cell, time.perf_counter())

    def _request(self, cell: Cell) -> dict:
        return {
            "op": "run",
            "cell": cell.to_dict(),
            "reference_dir": str(self.reference_dir),
            "server_logs": str(self.server_logs) if self.server_logs else None,
            "emulate": self.emulate,
            "run_predicted_oom": self.run_predicted_oom,
            "lenient": self.lenient,
        }

    def _reply(self, cell: Cell, started: bool) -> WorkerResult:
        """The worker's answer for the cell it is running, or what its death or silence says."""
        # The cell's own timeout starts when the worker says the cell starts ("cell"); what comes before (a
        # fresh worker's imports, the memory plan, loading the model) is set-up, under load_timeout_s.
        deadline_s, loading, loaded = cell.load_timeout_s, True, False
        while True:
            message = self._read(deadline_s)
            if message is None:
                result = self._dead_worker(cell, loading)
                break
            event = message.get("event")
            if event in ("loading", "loaded"):
                loaded = loaded or event == "loaded"
                continue
            if event == "cell":
                deadline_s, loading = cell.timeout_s, False
                continue
            fields = {k: v for k, v in message.items() if k in WorkerResult.__dataclass_fields__}
            result = WorkerResult(**scrub(fields, _secrets(cell)))
            sticky = not result.ok and is_sticky(f"{result.error_message}\n{result.traceback}")
            if sticky and cell.backend == "transformers":  # a server's CUDA error is the server's (it is replaced)
                self._kill()  # the CUDA context is poisoned: the next cell gets a fresh worker
            break
        result.worker_started, result.model_loaded = started, loaded
        return result

    def _dead_worker(self, cell: Cell, loading: bool = False) -> WorkerResult:
        # End of stream means the worker is dying (it may not be reapable yet); silence means a hang.
        if self._eof:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        alive = self._proc.poll() is None
        if alive:
            self._proc.kill()
        code = self._proc.wait()
        tail = scrub(self._stderr_tail(), _secrets(cell))
        self._kill()
        if alive:
            message = (
                f"the cell's set-up (memory plan, load) exceeded its load_timeout_s of {cell.load_timeout_s:g} s; "
                "the worker was killed"
                if loading
                else f"cell exceeded its timeout of {cell.timeout_s:g} s; the worker was killed"
            )
            return WorkerResult(
                timed_out=True, load_timed_out=loading, returncode=code, stderr_tail=tail, error_message=message
            )
        name = signal.Signals(-code).name if code < 0 else None
        message = (
            f"worker was killed by signal {-code} ({name}) while running the cell"
            if name
            else f"worker exited with code {code} while running the cell"
        )
        return WorkerResult(returncode=code, signal_name=name, stderr_tail=tail, error_message=message)


def _secrets(cell: Cell) -> list[str]:
    """What to scrub from what came back for a cell: the usual secrets, and the key its server is reached with,
    whatever the name of the variable that holds it (a server may echo it, in an error or an answer)."""
    return secret_values([(cell.serving or {}).get("api_key_env")] if cell.serving else [])
