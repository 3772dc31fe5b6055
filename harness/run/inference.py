"""Load a Qwen-VL folder or hub id through `from_pretrained`, and run one cell on it.

One path for a tiny checkpoint, a true-size architecture and a real downloaded model. Runs in the
worker process only: this module imports torch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from harness.errors import HarnessFault, UserError
from harness.matrix import inputs
from harness.models.weights import seed_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENCY_METRICS = ("prefill_s", "decode_tokens_per_s")


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


def _check_source(source: dict, folder: str) -> None:
    """A `path:` that is not a model folder is the matrix's mistake, said before transformers fails on it."""
    if "path" in source and not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"'{folder}' is not a model folder (no config.json in it).",
            key="models.path",
            fix="point `path:` at a folder written by save_pretrained (config.json, weights, processor files).",
        )


def load(
    folder: str,
    *,
    dtype: str,
    attn_implementation: str,
    device: str,
    source: dict | None = None,
    weights_seed=None,
    placement_kwargs: dict | None = None,
    quantization_kwargs: dict | None = None,
):
    """Processor and model through the same `from_pretrained` path a downloaded model takes.

    `weights_seed` (an identity string) makes an empty-weights folder's random weights a function of
    that identity: see `seed_weights`. `placement_kwargs` (device_map, max_memory, offload_folder from
    harness/matrix/placement.py) replace the single `device`. `quantization_kwargs` (a quantization_config that
    quantizes at load, or a GGUF file name: harness/models/quantized.py) go to from_pretrained as they are.
    """
    source = source or {"path": folder}
    _check_attention(attn_implementation)
    _check_source(source, folder)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(
            folder,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            **(placement_kwargs or {"device_map": device}),
            **(quantization_kwargs or {}),
        )
    except OSError as exc:
        if "hub" not in source:
            raise
        raise UserError(
            f"the hub model '{source['hub']}' cannot be loaded: {str(exc).splitlines()[0]}",
            key="models.hub",
            fix="check the id and this runner's network and HF_TOKEN, or download the model and use `path:`.",
        ) from None
    if weights_seed is not None and model.device.type != "meta":
        seed_weights(model, weights_seed)
    return processor, model.eval()


def _attention_configs(model):
    """Every config whose `_attn_implementation` a forward of `model` reads: its own, its sub-configs' (at any
    depth) and those of its sub-models."""
    from transformers import PreTrainedModel

    found, pending = {}, [model.config]
    pending += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) not in found:
            found[id(config)] = config
            pending += [getattr(config, key) for key in config.sub_configs if getattr(config, key, None) is not None]
    return list(found.values())


def switch_attention(model, attn_implementation: str) -> bool:
    """Switch a loaded model to another attention implementation; True when every part of it took the switch.

    A forward reads the implementation from the configs when it runs, so a switched model computes what a fresh
    load with that attention computes (tests/test_loads.py, every family, sdpa and eager). False where
    transformers refused (it raises) or skipped a part (it only logs a warning): the caller then loads again.
    """
    try:
        model.set_attn_implementation(attn_implementation)
    except (ValueError, ImportError):
        return False
    return all(config._attn_implementation == attn_implementation for config in _attention_configs(model))


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
class Prepared:
    """A cell's model inputs, built (and on the model's device) before anything is measured."""

    batch: dict
    input_tokens: int
    visual_tokens: int
    preprocess_s: float


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
    latency: dict = field(default_factory=dict)  # metric -> {median, min, max, spread, n} over the timed repeats


def _visual(cell: CellInput):
    if cell.kind == "video":
        return {"videos": [inputs.synthetic_video(cell.width, cell.height)]}, [{"type": "video"}]
    images = inputs.pictures(cell.kind, cell.width, cell.height, cell.count, cell.image_path, cell.color)
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


def input_device(model) -> torch.device:
    """Where a model's inputs go: its device, or, for a model whose first weights accelerate offloaded (its
    `device` then reads `meta`), accelerate's main device, where offloaded modules run: the first GPU of its
    device map, else the CPU."""
    if model.device.type != "meta":
        return model.device
    gpus = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if d not in ("cpu", "disk")]
    return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0]) if gpus else torch.device("cpu")


def prepare(processor, model, cell: CellInput) -> Prepared:
    """chat template -> processor -> tensors on the model's device; a size the processor rejects is the
    matrix's input, said as such (never a model failure)."""
    with inputs.built_by_the_harness(f"the {cell.width}x{cell.height} {cell.kind} of this cell"):
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
    try:
        batch = processor(text=[text], return_tensors="pt", **visual, **kwargs)
    except ValueError as exc:
        what = f"the image {cell.image_path}" if cell.image_path else f"{cell.width}x{cell.height} {cell.kind}"
        raise UserError(
            f"the model's processor rejects this cell's input ({what}): {exc}",
            key="defaults.image" if cell.image_path else "axes.resolution",
            fix="use an input whose size the processor accepts (aspect ratio at most 200), or a pixel budget "
            "that keeps it in range.",
        ) from None
    batch = batch.to(input_device(model))
    preprocess_s = time.perf_counter() - t0
    tokenizer = processor.tokenizer
    pad_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    input_ids = batch["input_ids"][0]
    visual_tokens = int(sum((input_ids == i).sum().item() for i in pad_ids))
    config = getattr(model, "config", None)
    wanted = getattr(config, "video_token_id" if cell.kind == "video" else "image_token_id", None)
    if wanted is not None and not (input_ids == wanted).any():
        raise HarnessFault(
            f"the prompt qwen-compat built carries no {cell.kind} token: the model's config says "
            f"{'video' if cell.kind == 'video' else 'image'}_token_id {wanted}, the processor's tokenizer gives "
            f"{sorted(pad_ids)}; the model would fail with 'Image features and image tokens do not match'. "
            "This is the harness's processor for this checkpoint, not the model."
        )
    return Prepared(batch, int(input_ids.shape[0]), visual_tokens, preprocess_s)


class StepTimer:
    """Timestamps of a generation's start, of each step's logits and of its end.

    On a GPU these are CUDA events, read after one synchronisation at the end: a host clock taken
    while kernels are still queued would time their launch, not their completion. On the CPU,
    `perf_counter`.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Every mark after the first, in seconds since the first."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(m) / 1000 for m in self.marks[1:]]
        return [m - self.marks[0] for m in self.marks[1:]]


class _LogitsWatch:
    """A forward hook on the output layer: per step a finiteness flag (kept on the device, read once at
    the end) and a timer mark; the first step's logits are kept for drift. Raw logits, before any
    logits processor sets tokens to -inf."""

    def __init__(self, timer: StepTimer):
        self.timer, self.finite, self.first = timer, [], None

    def __call__(self, module, args, output):
        last = output[0, -1]
        self.timer.mark()
        self.finite.append(torch.isfinite(last).all())
        if self.first is None:
            self.first = last.detach().clone()


def _generate_once(model, prepared: Prepared, max_new_tokens: int):
    timer = StepTimer(input_device(model))
    watch = _LogitsWatch(timer)
    hook = model.get_output_embeddings().register_forward_hook(watch)
    try:
        timer.mark()
        with torch.inference_mode():
            sequences = model.generate(
                **prepared.batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
            )
        timer.mark()
    finally:
        hook.remove()
    *steps, end = timer.seconds()
    steps = steps or [end]
    decode_rate = (len(steps) - 1) / (end - steps[0]) if len(steps) > 1 and end > steps[0] else None
    return sequences, watch, steps[0], decode_rate


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 5),
        "min": round(min(values), 5),
        "max": round(max(values), 5),
        "spread": round(max(values) - min(values), 5),
        "n": len(values),
    }


def run(processor, model, prepared: Prepared, *, max_new_tokens: int, repeats: int = 1, fault=None) -> Generation:
    """Greedy generation on prepared inputs: with `repeats` > 1, one warm-up and `repeats` timed runs.

    The first timed run's tokens, logits and finiteness are the cell's output; latency is the median
    over the timed runs, with min, max and spread beside it.
    """
    if fault is not None:
        fault()
    if repeats > 1:
        _generate_once(model, prepared, max_new_tokens)
    timings = {metric: [] for metric in LATENCY_METRICS}
    for i in range(repeats):
        sequences, watch, prefill_s, decode_rate = _generate_once(model, prepared, max_new_tokens)
        timings["prefill_s"].append(prefill_s)
        if decode_rate is not None:
            timings["decode_tokens_per_s"].append(decode_rate)
        if i == 0:
            first = (sequences, watch)
    sequences, watch = first
    new_ids = sequences[0, prepared.input_tokens :].tolist()
    finite = torch.stack(watch.finite).tolist() if watch.finite else []
    latency = {metric: _spread(values) for metric, values in timings.items() if values}
    return Generation(
        new_token_ids=new_ids,
        text=processor.tokenizer.decode(new_ids, skip_special_tokens=True),
        visual_tokens=prepared.visual_tokens,
        input_tokens=prepared.input_tokens,
        preprocess_s=prepared.preprocess_s,
        prefill_s=latency["prefill_s"]["median"],
        decode_tokens_per_s=latency["decode_tokens_per_s"]["median"] if "decode_tokens_per_s" in latency else None,
        nonfinite_steps=[i for i, ok in enumerate(finite) if not ok],
        first_logits=watch.first.float().cpu() if watch.first is not None else None,
        latency=latency if repeats > 1 else {},
    )
