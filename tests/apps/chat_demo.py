"""A WebUI written the way Qwen3-VL's `web_demo_mm.py` is: a Blocks chat with no `api_name`s (its
endpoints are its functions' names), a `gr.State` task history, and three steps a person takes in
one session: upload a file (`/add_file`), type and submit (`/add_text`, then `/predict`, a streamed
generator chained to it by `.then`). Its chat history is in Gradio's messages format, which gradio 6
requires; `tuples_demo.py` is the same app with the demo's own tuples history.

    python tests/apps/chat_demo.py -c FOLDER --server-port 7860
"""

from __future__ import annotations

import copy
import os

import webui
from webui import gr

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


class Messages:
    """The chatbot's history as messages ({"role", "content"}), one per upload, question and answer."""

    @staticmethod
    def question(history: list, text: str) -> list:
        return [*history, {"role": "user", "content": text}]

    @staticmethod
    def upload(history: list, path: str) -> list:
        return [*history, {"role": "user", "content": {"path": path}}]

    @staticmethod
    def answer(history: list, text: str, first: bool) -> list:
        return (
            [*history, {"role": "assistant", "content": text}]
            if first
            else [*history[:-1], {**history[-1], "content": text}]
        )


def _messages(task_history: list) -> list[dict]:
    """The model's conversation from the task history of (query, answer) pairs, as the demo builds it:
    uploads gather into the next question's content."""
    messages, content = [], []
    for query, answer in copy.deepcopy(task_history):
        if isinstance(query, (tuple, list)):
            kind = "video" if query[0].lower().endswith(VIDEO_SUFFIXES) else "image"
            content.append({"type": kind, kind: os.path.abspath(query[0])})
        else:
            messages.append({"role": "user", "content": [*content, {"type": "text", "text": query}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer or ""}]})
            content = []
    return messages[:-1]  # the last answer is the one to generate


def build(model: webui.Model | None, history=Messages) -> gr.Blocks:
    def add_text(chat, task_history, text):
        return history.question(chat or [], text), (task_history or []) + [(text, None)]

    def add_file(chat, task_history, file):
        return history.upload(chat or [], file.name), (task_history or []) + [((file.name,), None)]

    def predict(chat, task_history):
        if not task_history or not task_history[-1][0]:
            yield chat
            return
        answer, first = "", True
        for answer in model.stream(_messages(task_history)):
            chat = history.answer(chat, answer, first)
            first = False
            yield chat
        task_history[-1] = (task_history[-1][0], answer)

    def regenerate(chat, task_history):
        if not task_history or task_history[-1][1] is None:
            yield chat
            return
        task_history[-1] = (task_history[-1][0], None)
        yield from predict(chat[:-1], task_history)

    def reset_user_input():
        return gr.update(value="")

    def reset_state(chat, task_history):
        task_history.clear()
        return []

    with gr.Blocks() as demo:
        gr.Markdown("<center><font size=8>Qwen-VL (test WebUI)</center>")
        chatbot = gr.Chatbot(label="Qwen-VL", height=500)
        query = gr.Textbox(lines=2, label="Input")
        task_history = gr.State([])
        with gr.Row():
            upload = gr.UploadButton("Upload", file_types=["image", "video"])
            submit = gr.Button("Submit")
            again = gr.Button("Regenerate")
            clear = gr.Button("Clear History")
        submit.click(add_text, [chatbot, task_history, query], [chatbot, task_history]).then(
            predict, [chatbot, task_history], [chatbot], show_progress=True
        )
        submit.click(reset_user_input, [], [query])
        clear.click(reset_state, [chatbot, task_history], [chatbot], show_progress=True)
        again.click(regenerate, [chatbot, task_history], [chatbot], show_progress=True)
        upload.upload(add_file, [chatbot, task_history, upload], [chatbot, task_history], show_progress=True)
    return demo


if __name__ == "__main__":
    webui.serve(build, webui.arguments(__doc__.splitlines()[0]))
