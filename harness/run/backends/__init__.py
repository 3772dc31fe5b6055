"""Backends: what runs a cell's model inside the worker, behind one small interface.

- `transformers`: today's in-process path (`from_pretrained`, `generate`), the model loaded in the
  worker itself.
- `openai`: each cell one streamed chat-completion request to an OpenAI-compatible server, one
  the release pipeline started (`endpoint:`) or one the harness launches per group (`launch:`,
  see `harness.engines.templates` and `harness.engines.server`).
- `gradio`: each cell one conversation with a Gradio WebUI, driven as a person drives the page, at
  the model's `webui:` or one the harness launches per group (a command, or `docker run` of an image:
  `harness.engines.docker`).

A backend has `run(cell, context)`, which makes the cell's group ready first (loads the model,
starts or reaches the server; announcing a load through `context.emit` so that the load has its
own time limit) and answers {"ok", "generation", "measurements"[, "prediction"]} or raises with
what went wrong, and `stop()`, which releases the group (frees the model, stops the server).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.engines.server import Server, ServerGpuMemory
from harness.engines.templates import launch_args
from harness.matrix.cells import Cell
from harness.matrix.launch import LaunchArgs

HOST = "127.0.0.1"  # launched servers listen here only


@dataclass
class RunContext:
    """What the run tells the worker beside the cell."""

    emit: Callable[[dict], None]  # protocol events to the parent ("loading", "loaded")
    reference_dir: Path  # float32 first-step logits, for drift
    server_logs: Path  # where launched servers' logs are kept
    emulate: str | None = None
    run_predicted_oom: bool = False
    lenient: bool = False  # a served cell's HTTP error is recorded as a skip (--compat-lenient), not a failure


def served_args(cell: Cell, port: int, gpu_memory_utilization: float, tensor_parallel_size: int) -> LaunchArgs:
    """The launch values of the cell's own server: its model's folder (or hub id), on HOST and `port`."""
    from harness.models.checkpoints import checkpoint_for

    return launch_args(
        cell,
        str(checkpoint_for(cell.source)),
        host=HOST,
        port=port,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )


def start_announced(server: Server, cell: Cell, emit) -> tuple[float, ServerGpuMemory | None]:
    """Start a group's server: announced through `emit` ("loading", "loaded"), so that the start has the
    load's time limit, not the cell's; on a GPU, with what the devices used before it existed. Returns
    the seconds it took and the GPU tracker (None on the CPU)."""
    if emit:
        emit({"event": "loading", "group": cell.group})
    gpu = None
    if cell.device != "cpu":
        from harness.devices import nvml

        gpu = ServerGpuMemory(nvml.load(), server.env.get("CUDA_VISIBLE_DEVICES"))
    seconds = server.start()
    if emit:
        emit({"event": "loaded", "group": cell.group})
    return seconds, gpu
