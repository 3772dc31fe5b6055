"""A cell as one streamed OpenAI chat-completion request body.

The cell's pixels (the same synthetic images, colours or files the in-process backend uses) travel
as base64 data URLs: images as lossless PNG `image_url` parts, a video as one `video_url` part in
vLLM's frame-sequence form (`data:video/jpeg;base64,<frame>,<frame>,...`). Decoding is greedy
(temperature 0, a fixed seed) and streamed, with the final `usage` asked for
(`stream_options.include_usage`) and token log-probabilities.
"""

from __future__ import annotations

import base64
import io

from harness.matrix import inputs
from harness.matrix.cells import Cell

SEED = 0
TOP_LOGPROBS = 5


def _png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _video_url(frames) -> str:
    """vLLM's frame-sequence data URL: base64 JPEG frames joined by commas (media type video/jpeg)."""
    from PIL import Image

    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(encoded)


def visual_parts(cell: Cell) -> list[dict]:
    """The content parts carrying the cell's images or video."""
    with inputs.built_by_the_harness(f"the {cell.width}x{cell.height} {cell.input} of this cell's request"):
        if cell.input == "video":
            url = _video_url(inputs.synthetic_video(cell.width, cell.height))
            return [{"type": "video_url", "video_url": {"url": url}}]
        images = inputs.pictures(cell.input, cell.width, cell.height, cell.images, **inputs.image_source(cell.image))
        return [{"type": "image_url", "image_url": {"url": _png_url(image)}} for image in images]


def chat_body(cell: Cell, model: str, pixels_field: str | None = "mm_processor_kwargs") -> dict:
    """The chat-completion request body of a cell: its pixels, its prompt, greedy decoding, streamed."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*visual_parts(cell), {"type": "text", "text": cell.prompt}]}],
        "max_tokens": cell.max_new_tokens,
        "temperature": 0,
        "seed": SEED,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
    }
    budget = {k: v for k, v in (("min_pixels", cell.min_pixels), ("max_pixels", cell.max_pixels)) if v is not None}
    if budget and pixels_field:
        body[pixels_field] = budget
    return body
