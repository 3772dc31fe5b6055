"""What happens to a cell on this host, decided before it runs: the host's card, the matrix's own rule,
the card's capability rules, then the engine that would serve it."""

from __future__ import annotations

from harness.engines.availability import serving_expectation
from harness.matrix.capabilities import effective_expectation
from harness.matrix.cells import SERVED_BACKENDS, Cell, Expectation
from harness.matrix.gpus import table


def disposition(cell: Cell, host_key: str) -> Expectation:
    """What happens to the cell on this host: another card's cell is skipped, else its expectation."""
    if cell.device != host_key:
        return Expectation("skip", [], f"this host is {host_key}; cell targets {cell.device}", source="host")
    expectation = effective_expectation(cell, table()[cell.device])
    if cell.backend in SERVED_BACKENDS and expectation.source not in ("matrix", "capability"):
        return serving_expectation(cell) or expectation
    return expectation
