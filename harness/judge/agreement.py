"""Served against in-process: the image serves the model the harness tested.

A served cell (`backend: openai`) is compared with its in-process twin of the same run (the same
model identity, inputs, prompt, dtype and attention with `backend: transformers`; transformers
cells run first): the server stops at the end-of-text token while the in-process cell generates
all its tokens, so the served greedy text must be where the in-process text starts. In float32 a
difference is a failure (`wrong-answer`); in reduced dtypes engines legitimately pick other
kernels, so it is recorded only.

A WebUI's answer (`backend: gradio`) is compared as displayed: the app stops at its own token limit,
so either text may be the longer, and a Chatbot rewrites whitespace (it expands tabs and strips
leading blank characters), so runs of whitespace count as one space.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from harness.errors import write_whole
from harness.matrix.cells import Cell
from harness.models.checkpoints import checkpoint_for, model_identity

NO_TWIN = "not measured — no in-process twin in this run"
HELD_BACK = (
    "not measured — the served text is empty where the in-process text is only undecodable bytes (U+FFFD): "
    "vLLM streams no text for tokens that end inside a UTF-8 sequence"
)


def _path(cell: Cell, reference_dir: Path) -> Path:
    from harness.judge.drift import reference_key

    twin = dataclasses.replace(cell, backend="transformers")
    key = reference_key(twin, model_identity(cell.source, checkpoint_for(cell.source)))
    return reference_dir / f"{key}-{cell.dtype}.text.json"


def save(cell: Cell, text: str, reference_dir: Path) -> None:
    """Keep an in-process cell's greedy text for its served twin."""
    data = json.dumps({"id": cell.id, "text": text}).encode()
    write_whole(_path(cell, reference_dir), data, f"the in-process text of {cell.id}, for its served twin")


def _as_displayed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def compare(cell: Cell, text: str, reference_dir: Path, displayed: bool = False) -> dict:
    """Measurements: whether the served text agrees with the in-process twin's, and which twin;
    `displayed`: a WebUI's answer, compared as a page shows it."""
    path = _path(cell, reference_dir)
    if not path.exists():
        return {"agreement": NO_TWIN}
    twin = json.loads(path.read_text())
    if not text and twin["text"] and set(twin["text"]) == {"\ufffd"}:
        return {"agreement": HELD_BACK, "agreement_reference": twin["id"], "in_process_text": twin["text"]}
    if displayed:
        mine, theirs = _as_displayed(text), _as_displayed(twin["text"])
        agrees = bool(mine) and (theirs.startswith(mine) or mine.startswith(theirs))
    else:
        agrees = bool(text) and twin["text"].startswith(text)
    return {
        "agreement": "measured",
        "agreement_reference": twin["id"],
        "agrees": agrees,
        "in_process_text": twin["text"],
    }
