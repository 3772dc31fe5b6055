"""Which cells this host runs, and the marks that select them.

A cell targets a card (`v100-16gb`) or a family (`v100`: any size). Its marks are the card's keys
(`v100-16gb` and `v100`), the family of the model, the dtype, `gpu`, `slow`, `placement`, and
`this_host` when it runs here. Cells of other cards are deselected, not skipped: the counts and
JUnit say what ran on this host. When a selection leaves nothing for this host, the run fails with
one paragraph instead of passing having tested nothing.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

from harness.matrix.cells import Cell
from harness.matrix.gpus import selectors, table

HOST_MARK = "this_host"
DTYPE_MARKERS = ["float32", "float16", "bfloat16"]


def register(config, families) -> None:
    for key, gpu in table().items():
        what = (
            f"any size of the {gpu.name.removesuffix(' (any size)')} ({', '.join(gpu.sizes)})"
            if gpu.sizes
            else gpu.name
        )
        config.addinivalue_line("markers", f"{key}: cells targeting {what}")
    for key in families:
        config.addinivalue_line("markers", f"{key}: cells of the {key} model family")
    for dtype in DTYPE_MARKERS:
        config.addinivalue_line("markers", f"{dtype}: cells run in {dtype}")
    config.addinivalue_line("markers", f"{HOST_MARK}: the cells of the card this host has (what runs here)")
    config.addinivalue_line("markers", "gpu: cells that target a GPU")
    config.addinivalue_line("markers", "slow: cells of true-size or downloaded models")
    config.addinivalue_line("markers", "placement: cells whose model is placed by device_map (not `single`)")
    config.addinivalue_line("markers", "quantized: cells whose model runs in a quantized weight format")
    config.addinivalue_line(
        "markers", "xdist_group(name): cells that share one xdist worker: a model's dtypes, backends and placements"
    )


@functools.cache
def mark(name: str, *args, **kwargs):
    """Marks are shared between cells: a 10,000-cell matrix creates a few dozen, not 60,000."""
    return getattr(pytest.mark, name)(*args, **kwargs) if args or kwargs else getattr(pytest.mark, name)


def selection_marks(cell: Cell, host_key: str) -> list:
    marks = [mark(key) for key in selectors(cell.device)]
    marks += [mark(cell.family), mark(cell.dtype), mark("xdist_group", cell.xdist_group)]
    if cell.device == host_key:
        marks.append(mark(HOST_MARK))
    if table()[cell.device].is_gpu:
        marks.append(mark("gpu"))
    if cell.placement != "single":
        marks.append(mark("placement"))
    if cell.quantization != "none":
        marks.append(mark("quantized"))
    if "tiny" not in cell.source:
        marks.append(mark("slow"))
    return marks


def nothing_here(host_key: str, host_name: str, targets: Counter) -> str:
    """The paragraph for a selection with no cell of this host's card."""
    cards = ", ".join(f"{key} ({n} cell{'s' * (n != 1)})" for key, n in targets.most_common())
    first = next(iter(targets))
    return (
        f"qwen-compat: nothing to run on this host. It is {host_key} ({host_name}); the selected cells target "
        f"{cards}. Nothing was tested, so the run fails instead of passing. Fix: run this on a {first} host "
        f"(`pytest -m {first}` there), select this host's cells with `-m {HOST_MARK}` (or `-m {host_key}`), or "
        f"add {host_key} to the matrix's devices; `qwen-compat plan MATRIX --device {first}` predicts another "
        "card's cells without running them."
    )
