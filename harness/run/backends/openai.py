"""A cell as one streamed OpenAI chat-completion request, and what the stream says about it.

The cell's pixels (the same synthetic images, colours or files the in-process backend uses) travel
as base64 data URLs: images as lossless PNG `image_url` parts, a video as one `video_url` part in
vLLM's frame-sequence form (`data:video/jpeg;base64,<frame>,<frame>,...`). Decoding is greedy
(temperature 0, a fixed seed) and streamed, so time to first token and the decode rate come from
the arrival of the chunks; token counts come from the final `usage` (asked for with
`stream_options.include_usage`), token log-probabilities from `logprobs` where the server returns
them. httpx, with a connect timeout per endpoint and the cell's own timeout for reading.

Failures keep what the server said: an HTTP error keeps its status and body, a stream that ends
before a `finish_reason` is an error, and an endpoint that cannot be reached is one paragraph naming
the URL. The API key is read from the environment variable the matrix names, at request time, and
is never stored: a server body that echoes it has it replaced by `***`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.engines.server import Server, ServerGpuMemory, engine_memory, free_port, served_memory
from harness.errors import UserError
from harness.judge import agreement
from harness.judge.failures import is_sticky
from harness.matrix import inputs
from harness.matrix.cells import Cell
from harness.run.backends import HOST, RunContext, served_args, start_announced

SEED = 0
TOP_LOGPROBS = 5
BODY_CHARS = 2000  # of an error body kept in the message


class ServerError(RuntimeError):
    """The server answered the request with an error, or stopped answering it."""


class EndpointUnreachable(UserError):
    """Nothing answers at the endpoint's address: one paragraph for the whole run, not one per cell."""


@dataclass
class Endpoint:
    """Where an OpenAI-compatible server answers, and how to talk to it."""

    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # served model name; None: the first one GET /models lists
    api_key_env: str | None = None  # name of the environment variable holding the key
    connect_timeout_s: float = 5.0
    pixels_field: str | None = "mm_processor_kwargs"  # request field carrying min/max pixels; None: not sent
    matrix_file: str | None = None  # for error messages

    def __post_init__(self):
        self.url = self.url.rstrip("/")


@dataclass
class Reply:
    """What one streamed completion delivered, with the timings read off the stream."""

    text: str
    finish_reason: str
    input_tokens: int | None
    output_tokens: int | None
    prefill_s: float | None  # request sent -> first generated text (time to first token)
    decode_tokens_per_s: float | None
    request_s: float
    logprobs: list[dict] = field(default_factory=list)  # per token: token, logprob, top {token: logprob}

    def measurements(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "prefill_s": _round(self.prefill_s, 4),
            "decode_tokens_per_s": _round(self.decode_tokens_per_s, 2),
            "request_s": round(self.request_s, 4),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- the request -------------------------------------------------------------------------------------


def _png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _video_url(frames) -> str:
    """vLLM's frame-sequence data URL: base64 JPEG frames joined by commas (media type video/jpeg)."""
    from PIL import Image

    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(encoded)


def visual_parts(cell: Cell) -> list[dict]:
    """The content parts carrying the cell's images or video."""
    with inputs.built_by_the_harness(f"the {cell.width}x{cell.height} {cell.input} of this cell's request"):
        if cell.input == "video":
            url = _video_url(inputs.synthetic_video(cell.width, cell.height))
            return [{"type": "video_url", "video_url": {"url": url}}]
        images = inputs.pictures(cell.input, cell.width, cell.height, cell.images, **inputs.image_source(cell.image))
        return [{"type": "image_url", "image_url": {"url": _png_url(image)}} for image in images]


def chat_body(cell: Cell, model: str, pixels_field: str | None = "mm_processor_kwargs") -> dict:
    """The chat-completion request body of a cell: its pixels, its prompt, greedy decoding, streamed."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*visual_parts(cell), {"type": "text", "text": cell.prompt}]}],
        "max_tokens": cell.max_new_tokens,
        "temperature": 0,
        "seed": SEED,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
    }
    budget = {k: v for k, v in (("min_pixels", cell.min_pixels), ("max_pixels", cell.max_pixels)) if v is not None}
    if budget and pixels_field:
        body[pixels_field] = budget
    return body


# --- the client ----------------------------------------------------------------------------------------


class Client:
    """Sends cells to one endpoint over one keep-alive connection."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self._http = httpx.Client(timeout=httpx.Timeout(None, connect=endpoint.connect_timeout_s))
        self._model = endpoint.model

    def close(self) -> None:
        self._http.close()

    def _key(self) -> str | None:
        name = self.endpoint.api_key_env
        if not name:
            return None
        if name not in os.environ:
            raise UserError(
                f"the endpoint {self.endpoint.url} takes its API key from the environment variable {name}, "
                "which is not set.",
                file=self.endpoint.matrix_file,
                key="api_key_env",
                fix=f"export {name}=<key> before the run, or remove api_key_env for a server without a key.",
            )
        return os.environ[name]

    def _headers(self) -> dict:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _hide_key(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def _unreachable(self, exc: Exception) -> EndpointUnreachable:
        return EndpointUnreachable(
            f"the endpoint {self.endpoint.url} cannot be reached ({type(exc).__name__}: {exc}); no cell can run "
            "against it.",
            file=self.endpoint.matrix_file,
            key="endpoint",
            fix=f"start the server (or the container) first and check the host and port; "
            f"`curl {self.endpoint.url}/models` must answer.",
        )

    def model(self) -> str:
        """The served model's name: the endpoint's own, or the first GET /models lists."""
        if self._model is None:
            try:
                response = self._http.get(f"{self.endpoint.url}/models", headers=self._headers())
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise self._unreachable(exc) from None
            except httpx.TransportError as exc:
                raise ServerError(f"GET {self.endpoint.url}/models failed ({type(exc).__name__}: {exc})") from None
            if response.status_code >= 400:
                raise ServerError(
                    f"HTTP {response.status_code} from GET {self.endpoint.url}/models: "
                    f"{self._hide_key(response.text[:BODY_CHARS])}"
                )
            models = response.json().get("data") or []
            if not models:
                raise ServerError(f"GET {self.endpoint.url}/models lists no model")
            self._model = models[0]["id"]
        return self._model

    def run(self, cell: Cell, extra: dict | None = None) -> Reply:
        """Send the cell; the reply, or ServerError with what the server said, or EndpointUnreachable."""
        body = {**chat_body(cell, self.model(), self.endpoint.pixels_field), **(extra or {})}
        url = f"{self.endpoint.url}/chat/completions"
        timeout = httpx.Timeout(cell.timeout_s, connect=self.endpoint.connect_timeout_s)
        try:
            start = time.perf_counter()
            with self._http.stream("POST", url, json=body, headers=self._headers(), timeout=timeout) as response:
                if response.status_code >= 400:
                    text = response.read().decode(errors="replace")
                    raise HTTPError(f"HTTP {response.status_code} from POST {url}: {self._hide_key(text[:BODY_CHARS])}")
                return _read_stream(response.iter_lines(), start, cell.timeout_s, self._hide_key)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TimeoutException:
            raise ServerError(
                f"cell exceeded its timeout of {cell.timeout_s:g} s: the server sent nothing for that long"
            ) from None
        except httpx.TransportError as exc:
            raise ServerError(f"the connection to {url} broke mid-answer ({type(exc).__name__}: {exc})") from None


def _read_stream(lines, start: float, timeout_s: float, hide) -> Reply:
    """Read server-sent events up to the end of the answer; an answer that stops early is an error, one
    that trickles on past the cell's timeout too (the read timeout only catches silence)."""
    text, logprobs = [], []
    first = last = None
    finish = usage = None
    chunks = 0
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        if time.perf_counter() - start > timeout_s:
            raise ServerError(f"cell exceeded its timeout of {timeout_s:g} s: the answer was still streaming")
        event = json.loads(data)
        if "error" in event:
            raise ServerError(
                f"the server reported an error mid-stream: {hide(json.dumps(event['error']))[:BODY_CHARS]}"
            )
        chunks += 1
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            piece = delta.get("content") or delta.get("reasoning_content") or ""
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text.append(piece)
            for entry in (choice.get("logprobs") or {}).get("content") or ():
                logprobs.append(
                    {
                        "token": entry["token"],
                        "logprob": entry["logprob"],
                        "top": {t["token"]: t["logprob"] for t in entry.get("top_logprobs") or ()},
                    }
                )
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    if finish is None:
        raise ServerError(
            f"the stream stopped before the answer ended: {chunks} chunks, {len(''.join(text))} characters and "
            "no finish_reason"
        )
    usage = usage or {}
    output_tokens = usage.get("completion_tokens")
    steps = output_tokens if output_tokens is not None else len(logprobs) or None
    rate = (steps - 1) / (last - first) if steps and steps > 1 and last > first else None
    return Reply(
        text="".join(text),
        finish_reason=finish,
        input_tokens=usage.get("prompt_tokens"),
        output_tokens=output_tokens,
        prefill_s=(first - start) if first else None,
        decode_tokens_per_s=rate,
        request_s=end - start,
        logprobs=logprobs,
    )


# --- the backend: a group's server (reached or launched) and its cells ----------------------------------


ERROR_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\b:?")  # a Python exception's last line in a server log
FAULT_SIGNALS = {"segfault": signal.SIGSEGV, "abort": signal.SIGABRT, "oom": signal.SIGKILL}


class HTTPError(ServerError):
    """The server answered the request with an HTTP error status (its body is in the message)."""


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
            with sampler or contextlib.nullcontext():
                reply = self.client.run(cell)
        except (ServerError, EndpointUnreachable) as exc:
            if cell.input == "video" and isinstance(exc, HTTPError):
                return {"ok": False, "skipped_category": "input-mismatch", "skipped": self._declined(exc)}
            if self.server is None:
                raise
            time.sleep(0.2)  # a server that broke the connection by dying is reapable a moment later
            ended = self.server.ended()
            if ended:
                raise ServerCrashed(self.server.failure(f"the server {ended} while running the cell: {exc}")) from None
            message = self.server.failure(str(exc))
            if "exceeded its timeout" in message or is_sticky(message):
                self.stop()  # a hung or poisoned server is replaced for the next cell
            raise ServerError(message) from None
        return {
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
        }

    def _declined(self, exc: HTTPError) -> str:
        """A server that answers a video with an HTTP error does not take videos: in its own words, its
        answer and, for a launched server, the error its log ends with (the body of a 500 is often just
        "Internal Server Error")."""
        time.sleep(0.2)  # the server logs the error after answering
        lines = self.server.log_tail().splitlines() if self.server else []
        starts = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
        reason = []
        for line in lines[starts[-1] :] if starts else ():
            if not line.strip() or (reason and line.startswith(("INFO:", "WARNING:", " "))):
                break
            reason.append(line.strip())
        return f"the server does not take this video ({exc}){': ' + ' '.join(reason) if reason else ''}"

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
