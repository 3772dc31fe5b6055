"""Budgets as the matrix writes them ('14GiB', '900MiB', '90%') in MiB of the card the cell targets.

Parsed here, below the planner and the judge, because both compare a memory figure with the same budget."""

from __future__ import annotations

import psutil

from harness.matrix.gpus import table


def parse_budget_mib(budget: str, device: str) -> float:
    """'14GiB' / '900MiB' / '90%' (of the card's physical memory, or of host RAM for cpu) -> MiB."""
    text = budget.replace(" ", "")
    if text.endswith("GiB"):
        return float(text[:-3]) * 1024
    if text.endswith("MiB"):
        return float(text[:-3])
    card = table()[device].memory_mib or psutil.virtual_memory().total / 2**20
    return float(text[:-1]) / 100 * card
