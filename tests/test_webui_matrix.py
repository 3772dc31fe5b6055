"""`backend: gradio` in the matrix: the model keys `webui:`, `steps:`, `greedy:` and `launch:` (a WebUI
command or the docker template), what a cell carries to its backend, and the mistakes said before
anything runs."""

from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.matrix.cells import expand
from harness.matrix.schema import Matrix, load


def cells(model: dict, backends=("gradio",), **axes):
    matrix = Matrix.model_validate(
        {"models": [{"tiny": "qwen2_vl", **model}], "axes": {"backend": list(backends), **axes}}
    )
    return expand(matrix, "release.yaml")


def test_a_webui_cell_carries_its_app_steps_and_greediness():
    steps = [{"upload": "/add_file"}, {"text": "/add_text", "with": {"temperature": 0}}, {"answer": "/predict"}]
    (cell,) = cells({"webui": "http://10.0.0.5:7860/", "steps": steps, "greedy": True})
    assert cell.id == "tiny-qwen2-vl-endpoint-448x448-gradio" and cell.group.endswith("/gradio")
    assert cell.serving == {
        "webui": "http://10.0.0.5:7860/",
        "steps": [
            {"upload": "/add_file", "with": {}},
            {"text": "/add_text", "with": {"temperature": 0}},
            {"answer": "/predict", "with": {}},
        ],
        "greedy": True,
        "matrix_file": "release.yaml",
    }


def test_a_launched_webui_and_a_docker_image_carry_their_command():
    (command,) = cells({"launch": "python web_demo_mm.py -c {model} --server-port {port}"})
    assert command.serving["launch"] == "python web_demo_mm.py -c {model} --server-port {port}"
    assert "image" not in command.serving and command.serving["startup_timeout_s"] == 600
    docker = {"command": "docker", "image": "ghcr.io/acme/qwen3-vl-webui:1.4", "shm_size": "16gb"}  # the seed's
    (image,) = cells({"launch": docker})
    assert image.serving["launch"] == "docker" and image.serving["image"] == "ghcr.io/acme/qwen3-vl-webui:1.4"
    assert image.serving["shm_size"] == "16gb" and image.serving["env"] == {"MODEL": "{model}", "DTYPE": "{dtype}"}
    assert image.serving["port"] == 7860 and image.serving["args"] is None


def test_served_cells_of_the_two_backends_keep_their_own_keys():
    openai, gradio = cells({"endpoint": "http://h:8000/v1", "webui": "http://h:7860/"}, backends=("openai", "gradio"))
    assert openai.serving["endpoint"] == "http://h:8000/v1" and "webui" not in openai.serving
    assert gradio.serving["webui"] == "http://h:7860/" and "endpoint" not in gradio.serving


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({}, "has `backend: gradio` cells but no WebUI to talk to"),
        ({"launch": "vllm"}, "the launch template 'vllm' starts an OpenAI-compatible server, not a WebUI"),
        ({"launch": "python app.py --port {port} --gpus {gpus}"}, "unknown placeholder {gpus}"),
        (
            {"launch": {"command": "docker", "image": "i", "env": {"M": "{checkpoint}"}}},
            "unknown placeholder {checkpoint}",
        ),
    ],
)
def test_what_a_gradio_model_lacks_is_one_paragraph(model, says):
    with pytest.raises(UserError) as err:
        cells(model)
    assert says in str(err.value) and "release.yaml" in str(err.value) and "Fix:" in str(err.value)


def test_the_docker_template_is_for_webui_images():
    with pytest.raises(UserError, match="the docker launch template runs a WebUI image, for `backend: gradio` cells"):
        cells({"launch": {"command": "docker", "image": "vllm/vllm-openai"}}, backends=("openai",))


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"launch": "docker"}, "needs the image: write `launch: {command: docker, image: IMAGE}`"),
        ({"launch": {"command": "docker"}}, "needs `image:`"),
        ({"launch": {"command": "python app.py", "image": "i"}}, "`image:` belongs to the docker command only"),
        ({"webui": "http://h:7860/", "launch": "python app.py --port {port}"}, "either running at `webui:` or"),
        ({"webui": "h:7860"}, "String should match pattern"),
        ({"steps": [{"upload": "/add_file", "text": "/add_text"}]}, "a step names one endpoint"),
        ({"steps": [{"with": {"x": 1}}]}, "a step names one endpoint"),
        ({"launch": {"command": "docker", "image": "i", "shm_size": "lots"}}, "String should match pattern"),
        (
            {"steps": [{"click": "/go"}]},
            "unknown key 'click'. Fix: allowed keys here: upload, text, answer, call, with.",
        ),
    ],
)
def test_malformed_gradio_keys_are_matrix_errors(tmp_path, model, says):
    import yaml

    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump({"models": [{"tiny": "qwen2_vl", **model}], "axes": {"backend": ["gradio"]}}))
    with pytest.raises(UserError) as err:
        load(path)
    assert says in str(err.value)


def test_a_webui_cell_placed_across_devices_is_skipped_saying_the_app_places_its_model():
    from harness.matrix.capabilities import capability_expectation
    from harness.matrix.gpus import table

    (cell,) = cells({"webui": "http://h:7860/"}, placement=["auto"])
    expectation = capability_expectation(cell, table()["cpu"])
    assert expectation.outcome == "skip" and "a served model is placed by its server" in expectation.reason
