"""The test WebUIs of tests/apps/, started for a test module: real Gradio apps on 127.0.0.1.

Each runs as a process of its own in a session of its own (harness.engines.server.Server): its
start is bounded by a timeout, its log is kept, and it is stopped by its process group on every exit
path (the fixture's teardown; the kernel's SIGKILL if pytest itself dies). Several models are served
by one process, one app each at /<family>/, so a module pays for one start.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from harness.engines.server import Server, free_port
from harness.models.families import FAMILIES

APPS = Path(__file__).parent / "apps"
HOST = "127.0.0.1"
ENV = {"GRADIO_ANALYTICS_ENABLED": "False"}  # gradio's launch() asks an outside host for its version otherwise


def app_command(script: str, port: int, *args: str) -> list[str]:
    return [sys.executable, str(APPS / script), "--server-name", HOST, "--server-port", str(port), *args]


@contextmanager
def running(script: str, log_dir: Path, families=tuple(FAMILIES), startup_timeout_s: float = 180):
    """The app `script` over the tiny checkpoint of each family, one at each /<family>/; yields the
    server (its `url` + /<family>/ is an app's address)."""
    from harness.models.checkpoints import tiny_checkpoint

    port = free_port(HOST)
    checkpoints = [arg for f in families for arg in ("-c", f"{f}={tiny_checkpoint(f)}")]
    server = Server(
        app_command(script, port, *checkpoints),
        host=HOST,
        port=port,
        log_path=log_dir / f"{Path(script).stem}.log",
        ready_path=f"/{families[-1]}/config",  # the apps are mounted in order: the last one up means all are
        startup_timeout_s=startup_timeout_s,
        env=ENV,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def in_process_text(cell) -> str:
    """The harness's own greedy answer for the cell (the model loaded here, as a `transformers` cell)."""
    from harness.models.checkpoints import checkpoint_for
    from harness.run import inference

    processor, model = inference.load(
        checkpoint_for(cell.source), dtype=cell.dtype, attn_implementation="sdpa", device="cpu"
    )
    spec = inference.CellInput(width=cell.width, height=cell.height, prompt=cell.prompt)
    return inference.run(
        processor, model, inference.prepare(processor, model, spec), max_new_tokens=cell.max_new_tokens
    ).text


@contextmanager
def in_process(demo, show_error: bool = False):
    """A small Gradio app of a test's own, launched in the test process on a free port; yields its URL."""
    port = free_port(HOST)
    demo.queue().launch(server_name=HOST, server_port=port, prevent_thread_lock=True, quiet=True, show_error=show_error)
    try:
        yield f"http://{HOST}:{port}/"
    finally:
        demo.close()
