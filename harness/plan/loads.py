"""The load plan of a matrix on one device: the model loads its cells take in run order, and how long they should
take.

A group (`Cell.group`) is one load; its other cells run on the loaded model, their attention switched on it where
the backend does that (`SWITCHED_ATTENTION`). A load reads the model's weight files, or computes an `arch:`
model's seeded weights on the device; a served group's model is its server's. The predicted time is the weight
bytes at the read speed, or the values at the seeding speed, given by the caller (measured on this host by
`harness.devices.speeds`); building the modules and the processor is not counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.matrix.cells import Cell, run_order
from harness.plan.memory import BYTES, config_for, parameter_count

TINY_SAVED_BYTES = 4  # tiny checkpoints are saved in float32 (harness.models.checkpoints.tiny_checkpoint)


@dataclass
class Load:
    group: str
    first_cell: str
    cells: int = 1
    attentions: list[str] = field(default_factory=list)  # in run order; each after the first switched on the model
    weights: str = "read"  # read (from files) | seeded (computed on the device) | server (the server loads it)
    values: int = 0  # parameters
    bytes: int = 0  # read from files, or filled by seeding (values x the dtype's bytes)
    predicted_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _stored_bytes(cell: Cell, values: int) -> tuple[str, int]:
    """(how the weights arrive, their bytes) for an in-process load of the cell's model."""
    source = cell.source
    if "arch" in source:  # placed: its seeded weights written once in the cell's dtype, then read like a download
        return ("seeded" if cell.placement == "single" else "read"), values * BYTES[cell.dtype]
    if "tiny" in source:
        return "read", values * TINY_SAVED_BYTES
    folder = Path(source.get("path") or "")
    if "path" in source and folder.is_dir():
        recipe = folder / "qwen_compat_recipe.json"
        if recipe.is_file() and json.loads(recipe.read_text()).get("kind") == "architecture":
            return "seeded", values * BYTES[cell.dtype]
        files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
        return "read", sum(f.stat().st_size for f in files)
    stored = config_for(cell).get("torch_dtype") or config_for(cell).get("dtype") or "bfloat16"
    return "read", values * BYTES.get(str(stored), 2)


def load_plan(
    cells: list[Cell], *, read_bytes_per_s: float | None = None, seed_values_per_s: float | None = None
) -> list[Load]:
    """The loads of `cells` (one device's) in run order, each with its predicted seconds where a speed is known."""
    loads: list[Load] = []
    for cell in run_order(cells):
        if loads and loads[-1].group == cell.group:
            loads[-1].cells += 1
            if cell.attn_implementation not in loads[-1].attentions:
                loads[-1].attentions.append(cell.attn_implementation)
            continue
        load = Load(cell.group, cell.id, attentions=[cell.attn_implementation])
        if cell.backend == "openai":
            load.weights = "server"
        else:
            load.values = parameter_count(config_for(cell))
            load.weights, load.bytes = _stored_bytes(cell, load.values)
            speed, amount = (
                (seed_values_per_s, load.values) if load.weights == "seeded" else (read_bytes_per_s, load.bytes)
            )
            load.predicted_s = amount / speed if speed else None
        loads.append(load)
    return loads
