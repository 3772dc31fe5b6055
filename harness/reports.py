"""Per-device results: `reports/<device>/results.json`, written one line per finished cell.

The file is valid JSON after every append (the closing `]}` is rewritten each time), and each cell
sits on its own line, so a run killed with SIGKILL keeps every finished cell and `--resume` can
pick up where it stopped. Nothing whose name looks like a secret reaches a report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from .errors import UserError
from .matrix import AXIS_FIELDS
from .secrets import scrub

SCHEMA_VERSION = 1
CLOSING = b"\n]}\n"
CELL_FIELDS = ("id", *AXIS_FIELDS)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def environment(host, matrix_file: str | None) -> dict:
    """Everything needed to reproduce or compare a run; never the environment variables themselves."""
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
        "torch": _version("torch"),
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


class ResultsFile:
    """Append-only results for one device; always valid JSON on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock")

    def start(self, env: dict, *, resume: bool) -> None:
        """Begin a run: keep what is there when resuming, otherwise start an empty file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if resume and self.path.exists():
                return
            head = json.dumps({"schema_version": SCHEMA_VERSION, "environment": scrub(env)})[:-1]
            self.path.write_bytes(head.encode() + b', "cells": [' + CLOSING)

    def append(self, record: dict) -> None:
        line = json.dumps(scrub(record), default=str).encode()
        with self._lock, open(self.path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell() - len(CLOSING)
            f.seek(end - 1)
            separator = b"\n" if f.read(1) == b"[" else b",\n"
            f.seek(end)
            f.write(separator + line + CLOSING)
            f.truncate()


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
    """The last record of each cell id (a resumed run may have re-run some)."""
    return {cell["id"]: cell for cell in data["cells"]}
