"""A cell as one conversation with a Gradio WebUI, driven through gradio_client the way a person drives
the page: upload the pictures, type the prompt, read the answer as it streams in.

The app is read first: its config (the components a page holds, which events `.then` chains after
which) and its API (`view_api`: each endpoint's parameters and their component types). From these the
conversation is planned: the endpoint that takes a picture (an Image, File, UploadButton, Video or
MultimodalTextbox parameter), the one that takes the prompt (a Textbox), and the one whose output is
the answer, the last endpoint chained after the prompt's (Qwen3-VL's demo: `add_text(...).then(predict)`)
or the prompt's own. A model entry's `steps:` names them instead, for apps this cannot read. A cell's
calls share one session (one `gr.State`), and like the page the client keeps each component's latest
value, so an endpoint's other parameters (the chat history, a slider) get what the page would send.
Several pictures go in one call where a parameter takes several, else one upload call each; an app
without a place for the cell's input (a video, a second image) skips the cell, saying why.

Recorded: the answer (a Chatbot's reply or a Textbox's text), the time from sending the answer step
to its first streamed piece (`prefill_s`, as a server's time to first token) and to its end, the
pieces streamed, the app's gradio version and the client's. A greedy app (`greedy: true`) is compared
with the in-process cell, as displayed. Failures keep the app's words: Gradio's error event (with the
server-side message where the app shows errors, and a launched app's log tail), an answer that does
not come in the cell's timeout, an app that dies, a client that cannot speak the app's protocol.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.engines.docker import DockerRun, container_name
from harness.engines.server import Container, Server, ServerGpuMemory, free_port, served_memory
from harness.engines.templates import user_command
from harness.errors import UserError
from harness.judge import agreement
from harness.matrix import inputs
from harness.matrix.cells import Cell
from harness.matrix.launch import DOCKER
from harness.run.backends import HOST, RunContext, served_args, start_announced

READY_PATH = "/config"  # every Gradio app serves its config there
APP_ENV = {"GRADIO_ANALYTICS_ENABLED": "False"}  # no version check to an outside host
POLL_S = 0.005
REPLY_MARGIN_S = 1.0  # a conversation ends this much before the worker's limit, so the failure says which step hung

FILE_COMPONENTS = ("image", "video", "file", "uploadbutton", "multimodaltextbox")
TEXT_COMPONENTS = ("multimodaltextbox", "textbox")  # best first
ANSWER_COMPONENTS = ("chatbot", "textbox", "markdown")  # best first
SUFFIXES = {"image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"), "video": (".mp4", ".webm", ".mov", ".avi")}
PROMPT_NAMES = ("message", "prompt", "query", "question", "input", "text")


class AppError(RuntimeError):
    """The app answered a step with Gradio's error event; the message is the app's."""


class AppTimeout(RuntimeError):
    """The app did not answer within the cell's timeout."""


class AppCrashed(RuntimeError):
    """The app stopped answering while a cell ran (a launched one: its exit and log tail are in the message)."""


class VersionSkew(RuntimeError):
    """gradio_client cannot drive the app's gradio (its protocol or API format)."""


class Skip(Exception):
    """The cell cannot be put to the app (no place for its input; a package to write it); the message says why."""

    def __init__(self, message: str, category: str = "input-mismatch"):
        super().__init__(message)
        self.category = category


# --- what the app's config and API say ----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str  # as the API names it
    component: str  # the component's type in the config: image, textbox, chatbot, uploadbutton, ...
    component_id: int
    file_types: tuple[str, ...] | None = None  # what a file input accepts (None: anything)
    several: bool = False  # takes several files in one value

    def takes(self, kind: str) -> bool:
        """Whether a picture of `kind` (image, video) can go into this parameter."""
        if self.component in ("image", "video"):
            return self.component == kind
        if self.component not in FILE_COMPONENTS:
            return False
        return self.file_types is None or any(t == kind or t.lower() in SUFFIXES[kind] for t in self.file_types)

    def __str__(self) -> str:
        return f"{self.name}: {self.component}"


@dataclass
class Endpoint:
    name: str  # /add_file
    fn: int  # the event's id in the config
    params: list[Param]
    outputs: list[int]  # ids of the components whose values it returns, in order
    output_types: dict[int, str]
    generator: bool
    after: int | None  # the event this one is chained to by `.then` / `.success`

    def file_param(self, kind: str) -> Param | None:
        return next((p for p in self.params if p.takes(kind)), None)

    def file_params(self) -> list[Param]:
        return [p for p in self.params if p.component in FILE_COMPONENTS]

    def text_param(self) -> Param | None:
        texts = sorted(
            (p for p in self.params if p.component in TEXT_COMPONENTS),
            key=lambda p: (TEXT_COMPONENTS.index(p.component), not p.name.lower().startswith(PROMPT_NAMES)),
        )
        return texts[0] if texts else None

    def answer_output(self, prompt: Param | None) -> int | None:
        """The component a person reads the answer from (not the box the prompt was typed in)."""
        readable = [c for c in self.outputs if self.output_types[c] in ANSWER_COMPONENTS]
        readable = [c for c in readable if not (prompt and c == prompt.component_id)]
        return min(readable, key=lambda c: ANSWER_COMPONENTS.index(self.output_types[c]), default=None)

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.params))})"


class App:
    """A Gradio app as its config and API describe it, with the client that talks to it."""

    def __init__(self, url: str, matrix_file: str | None = None, key: str = "webui"):
        self.key = key
        try:
            from gradio_client import Client
            from gradio_client import utils as client_utils
        except ImportError:
            raise UserError(
                "a WebUI is driven with gradio_client, which is not installed here.",
                file=matrix_file,
                key=key,
                fix="pip install 'qwen-compat[webui]' (gradio_client, 64 KB).",
            ) from None

        self.url, self.matrix_file = url if url.endswith("/") else url + "/", matrix_file
        self.client_version = client_utils.__version__
        self.server_version = str(self._config().get("version", "unknown"))
        if _before(self.server_version, "3.37"):  # the client would ask a service on the internet for the API
            raise VersionSkew(
                f"the app runs gradio {self.server_version}, which gradio_client {self.client_version} cannot drive "
                "(it reads the API of apps before gradio 3.37 through a service on the internet, and gradio 3 apps "
                "speak the websocket protocol it dropped in 2.0)"
            )
        self.client = Client(self.url, verbose=False, download_files=False, analytics_enabled=False, token=False)
        config = self.client.config
        self.protocol = self.client.protocol  # the one it speaks to this app ("ws" where the config names none)
        components = {c["id"]: c for c in config["components"]}
        self.values = {cid: c.get("props", {}).get("value") for cid, c in components.items()}

        def shown(cid: int) -> bool:
            c = components[cid]
            return not c.get("skip_api", c["type"] in client_utils.SKIP_COMPONENTS)

        named = self.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        self.endpoints: list[Endpoint] = []
        for index, dep in enumerate(config["dependencies"]):
            name = "/" + dep["api_name"] if isinstance(dep.get("api_name"), str) else None
            inputs = [cid for cid in dep["inputs"] if shown(cid)]
            if name not in named or len(inputs) != len(named[name]["parameters"]):
                continue  # private, hidden from the API, or not callable as the API describes it
            outputs = [cid for cid in dep["outputs"] if shown(cid)]
            self.endpoints.append(
                Endpoint(
                    name=name,
                    fn=dep.get("id", index),  # configs before gradio 4 number events by their place
                    params=[
                        _param(p, components[cid]) for p, cid in zip(named[name]["parameters"], inputs, strict=True)
                    ],
                    outputs=outputs,
                    output_types={cid: components[cid]["type"] for cid in outputs},
                    generator=bool(dep.get("types", {}).get("generator")),
                    after=dep.get("trigger_after"),
                )
            )

    def _config(self) -> dict:
        """The app's config route, read once before the client is made (which it would make in vain)."""
        unreachable = None
        try:
            response = httpx.get(self.url + "config", timeout=httpx.Timeout(10.0, connect=5.0), follow_redirects=True)
            if response.status_code == 200:
                return response.json()
            problem = f"GET {self.url}config answered HTTP {response.status_code}"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            unreachable = f"{type(exc).__name__}: {exc}"
        except (httpx.TransportError, ValueError) as exc:
            problem = f"GET {self.url}config: {type(exc).__name__}: {exc}"
        if unreachable:
            raise UserError(
                f"nothing answers at the WebUI {self.url} ({unreachable}); no cell can run against it.",
                file=self.matrix_file,
                key=self.key,
                fix=f"start the app (or its container) first and check the host and port: `curl {self.url}config` "
                "must answer with the app's config.",
            )
        raise UserError(
            f"{self.url} does not answer as a Gradio app ({problem}).",
            file=self.matrix_file,
            key=self.key,
            fix="give the address a browser opens the app at, e.g. http://host:7860/ (with its path, if mounted).",
        )

    def close(self) -> None:
        self.client.close()

    def endpoint(self, name: str, key: str = "steps") -> Endpoint:
        wanted = "/" + name.lstrip("/")
        for endpoint in self.endpoints:
            if endpoint.name == wanted:
                return endpoint
        raise UserError(
            f"the WebUI at {self.url} has no endpoint {wanted}; its endpoints are {self.listing()}.",
            file=self.matrix_file,
            key=key,
            fix="name one of those in `steps:` (an endpoint is its event function's name, or its api_name).",
        )

    def listing(self) -> str:
        return "; ".join(map(str, self.endpoints)) or "none"

    def chain(self, start: Endpoint) -> list[Endpoint]:
        """The endpoints `.then` runs after `start`, in order (the page runs them; so does the conversation)."""
        chain, current = [], start
        while nxt := next((e for e in self.endpoints if e.after == current.fn), None):
            chain.append(nxt)
            current = nxt
        return chain


def _before(version: str, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return False


def _param(info: dict, component: dict) -> Param:
    props = component.get("props", {})
    kind = component["type"]
    types = props.get("file_types")
    several = kind == "multimodaltextbox" or (
        kind in ("file", "uploadbutton") and props.get("file_count") in ("multiple", "directory")
    )
    return Param(
        name=info.get("parameter_name") or info.get("label") or str(component["id"]),
        component=kind,
        component_id=component["id"],
        file_types=tuple(types) if types else None,
        several=several,
    )


# --- the conversation: which calls, with what ------------------------------------------------------------


@dataclass
class Call:
    endpoint: Endpoint
    files: Param | None = None  # where this call's pictures go
    pictures: slice = field(default_factory=lambda: slice(0, 0))  # which of the cell's pictures
    prompt: Param | None = None
    answer: int | None = None  # the component whose value is the answer
    fixed: dict = field(default_factory=dict)  # values for other parameters, by name


def plan(app: App, kind: str, count: int, steps: list[dict] | None = None) -> list[Call]:
    """The calls of a conversation that sends `count` pictures of `kind` (image, video) and a prompt:
    the `steps:` given, or what the app's API and event chains say; Skip when the app has no place for them."""
    calls = _given(app, kind, steps) if steps else _inferred(app, kind)
    return _spread(calls, kind, count)


def _inferred(app: App, kind: str) -> list[Call]:
    uploads = [e for e in app.endpoints if e.file_params()]
    if not uploads:
        raise UserError(
            f"the WebUI at {app.url} has no endpoint that takes an image: its endpoints are {app.listing()}.",
            file=app.matrix_file,
            key="webui",
            fix="point `webui:` at an app that takes pictures (an Image, File, UploadButton, Video or "
            "MultimodalTextbox input), or list its `steps:` if it takes them another way.",
        )
    takers = [e for e in uploads if e.file_param(kind)]
    if not takers:
        inputs = ", ".join(f"{e.name}'s {p}" for e in uploads for p in e.file_params())
        raise Skip(f"the app takes no {kind}: its file inputs are {inputs}")
    with_text = [e for e in takers if e.text_param()]
    upload = (with_text or takers)[0]
    texts = sorted((e for e in app.endpoints if e.text_param()), key=lambda e: not (e.generator or app.chain(e)))
    text = upload if with_text else next(iter(texts), None)
    if text is None:
        raise UserError(
            f"the WebUI at {app.url} has no endpoint that takes a prompt (a Textbox): its endpoints are "
            f"{app.listing()}.",
            file=app.matrix_file,
            key="webui",
            fix="list the app's `steps:` ({upload: ...}, {text: ...}, {answer: ...}) in the model entry.",
        )
    prompt = text.text_param()
    chain = app.chain(text)
    answering = [e for e in [text, *chain] if e.answer_output(prompt) is not None]
    if not answering:
        raise UserError(
            f"the WebUI at {app.url} shows no answer after {text.name}: neither it nor what it chains "
            f"({', '.join(e.name for e in chain) or 'nothing'}) returns a Chatbot, Textbox or Markdown.",
            file=app.matrix_file,
            key="webui",
            fix="list the app's `steps:` with the endpoint whose output is the answer as `answer:`.",
        )
    last = answering[-1]
    calls = [] if upload is text else [Call(upload, files=upload.file_param(kind))]
    calls.append(Call(text, files=text.file_param(kind) if upload is text else None, prompt=prompt))
    calls += [Call(e) for e in chain[: chain.index(last) + 1]] if last is not text else []
    calls[-1].answer = last.answer_output(prompt)
    return calls


def _given(app: App, kind: str, steps: list[dict]) -> list[Call]:
    calls = []
    for n, step in enumerate(steps):
        key = f"steps[{n}]"
        name = next(step[role] for role in ("upload", "text", "answer", "call") if step.get(role))
        endpoint = app.endpoint(name, key)
        call = Call(endpoint, fixed=dict(step.get("with") or {}))
        unknown = set(call.fixed) - {p.name for p in endpoint.params}
        if unknown:
            raise UserError(
                f"the step {name} sets {', '.join(sorted(unknown))}, which {endpoint.name} does not take: {endpoint}.",
                file=app.matrix_file,
                key=f"{key}.with",
                fix="name the endpoint's parameters as its API does.",
            )
        if step.get("upload"):
            call.files = endpoint.file_param(kind)
            if call.files is None and endpoint.file_params():
                raise Skip(f"the app's {endpoint.name} takes no {kind}: {endpoint}")
            if call.files is None:
                raise _unfit(app, key, f"`upload: {name}` names an endpoint that takes no file: {endpoint}", "pictures")
        if step.get("text"):
            call.prompt = endpoint.text_param()
            if call.prompt is None:
                raise _unfit(app, key, f"`text: {name}` names an endpoint that takes no text: {endpoint}", "prompt")
        if step.get("answer"):
            prompt = next((c.prompt for c in calls + [call] if c.prompt), None)
            call.answer = endpoint.answer_output(prompt)
            if call.answer is None:
                says = f"`answer: {name}` names an endpoint that returns no Chatbot, Textbox or Markdown"
                raise _unfit(app, key, says, "answer")
        calls.append(call)
    if calls[-1].answer is None and any(c.answer is not None for c in calls):
        raise UserError(
            "the model's `steps:` go on after the `answer:` step; the answer ends a conversation.",
            file=app.matrix_file,
            key="steps",
            fix="make the `answer:` step the last one.",
        )
    for role, test in (("upload", lambda c: c.files), ("text", lambda c: c.prompt), ("answer", lambda c: c.answer)):
        if not any(test(c) is not None for c in calls):
            raise UserError(
                f"the model's `steps:` have no `{role}:` step.",
                file=app.matrix_file,
                key="steps",
                fix="list an upload, a text and an answer step, e.g. "
                "[{upload: /add_file}, {text: /add_text}, {answer: /predict}].",
            )
    return calls


def _unfit(app: App, key: str, says: str, role: str) -> UserError:
    """A step whose endpoint cannot do what the step names it for."""
    return UserError(
        f"the step {says}.",
        file=app.matrix_file,
        key=key,
        fix=f"name the endpoint that takes (or shows) the {role}; the app's endpoints are {app.listing()}.",
    )


def _spread(calls: list[Call], kind: str, count: int) -> list[Call]:
    """Each picture into a call: all at once where the parameter takes several, else one upload call each
    (a person uploads one file at a time); Skip where one call would have to take them all."""
    spread = []
    for call in calls:
        if call.files is None:
            spread.append(call)
        elif call.files.several or count == 1:
            call.pictures = slice(0, count)
            spread.append(call)
        elif call.prompt is None and call.answer is None:
            spread += [Call(call.endpoint, call.files, slice(i, i + 1), fixed=call.fixed) for i in range(count)]
        else:
            raise Skip(f"the app's {call.endpoint.name} takes one {kind} with the question; the cell sends {count}")
    return spread


# --- one conversation -------------------------------------------------------------------------------------


def answer_text(value) -> str:
    """What a person reads in an answer component: a Textbox's text; a Chatbot's messages after the last
    question (or the last pair's reply, in the tuples format of gradio before 6)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or "")
    if not value:
        return ""
    if not isinstance(value[-1], dict):  # [[question, reply], ...]
        reply = value[-1][1] if len(value[-1]) > 1 else None
        return reply if isinstance(reply, str) else ""
    replies = []
    for message in reversed(value):
        if message.get("role") != "assistant":
            break
        replies.insert(0, _content_text(message.get("content")))
    return "\n".join(r for r in replies if r)


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    return "".join(_content_text(part) for part in content or ())


@dataclass
class Reply:
    text: str
    prefill_s: float | None  # the answer step sent -> its first streamed piece
    request_s: float  # the answer step sent -> its end
    conversation_s: float  # the first step sent -> the answer's end
    pieces: int  # outputs the answer step streamed
    steps: list[str]

    def measurements(self) -> dict:
        return {
            "prefill_s": None if self.prefill_s is None else round(self.prefill_s, 4),
            "request_s": round(self.request_s, 4),
            "conversation_s": round(self.conversation_s, 4),
            "streamed_pieces": self.pieces,
            "webui_steps": self.steps,
        }


class Conversation:
    """One cell's calls in one fresh session, with the page's component values."""

    def __init__(self, app: App, calls: list[Call], files: list[str], prompt: str, timeout_s: float):
        self.app, self.calls, self.files, self.prompt = app, calls, files, prompt
        self.timeout_s = timeout_s
        self.values = dict(app.values)
        self._downloads: dict[str, str] = {}
        self._folder = tempfile.TemporaryDirectory(prefix="qwen-compat-webui-")

    def run(self) -> Reply:
        """The calls in order; the last is the answer's (both plans end with it)."""
        self.app.client.reset_session()  # a new page: a new gr.State
        start = time.perf_counter()
        deadline = start + max(self.timeout_s - REPLY_MARGIN_S, self.timeout_s / 2)
        try:
            for call in self.calls:
                sent, first, pieces = self._call(call, deadline)
        finally:
            self._folder.cleanup()
        end = time.perf_counter()
        text = answer_text(self.values[self.calls[-1].answer])
        return Reply(
            text=text,
            prefill_s=(first or end) - sent if text else None,
            request_s=end - sent,
            conversation_s=end - start,
            pieces=pieces,
            steps=[c.endpoint.name for c in self.calls],
        )

    def _call(self, call: Call, deadline: float) -> tuple[float, float | None, int]:
        """One endpoint called and its outputs kept as the page's values: when it was sent, when its first
        answer piece came, how many outputs it streamed."""
        from gradio_client.exceptions import AppError as ClientAppError

        sent = time.perf_counter()
        try:
            job = self.app.client.submit(*self._arguments(call), api_name=call.endpoint.name)
        except ValueError as exc:
            if "protocol" not in str(exc).lower():
                raise
            raise VersionSkew(
                f"gradio_client {self.app.client_version} cannot drive this app (gradio {self.app.server_version}, "
                f"protocol {self.app.protocol}): {exc}"
            ) from None
        first, pieces = self._wait(job, call, deadline)
        try:
            result = job.result()
        except ClientAppError as exc:
            raise AppError(f"the app answered {call.endpoint.name} with an error: {exc}") from None
        self.values.update(zip(call.endpoint.outputs, _returned(call.endpoint, result), strict=False))
        return sent, first, pieces

    def _wait(self, job, call: Call, deadline: float) -> tuple[float | None, int]:
        """Until the job is done: when the answer's first piece arrived, and how many outputs streamed."""
        first, seen = None, 0
        while not job.done():
            if call.answer is not None:
                outputs = job.outputs()
                if len(outputs) > seen:
                    seen = len(outputs)
                    if first is None and answer_text(self._answer_of(call, outputs[-1])):
                        first = time.perf_counter()
            if time.perf_counter() > deadline:
                progress = _progress(job, seen, first is not None)
                self._give_up(job)
                raise AppTimeout(
                    f"cell exceeded its timeout of {self.timeout_s:g} s: the app's {call.endpoint.name} {progress}"
                )
            time.sleep(POLL_S)
        return first, max(seen, len(job.outputs()))

    @staticmethod
    def _give_up(job) -> None:
        """Ask the app to cancel, without waiting: a hung app may not answer that either."""
        threading.Thread(target=_quietly, args=(job.cancel,), daemon=True).start()

    def _answer_of(self, call: Call, output) -> object:
        values = _returned(call.endpoint, output)
        return dict(zip(call.endpoint.outputs, values, strict=False)).get(call.answer)

    def _arguments(self, call: Call) -> list:
        from gradio_client import handle_file

        files = [handle_file(f) for f in self.files[call.pictures]]
        args = []
        for param in call.endpoint.params:
            if param is call.files and param.component == "multimodaltextbox":
                args.append({"text": self.prompt if param is call.prompt else "", "files": files})
            elif param is call.files:
                args.append(files if param.several else files[0])
            elif param is call.prompt:
                args.append(self.prompt)
            elif param.name in call.fixed:
                args.append(call.fixed[param.name])
            else:
                args.append(self._resent(self.values.get(param.component_id)))
        return args

    def _resent(self, value):
        """A value the app returned, as the client can send it back: a file the app holds goes back as an
        upload of a local copy (gradio_client uploads every file it sends), fetched once if not on this host."""
        from gradio_client import utils as client_utils

        def local(f: dict) -> dict:
            path = f.get("path") or ""
            if Path(path).is_file() or not f.get("url"):
                return f
            if f["url"] not in self._downloads:
                target = Path(self._folder.name) / f"{len(self._downloads)}-{Path(path).name or 'file'}"
                response = httpx.get(
                    f["url"], headers=self.app.client.headers, cookies=self.app.client.cookies, follow_redirects=True
                )
                response.raise_for_status()
                target.write_bytes(response.content)
                self._downloads[f["url"]] = str(target)
            return {**f, "path": self._downloads[f["url"]]}

        return client_utils.traverse(value, local, client_utils.is_file_obj_with_meta)


def _returned(endpoint: Endpoint, result) -> tuple:
    """The values of an endpoint's outputs (gradio_client returns a lone output's value by itself)."""
    return (result,) if len(endpoint.outputs) == 1 else tuple(result or ())


def _progress(job, pieces: int, answered: bool) -> str:
    if pieces:
        streamed = f"{pieces} piece{'s' if pieces > 1 else ''}{'' if answered else ' without answer text'}"
        return f"had streamed {streamed} and had not finished"
    status = job.status()
    code = getattr(status.code, "value", status.code)
    if status.rank is not None and status.queue_size:
        return f"sent nothing: it was {code}, at {status.rank + 1} of {status.queue_size} in the app's queue"
    return f"sent nothing: it was {code}"


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a courtesy to an app that stopped answering
        pass


def write_pictures(cell: Cell, folder: Path) -> list[str]:
    """The cell's pictures as files a person would upload: lossless PNGs; a video as an MP4 (PyAV)."""
    folder.mkdir(parents=True, exist_ok=True)
    what = f"the {cell.width}x{cell.height} {cell.input} of this cell's upload"
    if cell.input == "video":
        av = _pyav()
        with inputs.built_by_the_harness(what):
            path = folder / "video.mp4"
            _write_video(av, inputs.synthetic_video(cell.width, cell.height), path)
        return [str(path)]
    with inputs.built_by_the_harness(what):
        images = inputs.pictures(cell.input, cell.width, cell.height, cell.images, **inputs.image_source(cell.image))
        paths = [str(folder / f"image-{i}.png") for i in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            image.save(path, format="PNG")
    return paths


def _pyav():
    try:
        import av
    except ImportError:
        raise Skip(
            "the cell's video reaches a WebUI as a file, and writing one needs PyAV, which is not installed here "
            "(pip install av)",
            "missing-package",
        ) from None
    return av


def _write_video(av, frames, path: Path, fps: int = 2) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# --- the backend: a group's app (reached or launched) and its cells ---------------------------------------


@dataclass
class Target:
    """How a model entry reaches its WebUI: `webui:` (running) or `launch:` (a command, or `docker`)."""

    webui: str | None = None
    launch: str | None = None  # a command with {placeholders}, or "docker"
    steps: list[dict] | None = None
    greedy: bool = False
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    startup_timeout_s: float = 600.0
    image: str | None = None  # docker
    port: int = 7860
    shm_size: str = "16g"
    env: dict | None = None
    args: str | None = None
    matrix_file: str | None = None


class GradioBackend:
    """Cells over a Gradio WebUI. A launched app is started for a group's first cell, again when a cell
    needs another command line and after it died or hung, and stopped by `stop()`; its log (a container's
    output) is kept in `log_dir`."""

    def __init__(self, target: Target, log_dir: Path | None):
        if bool(target.webui) == bool(target.launch):
            raise UserError(
                "a model driven through its WebUI needs exactly one of `webui:` (a running app) and `launch:` "
                "(a command the harness starts).",
                file=target.matrix_file,
                key="webui",
                fix="give `webui: http://host:7860/`, or `launch:` the app's command with {port}, or "
                "`launch: {command: docker, image: IMAGE}`.",
            )
        self.target, self.log_dir = target, log_dir
        self.app: App | None = None
        self.server: Server | None = None
        self.gpu: ServerGpuMemory | None = None
        self._argv: list[str] | None = None
        self._log_mark = 0  # where the app's log stood when the cell began

    def _command(self, cell: Cell, port: int) -> tuple[list[str], str | None]:
        """The app's command line and, for a container, its name."""
        args = served_args(cell, port, self.target.gpu_memory_utilization, self.target.tensor_parallel_size)
        if self.target.launch != DOCKER:
            return user_command(self.target.launch, args, self.target.matrix_file), None
        docker = DockerRun.of(vars(self.target))
        docker.check_installed()
        name = container_name(port)
        return docker.argv(args, name, os.environ.get("CUDA_VISIBLE_DEVICES")), name

    def start(self, cell: Cell, emit=None) -> float:
        """Have the app ready for the cell; the seconds spent starting one (0 when reused)."""
        if self.target.webui:
            if self.app is None:
                self.app = App(self.target.webui, self.target.matrix_file)
            return 0.0
        port = self.server.port if self.server and self.server.alive() else free_port(HOST)
        argv, name = self._command(cell, port)
        if self.server and self.server.alive() and argv == self._argv:
            return 0.0
        self.stop()
        log = Path(self.log_dir) / f"webui-{time.strftime('%Y%m%dT%H%M%S')}-{port}.log"
        common = {"host": HOST, "port": port, "log_path": log, "ready_path": READY_PATH, "env": APP_ENV}
        self.server = (
            Container(argv, name=name, startup_timeout_s=self.target.startup_timeout_s, **common)
            if name
            else Server(argv, startup_timeout_s=self.target.startup_timeout_s, **common)
        )
        self._argv = argv
        seconds, self.gpu = start_announced(self.server, cell, emit)
        self.app = App(self.server.url + "/", self.target.matrix_file)
        return seconds

    def stop(self) -> None:
        if self.app:
            self.app.close()
            self.app = None
        if self.server:
            self.server.stop()
        self.server = None

    def run(self, cell: Cell, context: RunContext | None = None) -> dict:
        """Run one cell: {"ok", "generation", "measurements"}; a failure raises with the app's words."""
        load_s = self.start(cell, context.emit if context else None)
        folder = tempfile.TemporaryDirectory(prefix="qwen-compat-pictures-")
        try:
            kind = "video" if cell.input == "video" else "image"
            count = cell.images if cell.input == "images" else 1
            calls = plan(self.app, kind, count, self.target.steps)
            files = write_pictures(cell, Path(folder.name))
        except Skip as exc:
            folder.cleanup()
            return {"ok": False, "skipped_category": exc.category, "skipped": str(exc)}
        sampler, source = self.gpu.track(self.server.tree()) if self.gpu and self.server else (None, None)
        if self.server:
            self.server.reset_peak()
            self._log_mark = self.server.log_size()
        try:
            with sampler or contextlib.nullcontext():
                reply = Conversation(self.app, calls, files, cell.prompt, cell.timeout_s).run()
        except UserError:
            raise
        except Exception as exc:  # the app's words, its exit, or the client's (a CancelledError: the app is gone)
            raise self._failure(exc) from None
        finally:
            folder.cleanup()
        return {
            "ok": True,
            "generation": {"text": reply.text},  # what a page shows: no token ids, counts or finish reason
            "measurements": {
                **reply.measurements(),
                "input_tokens": None,
                "output_tokens": None,
                "visual_tokens": None,
                "gradio_server": self.app.server_version,
                "gradio_client": self.app.client_version,
                "load_s": round(load_s, 4),
                **served_memory(self.server, cell.device, self.gpu, sampler, source, {}),
                **self._agreement(cell, reply.text, context),
            },
        }

    def _failure(self, exc: Exception) -> Exception:
        """The exception a failed conversation ends in: for a launched app with its exit and log tail; an
        error of the client's own, as the app having stopped answering where it has."""
        known = (AppError, AppTimeout, VersionSkew, AppCrashed)
        message = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        if self.server is None:
            if isinstance(exc, known) or self._answers():
                return exc
            return AppCrashed(f"the app at {self.app.url} stopped answering while running the cell ({message})")
        time.sleep(0.2)  # an app that broke the stream by dying is reapable a moment later
        ended = self.server.ended()
        if ended:
            failure = AppCrashed(
                self.server.failure(f"the server {ended} while running the cell: {message}", self._log_mark)
            )
            self.stop()
            return failure
        failure = (type(exc) if isinstance(exc, known) else AppCrashed)(self.server.failure(message, self._log_mark))
        if isinstance(exc, AppTimeout):
            self.stop()  # a hung app is replaced for the next cell
        return failure

    def _answers(self) -> bool:
        try:
            return httpx.get(self.app.url + "config", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def _agreement(self, cell: Cell, text: str, context: RunContext | None) -> dict:
        if not self.target.greedy:
            return {"agreement": "not measured — the app is not declared greedy (`greedy: true` in the model entry)"}
        return agreement.compare(cell, text, context.reference_dir, displayed=True) if context else {}
