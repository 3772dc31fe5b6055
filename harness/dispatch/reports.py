"""The head's side of a fleet run: every cell that comes back is appended at once to `<reports>/<card>/`
(so an interrupted head keeps all it received), with a progress line per device of the matrix; at the end
the JUnit reports of each folder's sessions are merged, its summaries written, then the fleet view.

The folder is the card the cell ran as, as a pytest run on that node names it: a family's cells (`v100`)
land in the folder of the size that ran them (`v100-32gb/`)."""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from harness.dispatch import session
from harness.dispatch.work import Chunk, Work
from harness.errors import UserError
from harness.matrix.cells import Cell
from harness.matrix.gpus import table
from harness.report import fleet
from harness.report.gate import FAILING
from harness.report.lock import RunLock
from harness.report.progress import Progress
from harness.report.results import ResultsFile, write_report
from harness.report.summary import write_summaries


class FleetReports:
    def __init__(self, root: Path, work: Work, color: bool | None = None):
        self.root = Path(root)
        self.work = work
        self.cells: dict[str, list[Cell]] = work.cells
        self.color = sys.stdout.isatty() if color is None else color
        self.started = time.monotonic()
        self.locks: list[RunLock] = []
        self.headers: dict[str, dict] = {}  # device -> what its results.json header adds (the fleet's facts)
        self.results: dict[str, ResultsFile] = {}  # by folder
        self.stats: dict[str, Counter] = {}  # by folder
        self.junit: dict[str, list[str]] = {}  # by folder
        self.progress: dict[str, Progress] = {}  # by device
        self.outcomes: dict[str, Counter] = {device: Counter() for device in self.cells}
        self.not_run_count: Counter = Counter()
        self.notes: list[str] = []

    # -- the folder ------------------------------------------------------------------------------
    def lock(self) -> None:
        """The folder and each device's folder, as a pytest run takes it: a second run on either is refused."""
        try:
            cards = [size for device in self.cells for size in (table()[device].sizes or (device,))]
            for folder in [self.root, *(self.root / card for card in dict.fromkeys(cards))]:
                lock = RunLock(folder)
                lock.acquire()
                self.locks.append(lock)
        except UserError:
            self.release()
            raise

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

    # -- what comes back (the scheduler's sink) ------------------------------------------------------
    def environment(self, device: str, environment: dict) -> None:
        folder = environment["device"]
        if folder not in self.results:  # a re-run elsewhere: the first session's header stays
            results = ResultsFile(self.root / folder / "results.json")
            results.start({**environment, "fleet": self.headers.get(device, {})}, resume=False)
            self.results[folder], self.stats[folder] = results, Counter()
        if device not in self.progress:
            self.progress[device] = Progress(
                lambda line, d=device: print(f"{d}: {line}", flush=True),
                color=self.color,
                planned=self.cells[device],
                started=self.started,
            )

    def cell(self, device: str, record: dict) -> None:
        folder = record["device"]
        self.results[folder].append(record)
        self.stats[folder].update(
            cells=1, model_loads=bool(record.get("model_loaded")), worker_starts=bool(record.get("worker_started"))
        )
        self.outcomes[device][record["outcome"]] += 1
        self.not_run_count[device] += bool(record.get("not_run"))
        self.progress[device].cell_done(record)

    def end(self, device: str, message: dict) -> None:
        folder = message["reports_key"]
        if message.get("junit"):
            self.junit.setdefault(folder, []).append(message["junit"])
        if message.get("server_logs"):
            with tarfile.open(fileobj=io.BytesIO(message["server_logs"]), mode="r:gz") as tar:
                tar.extractall(self.root / folder / "server-logs", filter="data")

    def not_run(self, chunk: Chunk, reason: str) -> None:
        """Cells no node can run: a session on this machine records them as skipped with the reason."""
        self.note(f"{chunk.device}: {len(chunk.cell_ids)} cells of {chunk.model} not run: {reason}")
        spec = session.Spec(
            matrix=self.work.matrix,
            device=chunk.device,
            reports_key=chunk.device,
            node_ids=list(chunk.node_ids),
            pytest_args=self.work.node_args,
            extra_args=["-p", "harness.dispatch.not_run", "--fleet-not-run", reason],
            annotations={
                "node_id": None,
                "node_ip": None,
                "emulated_accelerator": False,
                "category": None,
                "not_run": True,
            },
        )
        with tempfile.TemporaryDirectory(prefix="qwen-compat-not-run-") as folder:
            for message in session.run(spec, Path(folder)):
                self.take(chunk.device, message)

    def take(self, device: str, message: dict) -> None:
        """One message of a session, whichever machine ran it."""
        if message["kind"] == "environment":
            self.environment(device, message["environment"])
        elif message["kind"] == "cell":
            self.cell(device, message["record"])
        elif message["kind"] == "end":
            self.end(device, message)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"qwen-compat fleet: {text}", flush=True)

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, interrupted: bool) -> None:
        wall_s = round(time.monotonic() - self.started, 2)
        for folder in self.results:
            if self.junit.get(folder):
                write_report(self.root / folder / "junit.xml", merge_junit(self.junit[folder]), lost="junit.xml")
            stats = {"cells": 0, "model_loads": 0, "worker_starts": 0, **self.stats[folder]}
            write_summaries(self.root / folder, {**stats, "wall_s": wall_s, "interrupted": interrupted})
        if self.results:
            html_path, md_path = fleet.write([self.root], self.root)
            print(f"fleet view: {html_path} and {md_path}")

    def failing(self) -> int:
        return sum(n for counts in self.outcomes.values() for outcome, n in counts.items() if outcome in FAILING)

    def final_lines(self) -> list[str]:
        lines = []
        for device, counts in self.outcomes.items():
            done = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "nothing came back"
            not_run = f" ({self.not_run_count[device]} not run)" if self.not_run_count[device] else ""
            lines.append(f"{device}: {sum(counts.values())}/{len(self.cells[device])} cells: {done}{not_run}")
        return lines


def merge_junit(documents: list[str]) -> str:
    """One <testsuites> holding every session's <testsuite> (each names the node's host)."""
    merged = ET.Element("testsuites")
    for text in documents:
        root = ET.fromstring(text)
        merged.extend(root.iter("testsuite") if root.tag == "testsuites" else [root])
    return ET.tostring(merged, encoding="unicode", xml_declaration=True)
