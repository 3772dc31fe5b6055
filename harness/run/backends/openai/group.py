"""A model entry's server and its cells: an `endpoint:` already running, or a `launch:` the harness starts.

A launched server is started for the group's first cell, restarted when a cell needs another command
line and after it died or hung, and stopped with the group; its memory is measured per cell (the
server's process tree on the CPU, NVML on a GPU, the engine's own figures where it logs them). A
server that dies mid-cell is a crash with its log tail; a video it declines is a skip in its words.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from harness.engines.server import Server, ServerGpuMemory, engine_memory, free_port, served_memory
from harness.errors import UserError
from harness.judge import agreement
from harness.judge.failures import is_sticky
from harness.matrix.cells import Cell
from harness.run.backends import HOST, RunContext, served_args, start_announced
from harness.run.backends.openai.stream import Client, Endpoint, EndpointUnreachable, HTTPError, ServerError
from harness.secrets import scrub, secret_values

ERROR_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\b:?")  # a Python exception's last line in a server log
# An engine saying it does not take an input at all (vLLM: "At most 0 video(s) may be provided in one
# prompt"; others: "... is not supported", "does not support video"): a skip, not a failure.
NOT_SUPPORTED = re.compile(
    r"(video|image)s?\b[^\n]{0,80}\b(not supported|unsupported|not (?:yet )?implemented)|"
    r"does(?: not|n't) support (?:\w+ )?(video|image|multimodal)|At most 0 (video|image)",
    re.IGNORECASE,
)
# vLLM's words when its engine core died (HTTP 500, or an error event in a stream): its API server exits a
# few seconds later (status 0), so the cell is a crash and the next cell gets a fresh server
ENGINE_DEAD = re.compile(r"EngineDeadError|EngineCore encountered an issue")
ENGINE_EXIT_S = 15.0
FAULT_SIGNALS = {"segfault": signal.SIGSEGV, "abort": signal.SIGABRT, "oom": signal.SIGKILL}


class ServerCrashed(ServerError):
    """The launched server died while a cell ran; the message has its exit and log tail."""


@dataclass
class Target:
    """How a model entry reaches its server: an `endpoint:` already running, or a `launch:` to start."""

    endpoint: str | None = None
    api_key_env: str | None = None
    launch: str | None = None  # a template name (launch.TEMPLATES) or a command with {placeholders}
    model_name: str | None = None  # served model name, when the server does not list it first
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    startup_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    pixels_field: str | None = "mm_processor_kwargs"  # how an endpoint takes min/max pixels (vLLM, LMDeploy)
    matrix_file: str | None = None


class OpenAIBackend:
    """Cells over an OpenAI-compatible server. A launched server is started for the first cell of a
    group, restarted when a cell needs another command line (another pixel budget, or a longer
    context, on an engine that takes them as server arguments) and after it died or hung, and
    stopped with `stop()`; its log is kept in `log_dir`."""

    def __init__(self, target: Target, log_dir: Path | None):
        if bool(target.endpoint) == bool(target.launch):
            raise UserError(
                "a model served over the OpenAI API needs exactly one of `endpoint:` (a running server) and "
                "`launch:` (a template or command the harness starts).",
                file=target.matrix_file,
                key="endpoint",
                fix="give `endpoint: http://host:port/v1`, or `launch: vllm` (transformers-serve, vllm, sglang, "
                "lmdeploy) or a command with {model} and {port}.",
            )
        self.target, self.log_dir = target, log_dir
        self.server: Server | None = None
        self.client: Client | None = None
        self._argv: list[str] | None = None
        self._engine: dict = {}
        self.gpu: ServerGpuMemory | None = None  # a launched server's device memory (GPU cells)
        self._processors: dict[str, object] = {}  # model folder -> its processor (chat template, tokenizer)
        if target.endpoint:
            self.client = Client(
                Endpoint(
                    target.endpoint,
                    model=target.model_name,
                    api_key_env=target.api_key_env,
                    connect_timeout_s=target.connect_timeout_s,
                    pixels_field=target.pixels_field,
                    matrix_file=target.matrix_file,
                )
            )

    # -- the server ---------------------------------------------------------------------------------------
    def _command(self, cell: Cell, port: int) -> tuple[list[str], str, str | None]:
        """(argv, readiness route, request field for pixels) of the cell's server."""
        from harness.engines.templates import TEMPLATES, user_command

        args = served_args(cell, port, self.target.gpu_memory_utilization, self.target.tensor_parallel_size)
        template = TEMPLATES.get(self.target.launch)
        if template is None:
            return user_command(self.target.launch, args, self.target.matrix_file), "/v1/models", None
        template.check_installed()
        return template.argv(args), template.ready_path, template.pixels_field

    def start(self, cell: Cell, emit=None) -> float:
        """Have a server ready for the cell; returns the seconds spent starting one (0 when reused). A start
        is announced through `emit` ("loading", "loaded"): it has the load's time limit, not the cell's."""
        if self.target.endpoint:
            self.client.model()  # an unreachable endpoint fails here, once, as one paragraph
            return 0.0
        port = self.server.port if self.server and self.server.alive() else free_port(HOST)
        argv, ready, pixels_field = self._command(cell, port)
        if self.server and self.server.alive() and argv == self._argv:
            return 0.0
        self.stop()
        log = Path(self.log_dir) / f"server-{time.strftime('%Y%m%dT%H%M%S')}-{port}.log"
        self.server = Server(
            argv, host=HOST, port=port, log_path=log, ready_path=ready, startup_timeout_s=self.target.startup_timeout_s
        )
        self._argv = argv
        seconds, self.gpu = start_announced(self.server, cell, emit)
        self._engine = engine_memory(self.server.log_text())
        self.client = Client(
            Endpoint(
                f"{self.server.url}/v1",
                model=self.target.model_name,
                api_key_env=self.target.api_key_env,
                pixels_field=pixels_field,
                connect_timeout_s=self.target.connect_timeout_s,
                matrix_file=self.target.matrix_file,
            )
        )
        self.client.model()  # the served model's name, while the server is known to be up
        return seconds

    def stop(self) -> None:
        if self.client and not self.target.endpoint:
            self.client.close()  # first: an open keep-alive connection delays the server's graceful exit
            self.client = None
        if self.server:
            self.server.stop()
        self.server = None

    # -- a cell -------------------------------------------------------------------------------------------
    def run(self, cell: Cell, context: RunContext | None = None) -> dict:
        """Run one cell: {"ok", "generation", "measurements"}; a failure raises with the server's words."""
        load_s = self.start(cell, context.emit if context else None)
        sampler, source = self.gpu.track(self.server.tree()) if self.gpu and self.server else (None, None)
        if self.server:
            self.server.reset_peak()
        try:
            if cell.fault is not None:
                self._inject(cell.fault)
            if context:
                context.emit({"event": "cell"})  # the cell's timeout starts here, after the server's start
            with sampler or contextlib.nullcontext():
                reply = self.client.run(cell)
        except (ServerError, EndpointUnreachable) as exc:
            if isinstance(exc, HTTPError):
                said = self._declined(exc, cell.input)
                # Only the engine's own "not supported" is a skip; any other error is a verdict, as in-process,
                # unless the run asked to be lenient (--compat-lenient).
                if NOT_SUPPORTED.search(said) or (context and context.lenient):
                    return {"ok": False, "skipped_category": "input-mismatch", "skipped": said}
                exc = ServerError(said)
            if self.server is None:
                raise exc from None
            time.sleep(0.2)  # a server that broke the connection by dying is reapable a moment later
            engine_dead = ENGINE_DEAD.search(str(exc))
            ended = self.server.ended() or (engine_dead and self.server.wait_ended(ENGINE_EXIT_S))
            if ended:
                how = f"the server {ended} while running the cell{self.server.kill_evidence()}: {exc}"
                raise ServerCrashed(self.server.failure(how)) from None
            message = self.server.failure(str(exc))
            if "exceeded its timeout" in message or is_sticky(message) or engine_dead:
                self.stop()  # a hung or poisoned server is replaced for the next cell
            raise ServerError(message) from None
        return scrub(  # an answer may echo the key
            {
                "ok": True,
                "generation": {
                    "text": reply.text,
                    "output_tokens": reply.output_tokens,
                    "finish_reason": reply.finish_reason,
                    "logprobs": reply.logprobs,
                },
                "measurements": {
                    **reply.measurements(),
                    "visual_tokens": self._visual_tokens(cell, reply.input_tokens),
                    "load_s": round(load_s, 4),
                    **self._memory(cell, sampler, source),
                    **(agreement.compare(cell, reply.text, context.reference_dir) if context else {}),
                },
            },
            secret_values([self.client.endpoint.api_key_env]),
        )

    def _declined(self, exc: HTTPError, kind: str) -> str:
        """The server's HTTP error in its own words: its answer and, for a launched server, the error its log
        ends with (the body of a 500 is often just "Internal Server Error")."""
        time.sleep(0.2)  # the server logs the error after answering
        lines = self.server.log_tail().splitlines() if self.server else []
        starts = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
        reason = []
        for line in lines[starts[-1] :] if starts else ():
            if not line.strip() or (reason and line.startswith(("INFO:", "WARNING:", " "))):
                break
            reason.append(line.strip())
        what = "video" if kind == "video" else "request"
        return f"the server answered this {what} with an error ({exc}){': ' + ' '.join(reason) if reason else ''}"

    def _inject(self, fault) -> None:
        """The matrix's `faults:` for a served cell (harness self-tests): the launched server is killed by
        the fault's signal as the cell starts, or the cell raises the given error."""
        if isinstance(fault, dict):
            raise ServerError(fault["raise"])
        if self.server and fault in FAULT_SIGNALS:
            os.kill(self.server.proc.pid, FAULT_SIGNALS[fault])

    def _visual_tokens(self, cell: Cell, input_tokens: int | None) -> int | None:
        """The server's prompt tokens less the prompt's text tokens, where the model's files are local: the
        chat template renders one pad token per picture, which the server expands to its visual tokens.
        (Qwen3-VL's per-frame timestamps of a video count as visual here.)"""
        from harness.models.checkpoints import checkpoint_for

        folder = checkpoint_for(cell.source)
        if input_tokens is None or not Path(folder).is_dir():
            return None
        if folder not in self._processors:
            from transformers import AutoProcessor

            self._processors[folder] = AutoProcessor.from_pretrained(folder, local_files_only=True)
        processor = self._processors[folder]
        kind = "video" if cell.input == "video" else "image"
        pictures = [{"type": kind}] * (cell.images if cell.input == "images" else 1)
        messages = [{"role": "user", "content": [*pictures, {"type": "text", "text": cell.prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = processor.tokenizer(text)["input_ids"]
        pad = processor.tokenizer.convert_tokens_to_ids(f"<|{kind}_pad|>")
        return input_tokens - (len(ids) - ids.count(pad))

    def _memory(self, cell: Cell, sampler, source: str | None) -> dict:
        return served_memory(self.server, cell.device, self.gpu, sampler, source, self._engine)
