"""Output health that needs the logits themselves (worker side): drift against float32.

A reduced-dtype or quantized cell's first-step logits are compared with those of its float32
unquantized twin in the same run (that group runs first). References are keyed by what makes two
cells comparable: the model's identity (source, seed, checkpoint recipe), the cell's inputs, the
attention implementation and the harness version, so a reference from another model or another run is never used.
Agreement is judged as vLLM's `check_logprobs_close` does: a differing first token is accepted
when each side's token is in the other's top-k. Random-weight models have tiny logit margins, and
strict top-1 agreement flips on rounding alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from harness.errors import write_whole
from harness.matrix.cells import Cell

NO_TWIN = "not measured — no float32 twin in this run"


@cache
def _harness_version() -> str:
    """Read once per process: a package metadata lookup costs half a millisecond, twice a cell."""
    try:
        return metadata.version("qwen-compat")
    except metadata.PackageNotFoundError:
        return "source"


def reference_key(cell: Cell, model_identity: dict) -> str:
    """The same for a cell and its float32 twin, different as soon as model, inputs or harness differ."""
    fields = {
        "model": model_identity,
        "attn": cell.attn_implementation,
        "inputs": [cell.resolution, cell.input, cell.min_pixels, cell.max_pixels, cell.images, cell.image],
        "prompt": cell.prompt,
        "backend": cell.backend,
        "extra": cell.extra,
        "harness": _harness_version(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _top_k(logits: torch.Tensor, k: int) -> set[int]:
    return set(logits.topk(min(k, logits.numel())).indices.tolist())


def drift(cell: Cell, first_logits: torch.Tensor | None, reference_dir: Path, key: str) -> dict:
    """Save the float32 unquantized cell's logits as the reference (`Cell.drift_reference`); for other dtypes and
    quantized forms of the model, compare with it when this run has it."""
    if first_logits is None:
        return {}
    path = reference_dir / f"{key}.pt"
    if cell.drift_reference:
        # serialised in memory, then written whole: torch.save onto a full disk raises a RuntimeError ("file
        # write failed") and leaves a truncated file; a full disk is the runner's problem, never this model's
        buffer = io.BytesIO()
        torch.save(first_logits, buffer)
        write_whole(path, buffer.getvalue(), f"the float32 reference logits of {cell.id}")
        return {}
    if not path.exists():
        return {"drift": NO_TWIN}
    reference = torch.load(path)
    measured = {"drift": "measured", "drift_reference": cell.drift_twin}
    if not torch.isfinite(first_logits).all():
        return {**measured, "drift_relative_diff": None, "drift_top1_agree": False, "drift_topk_agree": False}
    ours, theirs = int(first_logits.argmax()), int(reference.argmax())
    k = cell.drift_top_k
    difference = (first_logits - reference).abs().max()
    scale = reference.abs().max().clamp_min(1e-12)
    return {
        **measured,
        "drift_max_abs_diff": round(float(difference), 5),
        "drift_relative_diff": round(float(difference / scale), 5),
        "drift_top1_agree": ours == theirs,
        "drift_topk_agree": ours == theirs or (ours in _top_k(reference, k) and theirs in _top_k(first_logits, k)),
    }
