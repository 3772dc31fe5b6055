"""Output health that needs the logits themselves (worker side): drift against float32.

A reduced-dtype cell's first-step logits are compared with those of the same cell in float32,
saved by that cell when it ran (float32 groups run first), so fp16 overflow in the vision tower
shows up as a numerical failure instead of a pass.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .cells import Cell


def _reference_path(reference_dir: Path, cell_id: str) -> Path:
    return reference_dir / (hashlib.sha256(cell_id.encode()).hexdigest()[:24] + ".pt")


def drift(cell: Cell, first_logits: torch.Tensor | None, reference_dir: Path) -> dict:
    """Save float32 logits as the reference; for other dtypes, measure against it when present."""
    if first_logits is None:
        return {}
    reference_dir.mkdir(parents=True, exist_ok=True)
    if cell.dtype == "float32":
        torch.save(first_logits, _reference_path(reference_dir, cell.id))
        return {}
    path = _reference_path(reference_dir, cell.drift_twin)
    if not path.exists():
        return {"drift_reference": None}
    reference = torch.load(path)
    if not torch.isfinite(first_logits).all():
        return {"drift_reference": cell.drift_twin, "drift_max_abs_diff": None, "drift_top1_agree": False}
    return {
        "drift_reference": cell.drift_twin,
        "drift_max_abs_diff": round(float((first_logits - reference).abs().max()), 5),
        "drift_top1_agree": bool(first_logits.argmax() == reference.argmax()),
    }
