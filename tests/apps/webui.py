"""What the test WebUIs share: a model loaded and streamed the way Qwen-VL demos do it, and the command
line that serves one app per checkpoint.

Not the harness's code on purpose: a released WebUI brings its own transformers calls, and the
harness must meet them from outside, through Gradio only. Decoding is greedy (`do_sample=False`), so
an app's answer can be compared with the harness's in-process run of the same model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from threading import Thread

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # launch() would ask an outside host for the version

import gradio as gr  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


class Model:
    """A checkpoint's processor and model, loaded once when the app starts."""

    def __init__(self, checkpoint: str, dtype: str, max_new_tokens: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
        self.max_new_tokens = max_new_tokens

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """The answer so far, after each piece the streamer hands over (chat-template messages whose image
        and video parts are file paths)."""
        from transformers import TextIteratorStreamer

        inputs = self.processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        streamer = TextIteratorStreamer(
            self.processor.tokenizer, timeout=60.0, skip_prompt=True, skip_special_tokens=True
        )
        kwargs = {**inputs, "max_new_tokens": self.max_new_tokens, "do_sample": False, "streamer": streamer}
        Thread(target=self.model.generate, kwargs=kwargs, daemon=True).start()
        text = ""
        for piece in streamer:
            text += piece
            yield text


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "-c",
        "--checkpoint-path",
        action="append",
        required=True,
        help="a model folder, served at /; or NAME=FOLDER, repeatable, each app served at /NAME/",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--server-name", default="127.0.0.1")
    parser.add_argument("--server-port", type=int, default=7860)
    return parser.parse_args()


def serve(build: Callable[[Model | None], gr.Blocks], args: argparse.Namespace, with_model: bool = True) -> None:
    """One folder: its app on / through `launch()`, as the demos do. Several NAME=FOLDER: one app each,
    mounted at /NAME/ on one server (one process start for many models)."""
    models = [spec.partition("=")[::2] if "=" in spec else ("", spec) for spec in args.checkpoint_path]

    def app(folder: str) -> gr.Blocks:
        return build(Model(folder, args.dtype, args.max_new_tokens) if with_model else None)

    if len(models) == 1 and not models[0][0]:
        app(models[0][1]).queue().launch(server_name=args.server_name, server_port=args.server_port)
        return
    import fastapi
    import uvicorn

    root = fastapi.FastAPI()
    for name, folder in models:
        gr.mount_gradio_app(root, app(folder).queue(), path=f"/{name}")
    # SIGTERM ends it at once, as it ends a `launch()`ed app (which installs no handler): uvicorn would wait
    # for the clients' open heartbeat streams
    uvicorn.run(root, host=args.server_name, port=args.server_port, log_level="warning", timeout_graceful_shutdown=0)
