"""Per-device results: `reports/<device>/results.json`, written one line per finished cell.

The file is valid JSON after every append (the closing `]}` is rewritten each time), and each cell
sits on its own line, so a run killed with SIGKILL keeps every finished cell and `--compat-resume` can
pick up where it stopped. Nothing whose name looks like a secret reaches a report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from harness.errors import ReportWriteError, UserError, write_whole
from harness.matrix.schema import AXIS_FIELDS
from harness.secrets import scrub, scrub_text

SCHEMA_VERSION = 1
CLOSING = b"\n]}\n"
CELL_FIELDS = ("id", *AXIS_FIELDS)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def environment(host, matrix_file: str | None, torch_build: dict | None = None) -> dict:
    """Everything needed to reproduce or compare a run; never the environment variables themselves.
    `torch_build`: the full build string, its CUDA version and its compiled architectures."""
    matrix_hash = None
    if matrix_file and Path(matrix_file).exists():
        matrix_hash = hashlib.sha256(Path(matrix_file).read_bytes()).hexdigest()
    return {
        "device": host.key,
        "gpu_name": host.name,
        "compute_capability": host.compute_capability,
        "gpu_memory_mib": host.memory_mib,
        "driver": host.driver or "absent",
        "cuda": host.cuda or "absent",
        "detected_via": host.via,
        "emulated_on": host.emulated_on,
        "torch": (torch_build or {}).get("version") or _version("torch"),
        "torch_cuda": (torch_build or {}).get("cuda"),
        "torch_arch_list": (torch_build or {}).get("arch_list") or None,
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn"),
        "vllm": _version("vllm"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "qwen_compat": _version("qwen-compat"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "matrix_file": matrix_file,
        "matrix_sha256": matrix_hash,
    }


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait while a report is being written, so a cancelled job never tears a file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def write_report(path: Path, text: str, lost: str | None = None) -> None:
    """Write one report file whole or not at all (temporary file, then rename), secrets scrubbed."""
    path = Path(path)
    with signals_deferred():
        write_whole(path, scrub_text(text).encode(), lost or f"{path.name} of this run")


class ResultsFile:
    """Append-only results for one device; always valid JSON on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock")

    def start(self, env: dict, *, resume: bool) -> str | None:
        """Begin a run: keep what is there when resuming (repairing a torn last line, which is said in
        the returned note), otherwise start an empty file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if resume and self.path.exists():
                return self._repair()
            head = json.dumps({"schema_version": SCHEMA_VERSION, "environment": scrub(env)})[:-1]
            write_report(self.path, head + ', "cells": [' + CLOSING.decode(), lost="the new results file")
        return None

    def _repair(self) -> str | None:
        """Rewrite a file cut mid-line (SIGKILL, a full disk) as its complete records."""
        text = self.path.read_text(errors="replace")
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError:
            data = _salvage(text, self.path)
        kept = [c for c in data.pop("cells") if isinstance(c, dict) and c.get("id")]
        head = json.dumps(data)[:-1] + ', "cells": ['
        body = "".join(("\n" if i == 0 else ",\n") + json.dumps(c, default=str) for i, c in enumerate(kept))
        write_report(self.path, head + body + CLOSING.decode(), lost="the repaired results file")
        return (
            f"{self.path} was cut mid-write (a killed run or a full disk): repaired, keeping its "
            f"{len(kept)} complete cells"
        )

    def append(self, record: dict) -> None:
        """Replace the closing `]}` with `,<record>]}`; on a failed write, put the closing back, so the
        file stays what it was (unbuffered: a buffered file would retry the failed bytes on seek)."""
        line = json.dumps(scrub(record), default=str).encode()
        try:
            with self._lock, signals_deferred():
                fd = os.open(self.path, os.O_RDWR)
                try:
                    end = os.fstat(fd).st_size - len(CLOSING)
                    data = (b"\n" if os.pread(fd, 1, end - 1) == b"[" else b",\n") + line + CLOSING
                    try:
                        written = 0
                        while written < len(data):
                            written += os.pwrite(fd, data[written:], end + written)
                    except OSError:  # truncating frees what the write took, so the closing fits again
                        os.ftruncate(fd, end)
                        os.pwrite(fd, CLOSING, end)
                        raise
                finally:
                    os.close(fd)
        except OSError as exc:
            raise ReportWriteError(self.path, exc, f"the record of cell {record.get('id')}") from None


def load_results(path: Path) -> dict:
    """Read a results.json; a file cut short mid-line still yields its complete cell lines."""
    path = Path(path)
    if not path.exists():
        raise UserError("results file not found.", file=str(path), fix="point at a reports folder of a finished run.")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _salvage(text, path)
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"this is not a qwen-compat results file of schema version {SCHEMA_VERSION} "
            f"(found {data.get('schema_version') if isinstance(data, dict) else type(data).__name__}).",
            file=str(path),
            key="schema_version",
            fix="re-run the matrix with this qwen-compat version.",
        )
    return data


def _salvage(text: str, path: Path) -> dict:
    lines = text.splitlines()
    try:
        head = json.loads(lines[0].rsplit(', "cells": [', 1)[0] + "}")
    except (json.JSONDecodeError, IndexError):
        raise UserError(
            "the results file is corrupt (its header is not JSON).",
            file=str(path),
            fix="delete it and re-run, or restore it from the run's artifacts.",
        ) from None
    cells = []
    for line in lines[1:]:
        try:
            cells.append(json.loads(line.rstrip(",")))
        except json.JSONDecodeError:
            continue
    return {**head, "cells": cells}


def latest_records(data: dict) -> dict[str, dict]:
    """The last record of each cell id (a resumed run may have re-run some); records without an id
    (damaged by hand or by a tool) are left out."""
    return {cell["id"]: cell for cell in data["cells"] if isinstance(cell, dict) and cell.get("id")}


def changed_since_recorded(records: dict[str, dict], cells) -> list[str]:
    """For --compat-resume: the recorded cells whose definition differs from the matrix's now, each
    with the fields that changed."""
    changed = []
    for cell in cells:
        record = records.get(cell.id)
        if record is None:
            continue
        recorded = record.get("definition")
        if recorded is None:
            changed.append(f"{cell.id} (recorded without a definition, by an older qwen-compat)")
            continue
        if record.get("definition_sha") == cell.fingerprint():
            continue
        now = json.loads(json.dumps(cell.definition(), default=str))
        fields = sorted(k for k in now.keys() | recorded.keys() if now.get(k) != recorded.get(k))
        changed.append(f"{cell.id} ({', '.join(fields) or 'definition'})")
    return changed
