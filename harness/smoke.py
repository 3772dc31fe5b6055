"""`qwen-compat smoke --endpoint URL` / `--webui URL`: a running server's (or WebUI's) release check in one line.

For a release pipeline: start the container, point qwen-compat at it, gate. A built-in matrix sends
the served model three image sizes, two images in one request and a video, as `backend: openai`
cells against the endpoint, or as `backend: gradio` conversations with the WebUI; the verdicts,
reports (`<reports>/<device>/`) and exit code are those of any run, so `qwen-compat gate` can
compare two releases.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from harness.errors import UserError

SIZES = ["448x448", "1024x1024", "1920x1080"]
SUITE = "def test_cell(cell_run):\n    cell_run.check()\n"


def matrix(
    url: str, model: str, family: str, api_key_env: str | None, max_new_tokens: int, backend: str = "openai"
) -> dict:
    """The built-in smoke matrix for one served model: at an OpenAI endpoint, or (`backend` gradio) a WebUI."""
    if backend == "gradio":
        entry = {"hub": model, "family": family, "webui": url}
    else:
        entry = {"hub": model, "family": family, "endpoint": url, "served_model": model}
    entry["id"] = served_id(model)
    if api_key_env:
        entry["api_key_env"] = api_key_env
    return {
        "name": "smoke",
        "description": f"qwen-compat smoke test of {model} at {url}",
        "models": [entry],
        "devices": ["cpu"],  # the device this host reports under; the server's own card is out of view
        "axes": {"resolution": SIZES, "input": ["image", "images", "video"], "backend": [backend]},
        "exclude": [{"when": {"input": ["images", "video"], "resolution": SIZES[1:]}}],
        "defaults": {"max_new_tokens": max_new_tokens},
    }


def served_id(model: str) -> str:
    """The cells' model id from the served model's own name (its last path part: a server launched from a
    folder lists the folder), so that ids read as what was tested."""
    return re.sub(r"[^a-z0-9.]+", "-", model.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-.") or "served"


def family_of(model: str, family: str | None) -> str:
    from harness.matrix.cells import model_identity
    from harness.matrix.schema import ModelEntry

    try:
        return model_identity(ModelEntry(hub=model, family=family), "smoke")[1]
    except UserError:
        raise UserError(
            f"cannot tell the model family of the served model '{model}'.",
            key="--family",
            fix="pass --family qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_vl_moe.",
        ) from None


def _served_model(args) -> str:
    """The model's name: what the endpoint serves (or `--model`); for a WebUI, which cannot tell, `--model`."""
    if args.webui:
        from harness.run.backends.gradio import App

        App(args.webui, key="--webui").close()  # nothing listening, or not a Gradio app: one paragraph, before any cell
        return args.model or "webui"
    from harness.run.backends.openai.stream import Client, Endpoint

    client = Client(Endpoint(args.endpoint, model=args.model, api_key_env=args.api_key_env))
    try:
        return client.model()
    finally:
        client.close()


def run(args) -> int:
    """Write the matrix and a one-test suite under the reports folder, then run them with pytest."""
    import pytest

    url = args.webui or args.endpoint
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url or ""):
        flag = "--webui" if args.webui else "--endpoint"
        raise UserError(
            f"'{url}' is not a server's URL.",
            key=flag,
            fix="give it as --endpoint http://HOST:PORT/v1 or --webui http://HOST:7860/ (https:// also).",
        )
    model = _served_model(args)
    reports = Path(args.reports)
    folder = reports / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "matrix.yaml"
    backend = "gradio" if args.webui else "openai"
    data = matrix(
        args.webui or args.endpoint,
        model,
        family_of(model, args.family),
        args.api_key_env,
        args.max_new_tokens,
        backend,
    )
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / "test_smoke.py").write_text(SUITE)
    (folder / "pytest.ini").write_text("[pytest]\n")  # with -c: the caller's pytest configuration does not apply
    return int(
        pytest.main(
            [str(folder / "test_smoke.py"), "-c", str(folder / "pytest.ini"), "-p", "no:cacheprovider"]
            + [
                "--compat-matrix",
                str(path),
                "--compat-reports",
                str(reports),
                "--compat-device",
                "cpu",
                *(["--compat-lenient"] if getattr(args, "lenient", False) else []),
                *args.pytest_args,
            ]
        )
    )
