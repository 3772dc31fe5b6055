"""What the worker sent back for one cell: the one type the judge reads, defined below the runner that
fills it, so the verdict never depends on how the result was produced."""

from __future__ import annotations

from dataclasses import dataclass, field

STDERR_TAIL_CHARS = 4000


@dataclass
class WorkerResult:
    """What came back for one cell: a generation, an error raised in the worker, or the worker's death."""

    ok: bool = False
    generation: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    error_type: str | None = None
    harness_error: bool = False  # raised as bad input or as the harness's own fault (any subclass): not the model
    error_message: str = ""
    traceback: str = ""
    returncode: int | None = None
    signal_name: str | None = None
    timed_out: bool = False
    load_timed_out: bool = False  # the limit hit was load_timeout_s (loading), not timeout_s (inference)
    stderr_tail: str = ""
    skipped: str | None = None  # why the cell did not run: predicted over the card, an input the server declines
    skipped_category: str = "predicted-oom"
    prediction: dict = field(default_factory=dict)
    worker_started: bool = False  # this cell started a worker (the first, or a replacement)
    model_loaded: bool = False  # this cell loaded a model (a new group, or after a replacement)

    @property
    def died(self) -> bool:
        return self.timed_out or self.returncode is not None
