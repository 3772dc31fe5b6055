"""Isolated workers: cells run in a child process, so a CUDA error, segfault or hang ends one cell.

Parent side (`Runner`, imported by the pytest process; never imports torch): starts one worker
(a fresh interpreter, never a fork), sends it cells as JSON lines, waits with a timeout, and
replaces the worker only after a crash, a timeout, or an error that poisons a CUDA context.

Child side (`python -m harness.worker`): imports torch once, keeps the current group's model
loaded (model, dtype, attention, backend), releases it before loading the next group, and
answers each cell with the generation, the measurements, or the error.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cells import Cell
from .failures import is_sticky
from .secrets import scrub

STARTUP_TIMEOUT_S = 600.0
STDERR_TAIL_CHARS = 4000


@dataclass
class WorkerResult:
    """What came back for one cell: a generation, an error raised in the worker, or the worker's death."""

    ok: bool = False
    generation: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    error_type: str | None = None
    error_message: str = ""
    traceback: str = ""
    returncode: int | None = None
    signal_name: str | None = None
    timed_out: bool = False
    load_timed_out: bool = False  # the limit hit was load_timeout_s (loading), not timeout_s (inference)
    stderr_tail: str = ""
    skipped: str | None = None  # the plan predicted the cell cannot fit the card (and was not told to run it)
    prediction: dict = field(default_factory=dict)
    worker_started: bool = False  # this cell started a worker (the first, or a replacement)
    model_loaded: bool = False  # this cell loaded a model (a new group, or after a replacement)

    @property
    def died(self) -> bool:
        return self.timed_out or self.returncode is not None


class Runner:
    """Drives one worker process over a run; each result says whether its cell started a worker or
    loaded a model, and `starts` counts worker processes."""

    command = [sys.executable, "-m", "harness.worker"]

    def __init__(
        self, reference_dir: Path, env: dict | None = None, emulate: str | None = None, run_predicted_oom: bool = False
    ):
        self.reference_dir = Path(reference_dir)
        self.env = {**os.environ, **(env or {})}
        self.emulate = emulate
        self.run_predicted_oom = run_predicted_oom
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._eof = False
        self.start_error: str | None = None
        self._stderr = None

    # -- process management -------------------------------------------------------------------
    def prestart(self) -> None:
        """Start the worker now, so its ~5 s of imports overlap with pytest's own start-up."""
        if self._proc is None:
            self._spawn()

    def _spawn(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self.env,
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
            from .failures import classify

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
        self._proc = None

    def close(self, now: bool = False) -> None:
        """End the worker: politely between cells, at once (`now`) when the run was interrupted."""
        if self._proc and self._proc.poll() is None and not now:
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
        if self.start_error:
            raise RuntimeError(self.start_error)
        started = loaded = False
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            self._await_ready()
            started = True
        self._send(
            {
                "op": "run",
                "cell": cell.to_dict(),
                "reference_dir": str(self.reference_dir),
                "emulate": self.emulate,
                "run_predicted_oom": self.run_predicted_oom,
            }
        )
        deadline_s, loading = cell.timeout_s, False
        while True:
            message = self._read(deadline_s)
            if message is None:
                result = self._dead_worker(cell, loading)
                break
            if message.get("event") == "loading":  # loading has its own, longer, limit
                deadline_s, loading = cell.load_timeout_s, True
                continue
            if message.get("event") == "loaded":  # the cell's own timeout covers inference only
                deadline_s, loading, loaded = cell.timeout_s, False, True
                continue
            result = WorkerResult(**scrub({k: v for k, v in message.items() if k in WorkerResult.__dataclass_fields__}))
            if not result.ok and is_sticky(f"{result.error_message}\n{result.traceback}"):
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
        tail = scrub(self._stderr_tail())
        self._kill()
        if alive:
            message = (
                f"model load exceeded its load_timeout_s of {cell.load_timeout_s:g} s; the worker was killed"
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


# --- child side ------------------------------------------------------------------------------------


def _fault_action(fault, model):
    """A callable that injects the matrix's fault inside inference, as a real failure would."""
    if fault is None:
        return None

    def inject():
        import ctypes

        import torch

        if isinstance(fault, dict):
            raise RuntimeError(fault["raise"])
        if fault == "segfault":
            ctypes.string_at(0)
        elif fault == "abort":
            os.abort()
        elif fault == "hang":
            while True:
                time.sleep(1)
        elif fault == "oom":
            torch.empty(2**50, dtype=torch.uint8, device=model.device)

    return inject


class _Worker:
    def __init__(self, out):
        from .measurements import GpuMemory

        self.out = out
        self.group = None
        self.processor = self.model = None
        self.identity: dict = {}
        self.gpu = GpuMemory()  # before any CUDA context: what the device used without this worker
        self.cuda = None

    def emit(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def release(self) -> None:
        import gc

        self.processor = self.model = None
        self.group = None
        if self.cuda:  # on the CPU, reference counting already returned the memory
            gc.collect()
            self.cuda.empty_cache()

    def device(self) -> str:
        import torch

        if torch.cuda.is_available() and self.cuda is None:
            from .measurements import TorchCuda

            self.cuda = TorchCuda()
            self.gpu.attach(self.cuda)  # creates the CUDA context and measures it
        return "cuda" if self.cuda else "cpu"

    def ensure_loaded(self, cell: Cell) -> float:
        from . import inference
        from .checkpoints import checkpoint_for, model_identity, weights_seed

        if self.group == cell.group:
            return 0.0
        self.release()
        self.emit({"event": "loading", "group": cell.group})
        t0 = time.perf_counter()
        folder = checkpoint_for(cell.source)
        self.processor, self.model = inference.load(
            folder,
            source=cell.source,
            dtype=cell.dtype,
            attn_implementation=cell.attn_implementation,
            device=self.device(),
            weights_seed=weights_seed(cell.source, folder),
        )
        self.identity = model_identity(cell.source, folder)
        self.group = cell.group
        self.emit({"event": "loaded", "group": cell.group})
        return time.perf_counter() - t0

    def card_mib(self, emulate: str | None) -> float | None:
        """Physical memory of the card cells run on: the emulated card's, or this GPU's; None on the CPU."""
        from .gpus import table

        if emulate:
            return table()[emulate].memory_mib
        if self.cuda:
            return self.cuda.cuda.get_device_properties(0).total_memory / 2**20
        return None

    def run(self, cell: Cell, reference_dir: Path, emulate: str | None, run_predicted_oom: bool) -> dict:
        from . import inference
        from .health import drift, reference_key
        from .measurements import MemoryTracker

        kind = self.device()
        if emulate:
            from .emulation import apply_memory_cap

            apply_memory_cap(emulate, self.gpu.context_mib)
        if cell.device != "cpu" and kind == "cpu":
            from .errors import UserError

            raise UserError(
                f"cell targets {cell.device}, but torch sees no CUDA GPU on this host.",
                key="--compat-device",
                fix="run with --compat-device auto, or on the card the cell targets (check CUDA_VISIBLE_DEVICES).",
            )
        before = _predict(cell, device_kind=kind)
        card = self.card_mib(emulate)
        if before and card and before.predicted_peak_mib > card and not run_predicted_oom:
            p = before.parts
            return {
                "ok": False,
                "prediction": before.to_dict(),
                "skipped": f"predicted peak {before.predicted_peak_mib:.0f} MiB exceeds the card's {card:.0f} MiB "
                f"(weights {p['weights_mib']:.0f}, KV cache {p['kv_cache_mib']:.0f}, vision activations "
                f"{p['vision_activations_mib']:.0f}, overhead {p['overhead_mib']:.0f} MiB); "
                f"--compat-run-predicted-oom runs it anyway",
            }
        load_s = self.ensure_loaded(cell)
        spec = inference.CellInput(
            kind=cell.input,
            width=cell.width,
            height=cell.height,
            count=cell.images,
            min_pixels=cell.min_pixels,
            max_pixels=cell.max_pixels,
            prompt=cell.prompt,
            **inference.image_source(cell.image),
        )
        prepared = inference.prepare(self.processor, self.model, spec)  # inputs are not the cell's memory
        with MemoryTracker(kind, self.gpu, self.cuda) as tracker:
            gen = inference.run(
                self.processor,
                self.model,
                prepared,
                max_new_tokens=cell.max_new_tokens,
                repeats=cell.repeats,
                fault=_fault_action(cell.fault, self.model),
            )
        measurements = {
            **tracker.result,
            "visual_tokens": gen.visual_tokens,
            "input_tokens": gen.input_tokens,
            "load_s": round(load_s, 4),
            "preprocess_s": round(gen.preprocess_s, 4),
            "prefill_s": round(gen.prefill_s, 4),
            "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2) if gen.decode_tokens_per_s else None,
            **({"latency": gen.latency} if gen.latency else {}),
            **drift(cell, gen.first_logits, reference_dir, reference_key(cell, self.identity)),
        }
        generation = {"new_token_ids": gen.new_token_ids, "text": gen.text, "nonfinite_steps": gen.nonfinite_steps}
        after = _predict(
            cell, text_tokens=gen.input_tokens - gen.visual_tokens, visual_tokens=gen.visual_tokens, device_kind=kind
        )
        prediction = after.to_dict() if after else {}
        return {"ok": True, "generation": generation, "measurements": measurements, "prediction": prediction}


def _predict(cell: Cell, **kwargs):
    """The memory plan of a cell, or None when its config defeats the planner: a plan is advice, and
    a model the planner does not understand must still run."""
    from . import plan

    try:
        return plan.predict(cell, **kwargs)
    except Exception as exc:  # noqa: BLE001
        print(f"qwen-compat: no memory plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _memory_plan_if_out_of_memory(cell: Cell, message: str) -> dict:
    """For an out-of-memory failure, the plan the verdict's remedy quotes (the parent cannot plan: no torch)."""
    from .failures import classify

    if classify(message).category != "out-of-memory":
        return {}
    from .remedies import memory_plan

    try:
        return memory_plan(cell)
    except Exception as exc:  # noqa: BLE001 - a plan is advice
        print(f"qwen-compat: no memory plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}


def _exit_with_parent() -> None:
    """End this worker if the process driving it dies (even by SIGKILL), whatever the cell is doing."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    import faulthandler
    import traceback

    faulthandler.enable(all_threads=False)  # a segfault leaves the crashing thread's traceback in the stderr tail
    _exit_with_parent()
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr, never into the protocol stream
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch  # noqa: F401  (the import cost is paid once, before "ready")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    worker = _Worker(protocol)
    worker.emit({"event": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "exit":
            break
        cell = Cell.from_dict(request["cell"])
        try:
            reply = worker.run(
                cell, Path(request["reference_dir"]), request.get("emulate"), request.get("run_predicted_oom", False)
            )
        except BaseException as exc:  # every failure of a cell is data for the verdict
            reply = {
                "ok": False,
                "error_type": type(exc).__name__,
                "error_message": str(exc),
                "traceback": traceback.format_exc()[-STDERR_TAIL_CHARS:],
                "prediction": _memory_plan_if_out_of_memory(cell, str(exc)),
            }
        worker.emit(reply)


if __name__ == "__main__":
    main()
