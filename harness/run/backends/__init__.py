"""Backends: what runs a cell's model inside the worker, behind one small interface.

- `transformers`: today's in-process path (`from_pretrained`, `generate`), the model loaded in the
  worker itself.
- `openai`: each cell one streamed chat-completion request to an OpenAI-compatible server, one
  the release pipeline started (`endpoint:`) or one the harness launches per group (`launch:`,
  see `harness.engines.templates` and `harness.engines.server`).

A backend has `run(cell, context)`, which makes the cell's group ready first (loads the model,
starts or reaches the server; announcing a load through `context.emit` so that the load has its
own time limit) and answers {"ok", "generation", "measurements"[, "prediction"]} or raises with
what went wrong, and `stop()`, which releases the group (frees the model, stops the server).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunContext:
    """What the run tells the worker beside the cell."""

    emit: Callable[[dict], None]  # protocol events to the parent ("loading", "loaded")
    reference_dir: Path  # float32 first-step logits, for drift
    server_logs: Path  # where launched servers' logs are kept
    emulate: str | None = None
    run_predicted_oom: bool = False
    lenient: bool = False  # a served cell's HTTP error is recorded as a skip (--compat-lenient), not a failure
