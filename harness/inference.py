"""Load a Qwen-VL folder or hub id through `from_pretrained`, and run one cell on it.

One path for a tiny checkpoint, a true-size architecture and a real downloaded model. Runs in the
worker process only: this module imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from . import inputs
from .errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_attention(attn_implementation: str) -> None:
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise UserError(
                "attn_implementation 'flash_attention_2' needs the flash-attn package, which is not "
                "installed here (it is an optional extra, built for CUDA GPUs of compute capability 8.0 "
                "or newer).",
                key="axes.attn_implementation",
                fix="install it on a GPU runner with `pip install 'qwen-compat[flash-attn]'`, or use "
                "attn_implementation 'sdpa' (any device) or 'eager'.",
            )


def load(source: str, *, dtype: str, attn_implementation: str, device: str):
    """Processor and model through the same `from_pretrained` path a downloaded model takes."""
    _check_attention(attn_implementation)
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=DTYPES[dtype], attn_implementation=attn_implementation, device_map=device
    )
    return processor, model.eval()


@dataclass
class CellInput:
    """What one cell feeds the model; built from the cell's axes."""

    kind: str = "image"  # image | images | video
    width: int = 448
    height: int = 448
    count: int = 1  # images for kind "images"
    min_pixels: int | None = None
    max_pixels: int | None = None
    prompt: str = "Describe this image."
    image_path: str | None = None
    color: tuple[int, int, int] | None = None


@dataclass
class Generation:
    new_token_ids: list[int]
    text: str
    visual_tokens: int
    input_tokens: int
    preprocess_s: float
    prefill_s: float
    decode_tokens_per_s: float | None
    nonfinite_steps: list[int] = field(default_factory=list)
    first_logits: torch.Tensor | None = None


def image_source(spec: str | None) -> dict:
    """CellInput fields for a matrix's `image:`: a solid colour `rgb(R,G,B)` or a file path."""
    if not spec:
        return {}
    if spec.startswith("rgb("):
        return {"color": tuple(int(v) for v in spec[4:-1].split(","))}
    return {"image_path": spec}


class _StepClock(LogitsProcessor):
    """Records when each decoding step's logits arrive: the first is time to first token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _visual(cell: CellInput):
    if cell.kind == "video":
        return {"videos": [inputs.synthetic_video(cell.width, cell.height)]}, [{"type": "video"}]
    if cell.image_path:
        images = [inputs.load_image(cell.image_path)]
    elif cell.color:
        images = [inputs.solid_image(cell.width, cell.height, cell.color)]
    else:
        n = cell.count if cell.kind == "images" else 1
        images = [inputs.synthetic_image(cell.width, cell.height, seed=i) for i in range(n)]
    return {"images": images}, [{"type": "image"}] * len(images)


def _budget_kwargs(processor, cell: CellInput) -> dict:
    if cell.min_pixels is None and cell.max_pixels is None:
        return {}
    size = dict(processor.image_processor.size)
    if cell.min_pixels is not None:
        size["shortest_edge"] = cell.min_pixels
    if cell.max_pixels is not None:
        size["longest_edge"] = cell.max_pixels
    return {"images_kwargs": {"size": size}, "videos_kwargs": {"size": size}}


def run(processor, model, cell: CellInput, *, max_new_tokens: int, fault=None) -> Generation:
    """chat template -> processor -> greedy generate; returns ids, text, visual tokens and timings."""
    visual, parts = _visual(cell)
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": cell.prompt}]}]
    t0 = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = _budget_kwargs(processor, cell)
    if cell.kind == "video":
        kwargs.setdefault("videos_kwargs", {}).update(
            do_sample_frames=False,
            video_metadata=[
                {
                    "fps": 2.0,
                    "total_num_frames": inputs.VIDEO_FRAMES,
                    "frames_indices": list(range(inputs.VIDEO_FRAMES)),
                }
            ],
        )
    batch = processor(text=[text], return_tensors="pt", **visual, **kwargs).to(model.device)
    preprocess_s = time.perf_counter() - t0

    tokenizer = processor.tokenizer
    pad_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    input_ids = batch["input_ids"][0]
    visual_tokens = int(sum((input_ids == i).sum().item() for i in pad_ids))

    if fault is not None:
        fault()
    clock = _StepClock()
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([clock]),
        )
    end = time.perf_counter()
    new_ids = out.sequences[0, input_ids.shape[0] :].tolist()
    steps = clock.times or [end]
    decode_rate = (len(steps) - 1) / (end - steps[0]) if len(steps) > 1 and end > steps[0] else None
    logits = out.logits or ()
    return Generation(
        new_token_ids=new_ids,
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        visual_tokens=visual_tokens,
        input_tokens=int(input_ids.shape[0]),
        preprocess_s=preprocess_s,
        prefill_s=steps[0] - t1,
        decode_tokens_per_s=decode_rate,
        nonfinite_steps=[i for i, step in enumerate(logits) if not torch.isfinite(step).all()],
        first_logits=logits[0][0].float().cpu() if logits else None,
    )
