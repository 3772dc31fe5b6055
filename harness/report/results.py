"""Per-device results: `reports/<device>/results.json` and `results.jsonl`, written per finished cell.

results.json is valid JSON after every append (the closing `]}` is rewritten each time), and each cell
sits on its own line, so a run killed with SIGKILL keeps every finished cell and `--compat-resume` can
pick up where it stopped. results.jsonl is JSON Lines for the tools that read them: one record a line,
each with the run's environment, appended whole (a torn last line is undone or skipped). Nothing whose
name looks like a secret reaches a report.

One run writes a folder at a time (the run lock), so appends take no lock of their own.
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

from harness.errors import ReportWriteError, UserError, write_whole
from harness.matrix.schema import AXIS_FIELDS
from harness.report.provenance import provenance
from harness.secrets import scrub, scrub_text

SCHEMA_VERSION = 1
CLOSING = b"\n]}\n"
CELL_FIELDS = ("id", *AXIS_FIELDS)
INTERNAL_DIR = ".qwen-compat"  # <reports>/.qwen-compat/: what runs keep for themselves, never a report


def references_dir(device_dir: Path) -> Path:
    """Where a device's run keeps its float32 references (drift, agreement): outside `<reports>/<device>/`,
    the folder a CI uploads, as `<reports>/.qwen-compat/references/<device>/`."""
    device_dir = Path(device_dir)
    return device_dir.parent / INTERNAL_DIR / "references" / device_dir.name


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
        "provenance": provenance(Path(matrix_file).resolve().parent if matrix_file else None),
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
    """Append-only results for one device: results.json (always valid JSON) and results.jsonl beside it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines = JsonLines(self.path.with_suffix(".jsonl"))
        self.environment: dict = {}

    def start(self, env: dict, *, resume: bool) -> str | None:
        """Begin a run: keep what is there when resuming (repairing a torn last line, which is said in
        the returned note), otherwise start empty files. New JSON lines carry this run's environment."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.environment = scrub(env)
        if resume and self.path.exists():
            self.lines.start(keep=True)
            return self._repair()
        head = json.dumps({"schema_version": SCHEMA_VERSION, "environment": self.environment})[:-1]
        write_report(self.path, head + ', "cells": [' + CLOSING.decode(), lost="the new results file")
        self.lines.start(keep=False)
        return None

    def _repair(self) -> str | None:
        """Rewrite a file cut mid-line (SIGKILL, a full disk) as its complete records."""
        data, cut = read_results(self.path)
        if not cut:
            return None
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
        file stays what it was (unbuffered: a buffered file would retry the failed bytes on seek).
        Then the same record, with the run's environment, as one JSON line."""
        record = scrub(record)
        line = json.dumps(record, default=str).encode()
        try:
            with signals_deferred():
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
        self.lines.append({**record, "environment": self.environment}, f"the JSON line of cell {record.get('id')}")


class JsonLines:
    """A JSON Lines file written a whole line at a time: a failed write is cut back off, and a line torn
    by SIGKILL is cut off when a resumed run starts (readers skip it before that)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def start(self, *, keep: bool) -> None:
        try:
            with signals_deferred():
                if not keep or not self.path.exists():
                    self.path.write_bytes(b"")
                    return
                text = self.path.read_bytes()
                if not text.endswith(b"\n"):
                    os.truncate(self.path, text.rfind(b"\n") + 1)
        except OSError as exc:
            raise ReportWriteError(self.path, exc, "the JSON Lines file of this run") from None

    def append(self, record: dict, lost: str) -> None:
        line = json.dumps(record, default=str).encode() + b"\n"
        try:
            with signals_deferred():
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    size = os.fstat(fd).st_size
                    try:
                        written = 0
                        while written < len(line):
                            written += os.write(fd, line[written:])
                    except OSError:
                        os.ftruncate(fd, size)
                        raise
                finally:
                    os.close(fd)
        except OSError as exc:
            raise ReportWriteError(self.path, exc, lost) from None


def read_json_lines(path: Path) -> list[dict]:
    """The whole lines of a results.jsonl; a torn last line (a killed run) is left out."""
    records = []
    for line in _read_text(Path(path)).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_text(path: Path) -> str:
    """A report's text, or one paragraph on why it cannot be one (missing, a folder, binary, unreadable)."""
    if not path.exists():
        raise UserError("results file not found.", file=str(path), fix="point at a reports folder of a finished run.")
    if path.is_dir():
        raise UserError(
            "this is a folder, not a results file.",
            file=str(path),
            fix="remove or rename the folder; a reports folder holds <device>/results.json files.",
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            "this results file is not text (binary data, or an encoding other than UTF-8).",
            file=str(path),
            fix="restore it from the run's artifacts, or delete it and re-run the matrix.",
        ) from None
    except OSError as exc:
        raise UserError(
            f"cannot read the results file: {exc.strerror or exc}.", file=str(path), fix="check its permissions."
        ) from None


def read_results(path: Path) -> tuple[dict, bool]:
    """A results.json and whether it was cut short mid-line (then its complete cell lines are returned)."""
    path = Path(path)
    text = _read_text(path)
    cut = False
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data, cut = _salvage(text, path), True
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"this is not a qwen-compat results file of schema version {SCHEMA_VERSION} "
            f"(found {data.get('schema_version') if isinstance(data, dict) else type(data).__name__}).",
            file=str(path),
            key="schema_version",
            fix="re-run the matrix with this qwen-compat version.",
        )
    if not isinstance(data.get("cells"), list):
        raise UserError(
            "this results file has no list of cells.",
            file=str(path),
            key="cells",
            fix="restore it from the run's artifacts, or delete it and re-run the matrix.",
        )
    return data, cut


def load_results(path: Path) -> dict:
    """Read a results.json; a file cut short mid-line still yields its complete cell lines."""
    return read_results(path)[0]


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


def results_files(folder: Path) -> list[Path]:
    """The results.json of a device folder, or those of every `<device>/` in a reports folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "reports folder not found.",
            file=str(folder),
            fix="pass a folder holding <device>/results.json (e.g. reports/), or a saved baseline name.",
        )
    if (folder / "results.json").exists():
        return [folder / "results.json"]
    files = sorted(folder.glob("*/results.json"))
    if not files:
        raise UserError(
            "no <device>/results.json in this folder.",
            file=str(folder),
            fix="run the matrix first (pytest --compat-reports DIR), or point at the folder it wrote.",
        )
    return files


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
