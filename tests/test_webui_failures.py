"""How a WebUI fails, as verdicts: Qwen3-VL's tuples history under gradio 6 (tests/apps/tuples_demo.py,
launched by the harness from a `launch:` command), an app that dies mid-cell, Gradio's error event
shown or hidden, a queue that never answers, an app that stops answering, a client too new for the
app's gradio; bad input as one paragraph each; the `docker` launch template argument by argument.

The tuples demo is the module's one launched app. The small apps of single failures run in this
process (real Gradio servers on 127.0.0.1, closed by their fixture). gradio 3 is not installable
beside gradio 6, so its app is met through the config and API a real gradio 3.50.2 app served
(tests/data/gradio-3.50.2/), which is all gradio_client reads before it refuses the app.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from webui_apps import APPS, in_process

from harness.engines.docker import engine_problem
from harness.engines.server import free_port
from harness.errors import UserError
from harness.judge.result import WorkerResult
from harness.judge.verdict import judge
from harness.run.backends.gradio import AppCrashed, AppError, AppTimeout, GradioBackend, Target, VersionSkew

DATA = Path(__file__).parent / "data"
TUPLES_DEMO = f"{sys.executable} {APPS / 'tuples_demo.py'} -c {{model}} --server-name {{host}} --server-port {{port}}"


def verdict_of(cell, exc: Exception):
    return judge(cell, WorkerResult(ok=False, error_type=type(exc).__name__, error_message=str(exc)))


# --- Qwen3-VL's demo as written (tuples history), launched by the harness under gradio 6 --------------------


@pytest.fixture(scope="module")
def tuples_demo(tmp_path_factory):
    logs = tmp_path_factory.mktemp("webui-logs")
    backend = GradioBackend(Target(launch=TUPLES_DEMO, startup_timeout_s=120), logs)
    yield backend, logs
    backend.stop()


def test_the_demos_tuples_history_fails_on_gradio_6_with_gradios_words_and_the_fix(tuples_demo, tiny_cell):
    backend, logs = tuples_demo
    cell = tiny_cell(resolution="224x224", backend="gradio")
    with pytest.raises(AppError) as err:
        backend.run(cell)
    text = str(err.value)
    assert text.startswith(
        "the app answered /add_file with an error: Data incompatible with messages format. Each message should be "
        "a dictionary with 'role' and 'content' keys or a ChatMessage object."
    )
    assert "--- server log (tail) ---" in text and "gradio.exceptions.Error" in text  # the app's own traceback
    verdict = verdict_of(cell, err.value)
    assert verdict.outcome == "failed" and verdict.category == "version-skew"
    assert verdict.matched == "gradio-chat-history-format"
    assert "Pin gradio<6 in the image" in verdict.remedy and "build the history as" in verdict.remedy
    (log,) = logs.glob("webui-*.log")
    assert log.read_text().startswith(f"$ {sys.executable} {APPS / 'tuples_demo.py'} -c ")
    environ = Path(f"/proc/{backend.server.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"GRADIO_ANALYTICS_ENABLED=False" in environ  # no version check leaves this machine
    first = backend.server.proc.pid
    with pytest.raises(AppError):
        backend.run(cell)
    assert backend.server.proc.pid == first  # an error answer leaves the app up for the next cell


def test_an_app_that_dies_mid_cell_is_a_crash_with_its_log_and_the_next_cell_gets_a_new_one(tuples_demo, tiny_cell):
    backend, _ = tuples_demo
    cell = tiny_cell(resolution="224x224", backend="gradio")
    backend.start(cell)
    pid = backend.server.proc.pid
    os.killpg(pid, signal.SIGSTOP)  # the cell's upload is sent to an app that does not answer it...

    def die():  # ...and that dies while the upload is in flight
        os.killpg(pid, signal.SIGSEGV)
        os.killpg(pid, signal.SIGCONT)

    threading.Timer(1.0, die).start()
    with pytest.raises(AppCrashed) as err:
        backend.run(cell)
    text = str(err.value)
    assert text.startswith("the server was killed by signal 11 (SIGSEGV) while running the cell")
    assert "--- server log (tail) ---" in text
    verdict = verdict_of(cell, err.value)
    assert verdict.category == "crash" and verdict.matched == "launched-server-died"
    with pytest.raises(AppError, match="Data incompatible with messages format"):
        backend.run(cell)
    assert backend.server.proc.pid != pid


# --- small apps of single failures, in this process ----------------------------------------------------------


@pytest.fixture(scope="module")
def release():
    """Set at the end of the module: frees the apps' blocked handlers, so that their threads end."""
    event = threading.Event()
    yield event
    event.set()


def failing_app(release, *, concurrency_limit=1):
    """One page, one endpoint per failure, each taking an image and a prompt into a textbox."""
    import gradio as gr

    def error(image, prompt):
        yield "partial"
        raise gr.Error("the model is not loaded yet")

    def oom(image, prompt):
        yield "partial"
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def hang(image, prompt):
        yield "one piece"
        release.wait(120)
        yield "one piece, then another"

    def busy(image, prompt):
        release.wait(120)
        return "late"

    with gr.Blocks() as demo:
        image, prompt, answer = gr.Image(type="filepath"), gr.Textbox(), gr.Textbox()
        for fn in (error, oom, hang, busy):
            gr.Button(fn.__name__).click(fn, [image, prompt], answer, concurrency_limit=concurrency_limit)
    return demo


def steps(name: str) -> list[dict]:
    return [{"upload": name, "text": name, "answer": name}]


@pytest.fixture(scope="module")
def failing(release):
    with in_process(failing_app(release)) as url:
        yield url


@pytest.fixture(scope="module")
def failing_shown(release):
    with in_process(failing_app(release), show_error=True) as url:
        yield url


def test_gradios_error_event_is_the_apps_words_and_a_hidden_one_says_how_to_see_it(failing, failing_shown, tiny_cell):
    cell = tiny_cell(resolution="224x224", backend="gradio")
    with pytest.raises(AppError, match=r"^the app answered /error with an error: the model is not loaded yet$"):
        GradioBackend(Target(webui=failing, steps=steps("/error")), None).run(cell)
    with pytest.raises(AppError) as hidden:
        GradioBackend(Target(webui=failing, steps=steps("/oom")), None).run(cell)
    assert "has not enabled verbose error reporting" in str(hidden.value)
    verdict = verdict_of(cell, hidden.value)
    assert verdict.category == "other" and verdict.matched == "gradio-app-hides-its-error"
    assert "show_error=True" in verdict.remedy
    with pytest.raises(AppError) as shown:
        GradioBackend(Target(webui=failing_shown, steps=steps("/oom")), None).run(cell)
    assert verdict_of(cell, shown.value).category == "out-of-memory"  # shown, the app's message is classified


def test_an_answer_that_stops_streaming_is_a_timeout_saying_how_far_it_got(failing, tiny_cell):
    cell = tiny_cell(resolution="224x224", backend="gradio", timeout_s=3)
    started = time.monotonic()
    with pytest.raises(AppTimeout) as err:
        GradioBackend(Target(webui=failing, steps=steps("/hang")), None).run(cell)
    assert time.monotonic() - started < 3  # the conversation ends before the worker's own limit
    assert str(err.value) == (
        "cell exceeded its timeout of 3 s: the app's /hang had streamed 1 piece and had not finished"
    )
    assert verdict_of(cell, err.value).category == "timeout"


def test_a_queue_that_never_answers_is_a_timeout_with_the_queues_remedy(failing, tiny_cell, tmp_path):
    from gradio_client import Client, handle_file

    from harness.matrix.inputs import synthetic_image

    synthetic_image(32, 32).save(tmp_path / "mine.png")
    other = Client(failing, verbose=False, download_files=False, analytics_enabled=False)
    job = other.submit(handle_file(str(tmp_path / "mine.png")), "mine first", api_name="/busy")
    deadline = time.monotonic() + 30
    while job.status().code.value != "PROCESSING":  # another user's job holds the event's one slot
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cell = tiny_cell(resolution="224x224", backend="gradio", timeout_s=3)
    with pytest.raises(AppTimeout) as err:
        GradioBackend(Target(webui=failing, steps=steps("/busy")), None).run(cell)
    assert str(err.value).endswith("the app's /busy sent nothing: it was IN_QUEUE, at 1 of 1 in the app's queue")
    verdict = verdict_of(cell, err.value)
    assert verdict.category == "timeout" and verdict.matched == "webui-queue-never-answered"
    assert "concurrency_limit" in verdict.remedy
    other.close()


def test_an_app_that_stops_answering_mid_stream_is_a_crash(release, tiny_cell):
    cell = tiny_cell(resolution="224x224", backend="gradio")
    demo = failing_app(release)
    with in_process(demo) as url:
        threading.Timer(1.5, demo.close).start()
        with pytest.raises(AppCrashed) as err:
            GradioBackend(Target(webui=url, steps=steps("/hang")), None).run(cell)
    assert str(err.value).startswith(f"the app at {url} stopped answering while running the cell (")
    assert verdict_of(cell, err.value).category == "crash"


# --- bad input: one paragraph each ------------------------------------------------------------------------------


def test_a_url_with_nothing_listening_is_one_paragraph(tiny_cell):
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(UserError) as err:
        GradioBackend(Target(webui=url, matrix_file="release.yaml"), None).run(tiny_cell(backend="gradio"))
    text = str(err.value)
    assert text.startswith(f"file release.yaml, key 'webui': nothing answers at the WebUI {url} (ConnectError")
    assert f"`curl {url}config` must answer" in text and "\n" not in text


def test_an_app_without_an_image_input_is_one_paragraph_listing_its_endpoints(tiny_cell):
    import gradio as gr

    demo = gr.Interface(lambda message, temperature: message, [gr.Textbox(), gr.Slider(0, 1)], gr.Textbox())
    with in_process(demo) as url:
        with pytest.raises(UserError) as err:
            GradioBackend(Target(webui=url, matrix_file="release.yaml"), None).run(tiny_cell(backend="gradio"))
    assert str(err.value) == (
        f"file release.yaml, key 'webui': the WebUI at {url} has no endpoint that takes an image: its endpoints "
        "are /lambda(message: textbox, temperature: slider). Fix: point `webui:` at an app that takes pictures "
        "(an Image, File, UploadButton, Video or MultimodalTextbox input), or list its `steps:` if it takes them "
        "another way."
    )


class StandIn:
    """An HTTP server on 127.0.0.1 answering GET PATH with FILES[PATH] (JSON), 404 otherwise; it keeps the
    paths asked for."""

    def __init__(self, files: dict[str, dict]):
        owner, self.asked = self, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.asked.append(self.path)
                body = json.dumps(files[self.path]).encode() if self.path in files else b"not found"
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_page_that_is_not_a_gradio_app_is_one_paragraph(tiny_cell):
    page = StandIn({})
    try:
        with pytest.raises(UserError) as err:
            GradioBackend(Target(webui=page.url), None).run(tiny_cell(backend="gradio"))
    finally:
        page.close()
    assert str(err.value).startswith(
        f"key 'webui': {page.url} does not answer as a Gradio app (GET {page.url}config answered HTTP 404)."
    )


def gradio_3(version: str = "3.50.2") -> StandIn:
    """What a gradio 3.50.2 app (an image and a prompt into a streamed textbox) answered to GET /config and
    GET /info?serialize=False, recorded from one; its version replaced if asked."""
    recorded = DATA / "gradio-3.50.2"
    config = {**json.loads((recorded / "config.json").read_text()), "version": version}
    return StandIn({"/config": config, "/info?serialize=False": json.loads((recorded / "info.json").read_text())})


def test_a_gradio_3_app_is_version_skew_in_the_clients_words(tiny_cell):
    import gradio_client

    app = gradio_3()
    try:
        with pytest.raises(VersionSkew) as err:
            GradioBackend(Target(webui=app.url), None).run(tiny_cell(backend="gradio"))
    finally:
        app.close()
    assert str(err.value) == (
        f"gradio_client {gradio_client.__version__} cannot drive this app (gradio 3.50.2, protocol ws): "
        "Unknown protocol: ws"
    )
    verdict = verdict_of(tiny_cell(backend="gradio"), err.value)
    assert verdict.category == "version-skew" and "gradio_client<1" in verdict.remedy


def test_an_app_before_gradio_3_37_is_refused_before_the_client_asks_the_internet(tiny_cell):
    app = gradio_3("3.36.1")  # gradio_client reads such an app's API through a service on the internet
    try:
        with pytest.raises(VersionSkew, match="the app runs gradio 3.36.1, which gradio_client .* cannot drive"):
            GradioBackend(Target(webui=app.url), None).run(tiny_cell(backend="gradio"))
    finally:
        app.close()
    assert app.asked == ["/config"]


# --- the docker launch template, argument by argument (no container engine on this machine) -------------------


def docker_argv(tiny_cell, visible: str | None = "0", device: str = "h100-80gb", **launch) -> list[str]:
    from harness.engines.docker import DockerRun
    from harness.engines.templates import launch_args

    cell = tiny_cell(device=device, dtype="bfloat16", backend="gradio")
    args = launch_args(cell, "/models/qwen3-vl", host="127.0.0.1", port=41000, max_model_len=2048)
    return DockerRun(image="ghcr.io/acme/qwen3-vl-webui:1.4", **launch).argv(args, "qwen-compat-7-41000", visible)


def test_the_docker_run_line_of_a_gpu_cell(tiny_cell):
    assert docker_argv(tiny_cell, args="python web_demo_mm.py -c {model} --server-name 0.0.0.0") == [
        "docker", "run", "--rm",
        "--name", "qwen-compat-7-41000",
        "-p", "127.0.0.1:41000:7860",  # published on this host's loopback only
        "--shm-size", "16g",
        "--gpus", "device=0",  # the worker's own GPU
        "-e", "GRADIO_ANALYTICS_ENABLED=False",
        "-e", "GRADIO_SERVER_NAME=0.0.0.0",
        "-e", "GRADIO_SERVER_PORT=7860",
        "-e", "MODEL=/models/qwen3-vl",
        "-e", "DTYPE=bfloat16",
        "ghcr.io/acme/qwen3-vl-webui:1.4",
        "python", "web_demo_mm.py", "-c", "/models/qwen3-vl", "--server-name", "0.0.0.0",
    ]  # fmt: skip


def test_the_docker_gpus_ports_env_and_model_folder(tiny_cell, tmp_path):
    two = docker_argv(tiny_cell, "2,3")
    assert two[two.index("--gpus") + 1] == '"device=2,3"'  # docker reads the flag as CSV: several GPUs are quoted
    mig = docker_argv(tiny_cell, "MIG-4f2c6b1e-7a3d-5e8f-9b0a-1c2d3e4f5a6b")
    assert mig[mig.index("--gpus") + 1] == "device=MIG-4f2c6b1e-7a3d-5e8f-9b0a-1c2d3e4f5a6b"
    assert docker_argv(tiny_cell, None)[docker_argv(tiny_cell, None).index("--gpus") + 1] == "all"
    assert "--gpus" not in docker_argv(tiny_cell, "0", device="cpu")
    custom = docker_argv(tiny_cell, port=8080, shm_size="64g", env={"MODEL_PATH": "{model}", "PRECISION": "{dtype}"})
    assert custom[custom.index("-p") + 1] == "127.0.0.1:41000:8080" and "GRADIO_SERVER_PORT=8080" in custom
    assert custom[custom.index("--shm-size") + 1] == "64g" and "MODEL_PATH=/models/qwen3-vl" in custom
    assert "PRECISION=bfloat16" in custom and "MODEL=/models/qwen3-vl" not in custom
    from harness.engines.docker import DockerRun
    from harness.engines.templates import launch_args

    args = launch_args(tiny_cell(backend="gradio"), str(tmp_path), host="127.0.0.1", port=1, max_model_len=2048)
    argv = DockerRun(image="img").argv(args, "n", None)
    assert argv[argv.index("-v") + 1] == f"{tmp_path}:{tmp_path}:ro"  # a local model folder is mounted read-only


def test_the_docker_template_says_clearly_when_docker_is_absent(tiny_cell):
    from harness.engines.docker import engine_problem
    from harness.matrix.cells import expand
    from harness.matrix.schema import Matrix
    from harness.run.disposition import disposition

    if engine_problem() is None:
        pytest.skip("a Docker engine runs on this machine")
    matrix = Matrix.model_validate(
        {
            "models": [{"tiny": "qwen2_vl", "launch": {"command": "docker", "image": "acme/webui:1"}}],
            "axes": {"backend": ["gradio"]},
        }
    )
    (cell,) = expand(matrix, "release.yaml")
    expectation = disposition(cell, "cpu")
    assert expectation.outcome == "skip" and expectation.categories == ["missing-package"]
    assert expectation.reason.startswith(
        "file release.yaml, key 'launch': the 'docker' launch template needs a running Docker engine (the docker "
    )  # this machine: "the docker command is here, but `docker info` says: Cannot connect to the Docker daemon ..."
    assert engine_problem() in expectation.reason and "Fix: install and start Docker Engine" in expectation.reason


@pytest.fixture
def docker_stand_in(tmp_path, monkeypatch):
    """A `docker` first on PATH that records each call; its `run` stays attached until a signal, as
    `docker run` does, and records the SIGTERM it gets (which the real client passes to the container,
    --sig-proxy being its default). The record is what the harness asked of docker, nothing more."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "docker"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$1" = run ]; then\n'
        f"  trap 'echo TERM >> {calls}; exit 143' TERM\n"
        "  while true; do sleep 0.1; done\n"
        "fi\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    engine_problem.cache_clear()  # the stand-in answers `docker info`; the machine's docker is asked again after
    yield calls
    engine_problem.cache_clear()


def test_a_container_that_never_becomes_ready_is_stopped_and_removed(docker_stand_in, tiny_cell, tmp_path):
    target = Target(launch="docker", image="acme/webui:1", startup_timeout_s=1)
    backend = GradioBackend(target, tmp_path / "logs")
    from harness.engines.server import ServerStartError

    with pytest.raises(ServerStartError, match="did not answer GET /config with 200 within its start-up timeout"):
        backend.run(tiny_cell(backend="gradio"))
    info, run, *stopping = docker_stand_in.read_text().splitlines()
    assert info == "info --format {{.ServerVersion}}"  # the engine is asked first: a CLI alone runs nothing
    name = run.split("--name ")[1].split()[0]
    assert run.startswith(f"run --rm --name {name} -p 127.0.0.1:") and run.endswith(" acme/webui:1")
    assert stopping == [f"stop --time 10 {name}", f"rm -f {name}", "TERM"]  # then the client itself is ended


def test_a_container_is_told_to_stop_when_the_process_that_launched_it_dies(docker_stand_in, tmp_path):
    import subprocess

    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from harness.engines.server import Container\n"
            f"c = Container(['docker', 'run', 'img'], name='n', host='127.0.0.1', port=1, log_path='{tmp_path}/c.log', "
            "startup_timeout_s=60)\n"
            "c.start()\n",
        ]
    )
    deadline = time.monotonic() + 30
    while "run img" not in (docker_stand_in.read_text() if docker_stand_in.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    launcher.kill()
    launcher.wait()
    while "TERM" not in docker_stand_in.read_text():
        assert time.monotonic() < deadline, "the docker client was not told the launcher died"
        time.sleep(0.1)
