"""One chunk's pytest session: the harness's own `python -m pytest` in a subprocess, on a node (or, for cells
no node can run, on the head), its finished cells streamed one by one as they land in its results.json, so
that a node which dies later has already handed over every cell it finished."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from harness.report.results import load_results

# What a node's Python must import to run cells in-process: the plugin's and the worker's packages.
NEEDED = {
    "pytest": "pytest",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "torch": "torch",
    "transformers": "transformers",
}
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL: the plugin writes its reports and stops its worker in between


@dataclass
class Spec:
    matrix: str  # relative to the session's working directory (the shipped project)
    device: str  # the --compat-device value: a GPU table key, or auto on a node that has the card
    reports_key: str  # the folder the session writes under its reports folder: the card it runs as
    node_ids: list[str]
    pytest_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)  # added to every record (node id, emulation)


def missing_packages() -> list[str]:
    """The pip names of NEEDED that this Python cannot import."""
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def plugin_args() -> list[str]:
    """A node that has the project's dependencies but not the project installed has no pytest11 entry point:
    the shipped plugin is named instead (naming it where the entry point exists would register it twice)."""
    found = any(ep.name == "qwen_compat" for ep in metadata.entry_points(group="pytest11"))
    return [] if found else ["-p", "harness.plugin"]


def run(spec: Spec, workdir: Path, poll_s: float = 0.5):
    """Yield {"kind": "environment"}, then {"kind": "cell"} per finished cell, then {"kind": "end"}."""
    workdir.mkdir(parents=True, exist_ok=True)
    reports = workdir / "reports"
    argsfile = workdir / "cells.txt"
    argsfile.write_text("".join(f"{node_id}\n" for node_id in spec.node_ids))  # pytest reads @file, one per line
    command = [
        sys.executable,
        "-m",
        "pytest",
        f"@{argsfile}",
        "--compat-matrix",
        spec.matrix,
        "--compat-device",
        spec.device,
        "--compat-reports",
        str(reports),
        *plugin_args(),
        *spec.extra_args,
        *spec.pytest_args,
    ]
    log = workdir / "session.log"
    results = reports / spec.reports_key / "results.json"
    # Ray's variables belong to the task, not to the session; one, RAY_AUTH_MODE=token, has a secret-like
    # name, and the harness would scrub its value out of every worker result (new_token_ids -> new_***_ids).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONUNBUFFERED="1", **spec.env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        sent_environment, sent = False, set()
        while True:
            finished = proc.poll() is not None
            if results.exists():
                data = load_results(results)
                if not sent_environment:
                    sent_environment = True
                    yield {"kind": "environment", "environment": data["environment"]}
                for record in data["cells"]:
                    if isinstance(record, dict) and record.get("id") and record["id"] not in sent:
                        sent.add(record["id"])
                        yield {"kind": "cell", "record": {**record, **spec.annotations}}
            if finished:
                break
            time.sleep(poll_s)
        junit = reports / spec.reports_key / "junit.xml"
        yield {
            "kind": "end",
            "reports_key": spec.reports_key,
            "returncode": proc.returncode,
            "output_tail": log.read_text(errors="replace")[-3000:],
            "junit": junit.read_text() if junit.exists() else None,
            "server_logs": _tar(reports / spec.reports_key / "server-logs"),
        }
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End the session's process group (pytest, its worker, any server it launched), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _tar(folder: Path) -> bytes | None:
    if not folder.is_dir():
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()
