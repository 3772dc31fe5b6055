"""Budgets as the matrix writes them ('14GiB', '900MiB', '90%') in MiB of the card the cell targets.

Parsed here, below the planner and the judge, because both compare a memory figure with the same budget."""

from __future__ import annotations

import psutil

from harness.matrix.gpus import table


def parse_budget_mib(budget: str, device: str, device_mib: float | None = None) -> float:
    """'14GiB' / '900MiB' / '90%' -> MiB. A percentage is of the memory of the device the cell ran on where the
    worker measured it (`device_mib`: a MIG slice's own, not its card's), else of the card's physical memory
    from the GPU table, or of host RAM for cpu."""
    text = budget.replace(" ", "")
    if text.endswith("GiB"):
        return float(text[:-3]) * 1024
    if text.endswith("MiB"):
        return float(text[:-3])
    card = device_mib or table()[device].memory_mib or psutil.virtual_memory().total / 2**20
    return float(text[:-1]) / 100 * card
