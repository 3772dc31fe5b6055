"""`backend: gradio` against a one-page WebUI (tests/apps/streamed_app.py): an image and a prompt into
one named endpoint, the answer streamed into a textbox, over the tiny checkpoint of each family.

One real Gradio process for the module, one app per family at /<family>/; the cells reach it as a
model entry's `webui:`, directly through the backend and through the whole harness (matrix, worker,
verdict, reports, `qwen-compat smoke --webui`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from webui_apps import in_process_text, running

from harness.models.families import FAMILIES
from harness.run.backends.gradio import GradioBackend, Target


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running("streamed_app.py", tmp_path_factory.mktemp("webui")) as server:
        yield server


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_streams_the_answer_the_model_gives_in_process(app, tiny_cell, family):
    import gradio
    import gradio_client

    backend = GradioBackend(Target(webui=f"{app.url}/{family}/"), log_dir=None)
    cell = tiny_cell(family, resolution="224x224", max_new_tokens=16, backend="gradio")
    try:
        record = backend.run(cell)
    finally:
        backend.stop()
    m = record["measurements"]
    assert record["ok"] and record["generation"]["text"] == in_process_text(cell)  # a Textbox shows it as it is
    assert m["webui_steps"] == ["/answer"] and m["streamed_pieces"] > 1
    assert 0 < m["prefill_s"] <= m["request_s"] <= m["conversation_s"]  # one call: the conversation is the answer
    assert m["gradio_server"] == gradio.__version__ and m["gradio_client"] == gradio_client.__version__
    assert m["peak_memory_mib"] is None and "black-box" in m["peak_memory_unmeasured"]
    assert m["agreement"].startswith("not measured") and "greedy: true" in m["agreement"]


def test_what_the_page_has_no_place_for_is_skipped_saying_why(app, tiny_cell):
    backend = GradioBackend(Target(webui=f"{app.url}/qwen2_vl/"), log_dir=None)
    try:
        two = backend.run(tiny_cell(input="images", backend="gradio"))
        video = backend.run(tiny_cell(input="video", backend="gradio"))
    finally:
        backend.stop()
    assert two == {
        "ok": False,
        "skipped_category": "input-mismatch",
        "skipped": "the app's /answer takes one image with the question; the cell sends 2",
    }
    assert video["skipped_category"] == "input-mismatch"
    assert video["skipped"] == "the app takes no video: its file inputs are /answer's image: image"


def matrix_text(url: str) -> str:
    models = "\n".join(f"  - {{tiny: {f}, webui: '{url}/{f}/', greedy: true}}" for f in FAMILIES)
    wrong = f"  - {{tiny: qwen2_vl, id: wrong-app, webui: '{url}/qwen3_vl/', greedy: true}}"
    return f"""
models:
{models}
{wrong}
axes:
  resolution: [224x224]
  backend: [transformers, gradio]
defaults: {{max_new_tokens: 16}}
"""


def test_through_the_harness_each_family_agrees_with_its_in_process_cell_and_another_model_does_not(
    app, suite, matrix_file
):
    result = suite.runpytest("--compat-matrix", str(matrix_file(matrix_text(app.url))), "--compat-reports", "reports")
    result.assert_outcomes(passed=9, failed=1)
    cells = {c["id"]: c for c in json.loads((suite.path / "reports" / "cpu" / "results.json").read_text())["cells"]}
    for family in FAMILIES:
        slug = family.replace("_", "-")
        served = cells[f"tiny-{slug}-endpoint-224x224-gradio"]
        local = cells[f"tiny-{slug}-cpu-float32-sdpa-224x224"]
        m = served["measurements"]
        assert served["outcome"] == "passed" and served["output_text"] == local["output_text"]
        assert m["agreement"] == "measured" and m["agrees"] and m["agreement_reference"] == local["id"]
        assert m["prefill_s"] > 0 and m["webui_steps"] == ["/answer"]
    wrong = cells["wrong-app-endpoint-224x224-gradio"]  # a qwen2_vl entry whose WebUI serves qwen3_vl
    assert wrong["outcome"] == "failed" and wrong["category"] == "wrong-answer"
    assert "is not how the in-process cell" in wrong["message"] and "checkpoint" in wrong["remedy"]


def smoke(*args: str) -> subprocess.CompletedProcess:
    """`qwen-compat smoke ARGS` in a process of its own, as a release pipeline runs it."""
    command = [sys.executable, "-m", "harness.cli", "smoke", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_smoke_webui_runs_the_built_in_matrix_against_a_running_app(app, tmp_path):
    # qwen3_vl_moe: the tiny model whose random weights answer no size with one character repeated (the
    # others do at 1920x1080, and the verdict says so: degenerate output)
    done = smoke("--webui", f"{app.url}/qwen3_vl_moe/", "--family", "qwen3_vl_moe", "--reports", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (folder,) = tmp_path.glob("endpoint-127.0.0.1-*")  # the app's own folder, not this host's cpu/
    cells = {c["id"]: c for c in json.loads((folder / "results.json").read_text())["cells"]}
    outcomes = {cell_id: c["outcome"] for cell_id, c in cells.items()}
    assert outcomes == {
        "webui-endpoint-448x448-gradio": "passed",
        "webui-endpoint-1024x1024-gradio": "passed",
        "webui-endpoint-1920x1080-gradio": "passed",
        "webui-endpoint-448x448-images-gradio": "skipped",  # one image a question on this page
        "webui-endpoint-448x448-video-gradio": "skipped",  # no video input
    }
    assert cells["webui-endpoint-448x448-gradio"]["measurements"]["gradio_server"]


def test_smoke_webui_with_nothing_listening_is_one_paragraph(tmp_path):
    from harness.engines.server import free_port

    url = f"http://127.0.0.1:{free_port()}/"
    done = smoke("--webui", url, "--family", "qwen2_vl", "--reports", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith(f"qwen-compat: key '--webui': nothing answers at the WebUI {url}")
    assert "\n" not in message
    assert "Fix: start the app (or its container) first" in message and f"curl {url}config" in message
