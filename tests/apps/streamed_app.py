"""A one-page WebUI as many community images ship it: an image, a prompt, and the answer streamed into
a textbox, through a `gr.Interface` over a generator: one endpoint taking both, named after its
function (`/answer`).

    python tests/apps/streamed_app.py -c FOLDER --server-port 7860
"""

from __future__ import annotations

import webui
from webui import gr


def build(model: webui.Model) -> gr.Blocks:
    def answer(image: str, prompt: str):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        yield from model.stream(messages)

    return gr.Interface(
        answer,
        inputs=[gr.Image(type="filepath", label="Image"), gr.Textbox(label="Prompt", value="Describe this image.")],
        outputs=gr.Textbox(label="Answer"),
        title="Qwen-VL (test WebUI)",
        flagging_mode="never",
    )


if __name__ == "__main__":
    webui.serve(build, webui.arguments(__doc__.splitlines()[0]))
