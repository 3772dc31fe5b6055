"""What a fleet run has to do: the matrix's cells as pytest selects them (the user's -k/-m applied), per
device as the matrix names it (a card, or a family such as v100: any of its sizes), cut into chunks of
one model each.

A chunk never splits a model: its float32 references, its `single` placement twins and its in-process
twins of served cells are compared on the node that ran them, and the model loads once there.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.matrix import schema as matrix_mod
from harness.matrix.cells import Cell
from harness.matrix.gpus import table

# Options the fleet sets on every node itself; given by the user they would contradict it.
FLEET_OWNED = {
    "--compat-device": "the fleet runs each device on the nodes that advertise it",
    "--compat-reports": "the fleet writes <--reports>/<device>/ itself (pass --reports DIR to `fleet`)",
    "--compat-resume": "each node starts its cells anew in a folder of its own",
    "--compat-emulate": "a node runs the card it advertises",
    "--compat-gpu-per-worker": "the fleet gives each GPU of a node its own xdist worker itself",
    "--compat-save-baseline": "save the merged folder afterwards with `qwen-compat run ... --compat-save-baseline`",
    "-n": "the fleet starts one xdist worker per GPU of each node itself",
    "--numprocesses": "the fleet starts one xdist worker per GPU of each node itself",
}


@dataclass(frozen=True)
class Chunk:
    """Cells of one model on one device, run by one pytest session on one node."""

    device: str
    model: str
    node_ids: tuple[str, ...]  # pytest node ids, in run order
    cell_ids: tuple[str, ...]

    @classmethod
    def joined(cls, chunks: list[Chunk]) -> Chunk:
        """Chunks of one device as one (what a single session records as not run)."""
        return cls(
            chunks[0].device,
            ", ".join(c.model for c in chunks),
            tuple(n for c in chunks for n in c.node_ids),
            tuple(i for c in chunks for i in c.cell_ids),
        )

    def without(self, finished: set[str]) -> Chunk | None:
        """The cells not finished yet (what another node re-runs), or None when all are."""
        kept = [(n, c) for n, c in zip(self.node_ids, self.cell_ids, strict=True) if c not in finished]
        if not kept:
            return None
        return Chunk(self.device, self.model, tuple(n for n, _ in kept), tuple(c for _, c in kept))


@dataclass
class Work:
    matrix: str  # relative to the project folder the nodes receive
    cells: dict[str, list[Cell]]  # device -> its selected cells, in run order
    chunks: dict[str, list[Chunk]]  # device -> its chunks, largest first
    node_args: list[str] = field(default_factory=list)  # the user's pytest options, without positional paths


def check_pytest_args(args: list[str]) -> None:
    for arg in args:
        name = arg.split("=", 1)[0]
        owned = name if name in FLEET_OWNED else "-n" if arg.startswith("-n") and not arg.startswith("--") else None
        if owned:
            raise UserError(
                f"`qwen-compat fleet` sets {owned} on every node itself: {FLEET_OWNED[owned]}.",
                key=owned,
                fix=f"leave {owned} out of the pytest arguments.",
            )


def project_relative(matrix: str, project: Path) -> str:
    """The matrix's path inside the project folder that Ray ships to the nodes."""
    path = Path(matrix).resolve()
    if not path.is_file():
        raise UserError("matrix file not found.", file=matrix, fix="pass the path of a matrix YAML file.")
    if not path.is_relative_to(project):
        raise UserError(
            f"the matrix is outside the project folder {project}, which is what Ray ships to the nodes.",
            file=matrix,
            fix="put the matrix inside the project (e.g. matrices/) and run `qwen-compat fleet` from the project.",
        )
    return os.path.relpath(path, project)


class _Collector:
    """Keeps the cell items of a collect-only session, after the user's -k/-m and the plugin's run order."""

    def __init__(self):
        self.items: list[tuple[str, Cell]] = []
        self.seen: set[str] = set()
        self.positional: list[str] = []

    def pytest_collection_finish(self, session):
        """Called once per device's collection; each keeps only that device's cells."""
        config = session.config
        if config.args_source == pytest.Config.ArgsSource.ARGS:
            self.positional = list(config.args)
        for item in session.items:
            cell = getattr(item, "callspec", None) and item.callspec.params.get("cell")
            if isinstance(cell, Cell) and cell.id not in self.seen:  # a family's cells come with each size too
                self.seen.add(cell.id)
                self.items.append((item.nodeid, cell))


def collect(matrix: str, project: Path, pytest_args: list[str]) -> Work:
    """Expand and select the matrix's cells as each device's sessions will: one collection per device of the
    matrix, in this process, with that device as the host (a host's session deselects other cards' cells)."""
    check_pytest_args(pytest_args)
    relative = project_relative(matrix, project)
    loaded = matrix_mod.load(matrix)  # bad input (an unknown device, a typo): one paragraph, before any cluster
    devices = list(dict.fromkeys(d for section in loaded.all_sections() for d in section.devices))
    devices.sort(key=lambda d: not table()[d].sizes)  # families first: their cells go to any size's nodes
    collector = _Collector()
    cwd = os.getcwd()
    try:
        os.chdir(project)
        for device in devices:
            _collect_device(collector, relative, device, pytest_args, matrix)
    finally:
        os.chdir(cwd)
    for key in {cell.device for _, cell in collector.items}:
        gpu = table()[key]
        if gpu.is_gpu and not gpu.ray_accelerator:
            raise UserError(
                f"the GPU table row '{key}' names no Ray accelerator type, so no node can be asked for it.",
                file="harness/data/gpus.yaml",
                key=f"{key}.ray_accelerator",
                fix="add `ray_accelerator:` with the accelerator_type its Ray nodes advertise (ray.util.accelerators).",
            )
    return Work(
        matrix=relative,
        cells=_by_device(collector.items),
        chunks=_chunks(collector.items),
        node_args=[a for a in pytest_args if a not in collector.positional],
    )


def _collect_device(collector: _Collector, relative: str, device: str, pytest_args: list[str], matrix: str) -> None:
    output = io.StringIO()
    args = ["--collect-only", "-q", "--compat-matrix", relative, "--compat-device", device, *pytest_args]
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = pytest.main(args, plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        said = [line.removeprefix("ERROR: ") for line in output.getvalue().splitlines() if line.startswith("ERROR: ")]
        if code == pytest.ExitCode.USAGE_ERROR and said:  # the plugin's (or pytest's) own paragraph
            raise UserError(said[0])
        tail = output.getvalue().strip()[-1500:]
        raise UserError(
            f"pytest could not collect the matrix's cells (exit {int(code)}): {tail}",
            file=matrix,
            fix="run `pytest --collect-only --compat-matrix MATRIX [args]` to see the same error and fix it.",
        )


def _by_device(items: list[tuple[str, Cell]]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for _, cell in items:
        out.setdefault(cell.device, []).append(cell)
    return out


def _chunks(items: list[tuple[str, Cell]]) -> dict[str, list[Chunk]]:
    grouped: dict[tuple[str, str], list[tuple[str, Cell]]] = {}
    for node_id, cell in items:
        grouped.setdefault((cell.device, cell.model), []).append((node_id, cell))
    out: dict[str, list[Chunk]] = {}
    for (device, model), members in grouped.items():
        chunk = Chunk(device, model, tuple(n for n, _ in members), tuple(c.id for _, c in members))
        out.setdefault(device, []).append(chunk)
    for chunks in out.values():
        chunks.sort(key=lambda c: -len(c.cell_ids))  # largest first: the last to finish is a small one
    return out
