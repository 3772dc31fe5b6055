"""`chat_demo.py` with the chat history Qwen3-VL's `web_demo_mm.py` builds: (question, answer) tuples,
an upload as a one-element tuple `((path,), None)`. The demo pins gradio 5.49.1, where the Chatbot
still took tuples; gradio 6 removed that format, so on gradio 6 the app's first step answers with
Gradio's error "Data incompatible with messages format. ..." (an unpinned image fails this way).
It loads no model: it fails before one would be asked.

    python tests/apps/tuples_demo.py -c FOLDER --server-port 7860
"""

from __future__ import annotations

import chat_demo
import webui


class Tuples:
    """The chatbot's history as the demo keeps it: one (user, bot) pair per upload or question."""

    @staticmethod
    def question(history: list, text: str) -> list:
        return [*history, (text, None)]

    @staticmethod
    def upload(history: list, path: str) -> list:
        return [*history, ((path,), None)]

    @staticmethod
    def answer(history: list, text: str, first: bool) -> list:
        return [*history[:-1], (history[-1][0], text)]


if __name__ == "__main__":
    webui.serve(
        lambda model: chat_demo.build(model, history=Tuples), webui.arguments(__doc__.splitlines()[0]), with_model=False
    )
