"""Sending a cell to an OpenAI-compatible endpoint, and what the stream says about it.

Time to first token and the decode rate come from the arrival of the chunks; token counts come from
the final `usage`, or, from a server that sends none, from the stream itself (its log-probabilities,
one per token, or its chunks that carry text), said so in the measurements; token log-probabilities
from `logprobs` where the server returns them. httpx, with a connect timeout per endpoint and the
cell's own timeout for reading.

Failures keep what the server said: an HTTP error keeps its status and body, a stream that ends
before a `finish_reason` is an error, and an endpoint that cannot be reached is one paragraph naming
the URL. The API key is read from the environment variable the matrix names, at request time, and
is never stored: a server body that echoes it has it replaced by `***`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import httpx

from harness.errors import UserError
from harness.matrix.cells import Cell
from harness.run.backends.openai.request import chat_body
from harness.secrets import scrub_text

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
    output_tokens_source: str = "usage"  # usage | logprobs | text chunks (a server that sent no usage)

    def measurements(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            **self._counted(),
            "prefill_s": _round(self.prefill_s, 4),
            "decode_tokens_per_s": _round(self.decode_tokens_per_s, 2),
            "request_s": round(self.request_s, 4),
        }

    def _counted(self) -> dict:
        """How the output tokens were counted, where the server sent no usage."""
        if self.output_tokens_source == "usage":
            return {}
        each = "" if self.output_tokens_source == "logprobs" else " (about one token each)"
        return {
            "output_tokens_source": self.output_tokens_source,
            "tokens_note": f"the server sent no usage: output tokens counted from the stream's "
            f"{self.output_tokens_source}{each}; input and visual tokens unknown",
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class HTTPError(ServerError):
    """The server answered the request with an HTTP error status (its body is in the message)."""


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
        return scrub_text(text, [key]) if key else text

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
    chunks = text_chunks = 0
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
            entries = (choice.get("logprobs") or {}).get("content") or ()
            if piece or entries:  # a token arrived (vLLM holds back the text of an incomplete UTF-8 sequence)
                now = time.perf_counter()
                first = first or now
                last = now
            if piece:
                text.append(piece)
                text_chunks += 1
            for entry in entries:
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
    output_tokens, source = usage.get("completion_tokens"), "usage"
    if output_tokens is None:  # no usage chunk: what the stream itself shows
        output_tokens, source = (len(logprobs), "logprobs") if logprobs else (text_chunks, "text chunks")
    rate = (output_tokens - 1) / (last - first) if output_tokens > 1 and first and last > first else None
    return Reply(
        text="".join(text),
        finish_reason=finish,
        input_tokens=usage.get("prompt_tokens"),
        output_tokens=output_tokens,
        prefill_s=(first - start) if first else None,
        decode_tokens_per_s=rate,
        request_s=end - start,
        logprobs=logprobs,
        output_tokens_source=source,
    )
