"""`backend: gradio` against a WebUI written like Qwen3-VL's `web_demo_mm.py` (tests/apps/chat_demo.py):
no api_names, a gr.State task history, three steps in one session (upload, text, then the streamed
`/predict` that `.then` chains to the text step), over the tiny checkpoint of each family.

One real Gradio process for the module, one app per family at /<family>/.
"""

from __future__ import annotations

import re
import sys

import pytest
from webui_apps import in_process_text, running

from harness.errors import UserError
from harness.models.families import FAMILIES
from harness.run.backends.gradio import App, AppError, GradioBackend, Target, plan

STEPS = [{"upload": "/add_file"}, {"text": "/add_text"}, {"answer": "/predict"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running("chat_demo.py", tmp_path_factory.mktemp("webui")) as server:
        yield server


@pytest.fixture
def backend(app):
    """A backend for one family's app (the app's config and API read once per test)."""
    made = []

    def make(family: str = "qwen2_vl", **target) -> GradioBackend:
        made.append(GradioBackend(Target(webui=f"{app.url}/{family}/", matrix_file="release.yaml", **target), None))
        return made[-1]

    yield make
    for b in made:
        b.stop()


def _as_displayed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_answers_through_the_three_steps_as_it_does_in_process(backend, tiny_cell, family):
    cell = tiny_cell(family, resolution="224x224", max_new_tokens=16, backend="gradio")
    record = backend(family).run(cell)
    m = record["measurements"]
    assert m["webui_steps"] == ["/add_file", "/add_text", "/predict"]
    # the Chatbot shows the answer with its whitespace rewritten (tabs expanded, leading blanks stripped)
    assert record["ok"] and _as_displayed(record["generation"]["text"]) == _as_displayed(in_process_text(cell))
    assert 0 < m["prefill_s"] <= m["request_s"] < m["conversation_s"] and m["streamed_pieces"] > 1


def test_two_images_are_two_uploads_in_one_session(backend, tiny_cell):
    record = backend("qwen3_vl").run(tiny_cell("qwen3_vl", input="images", resolution="224x224", backend="gradio"))
    assert record["ok"] and record["generation"]["text"]
    assert record["measurements"]["webui_steps"] == ["/add_file", "/add_file", "/add_text", "/predict"]


def test_the_app_is_read_from_its_config_and_api(app):
    demo = App(f"{app.url}/qwen2_vl/")
    try:
        names = [e.name for e in demo.endpoints]
        assert names == ["/add_text", "/predict", "/reset_user_input", "/reset_state", "/regenerate", "/add_file"]
        add_text, add_file = demo.endpoint("add_text"), demo.endpoint("/add_file")
        assert [str(p) for p in add_file.params] == [
            "chat: chatbot",
            "file: uploadbutton",
        ]  # the gr.State is no parameter
        assert add_file.file_param("image").name == "file" and add_file.file_param("video").name == "file"
        assert [e.name for e in demo.chain(add_text)] == ["/predict"] and demo.endpoint("predict").generator
        calls = plan(demo, "image", 1)
        assert [(c.endpoint.name, bool(c.files), bool(c.prompt), c.answer is not None) for c in calls] == [
            ("/add_file", True, False, False),
            ("/add_text", False, True, False),
            ("/predict", False, False, True),
        ]
    finally:
        demo.close()


def test_explicit_steps_drive_the_same_conversation(backend, tiny_cell):
    cell = tiny_cell("qwen2_5_vl", resolution="224x224", backend="gradio")
    inferred = backend("qwen2_5_vl").run(cell)
    given = backend("qwen2_5_vl", steps=STEPS).run(cell)
    assert given["generation"]["text"] == inferred["generation"]["text"]
    assert given["measurements"]["webui_steps"] == ["/add_file", "/add_text", "/predict"]


def _paragraph(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text and "release.yaml" in text and "Fix:" in text
    return text


def test_a_step_naming_an_endpoint_the_app_lacks_lists_those_it_has(backend, tiny_cell):
    with pytest.raises(UserError) as err:
        backend(steps=[{"upload": "/upload_image"}, *STEPS[1:]]).run(tiny_cell(backend="gradio"))
    text = _paragraph(err)
    assert "key 'steps[0]'" in text and "has no endpoint /upload_image; its endpoints are /add_text(" in text
    assert "/add_file(chat: chatbot, file: uploadbutton)" in text and "/predict(chat: chatbot)" in text


@pytest.mark.parametrize(
    ("steps", "key", "says"),
    [
        ([{"upload": "/add_text"}, *STEPS[1:]], "steps[0]", "`upload: /add_text` names an endpoint that takes no file"),
        (
            [STEPS[0], {"text": "/predict"}, STEPS[2]],
            "steps[1]",
            "`text: /predict` names an endpoint that takes no text",
        ),
        ([*STEPS[:2], {"answer": "/reset_user_input"}], "steps[2]", "returns no Chatbot, Textbox or Markdown"),
        (STEPS[:2], "steps", "have no `answer:` step"),
        ([*STEPS, {"call": "/reset_state"}], "steps", "go on after the `answer:` step"),
        ([{**STEPS[0], "with": {"temperature": 0}}, *STEPS[1:]], "steps[0].with", "sets temperature, which /add_file"),
    ],
)
def test_steps_that_cannot_be_followed_are_one_paragraph_each(backend, tiny_cell, steps, key, says):
    with pytest.raises(UserError) as err:
        backend(steps=steps).run(tiny_cell(backend="gradio"))
    text = _paragraph(err)
    assert f"key '{key}'" in text and says in text


def test_a_video_reaches_the_app_as_an_mp4_which_this_apps_transformers_cannot_decode(backend, tiny_cell):
    """The cell's frames go up as an MP4 (PyAV); the app's transformers 5 decodes video files with torchcodec
    only (torchvision 0.26 removed read_video), which this image, like many, lacks: the app's own failure."""
    pytest.importorskip("av")
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    cell = tiny_cell(input="video", resolution="224x224", backend="gradio")
    with pytest.raises(AppError) as err:
        backend().run(cell)
    assert str(err.value).startswith("the app answered /predict with an error: `torchcodec` is not installed")
    verdict = judge(cell, WorkerResult(ok=False, error_type="AppError", error_message=str(err.value)))
    assert verdict.category == "missing-package" and verdict.matched == "transformers-video-decoder-missing"
    assert "Install torchcodec in the image" in verdict.remedy


def test_the_video_file_holds_the_cells_frames(tiny_cell, tmp_path):
    av = pytest.importorskip("av")
    from harness.matrix.inputs import VIDEO_FRAMES
    from harness.run.backends.gradio import write_pictures

    (path,) = write_pictures(tiny_cell(input="video", resolution="224x224"), tmp_path)
    with av.open(path) as video:
        frames = list(video.decode(video=0))
    assert path.endswith(".mp4") and len(frames) == VIDEO_FRAMES and (frames[0].width, frames[0].height) == (224, 224)


def test_without_pyav_a_video_cell_is_skipped_saying_what_to_install(backend, tiny_cell, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails, as where PyAV is not installed
    reply = backend().run(tiny_cell(input="video", resolution="224x224", backend="gradio"))
    assert reply == {
        "ok": False,
        "skipped_category": "missing-package",
        "skipped": "the cell's video reaches a WebUI as a file, and writing one needs PyAV, which is not installed "
        "here (pip install av)",
    }
