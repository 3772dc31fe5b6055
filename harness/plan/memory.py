"""Know before you run: predicted peak memory of a cell, from the architecture and the inputs.

peak = weights + overhead + max(vision activations, KV cache + text activations)
- weights: every parameter (every expert of a MoE) x bytes of the dtype, counted from the config; a quantized
  cell's from its layout (harness/plan/quantized.py: packed values, scales, zero points, groups);
- KV cache: layers x 2 x KV heads x head size x cached tokens (text + visual + new - 1) x bytes;
- vision activations: patches before merging; linear in patches for sdpa / flash-attention,
  plus heads x patches^2 (float32 softmax) for eager, per image or per window for Qwen2.5-VL;
- overhead: the CUDA context and allocator slack on a GPU, the Python/torch runtime on the CPU.
Runs wherever transformers is importable (CLI, worker), never in the pytest process itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

from harness.matrix.cells import Cell
from harness.matrix.gpus import table
from harness.models.families import FAMILIES, Family
from harness.plan.visual_tokens import image_tokens

MIB = 2**20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_MIB = 500  # typical torch CUDA context on sm80+/sm90 with CUDA 12 (pytorch/pytorch#37250: 300-600 MiB)
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation over what tensors hold
# Settled worker RSS with torch 2.14.1 + transformers on this machine's default CPU run
# (results.json settled_before_mib): 744 MiB at the first cell, 885 MiB median as code paths warm up.
CPU_RUNTIME_MIB = 850
TIGHT = 0.10


# --- parameters, from a complete config dict (transformers' to_dict) -------------------------------


def _text_parameters(t: dict, moe: bool) -> int:
    hidden, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    head_dim = t.get("head_dim") or hidden // heads
    qwen3 = "head_dim" in t and t.get("attention_bias") is not None
    bias = t.get("attention_bias", not qwen3)
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    if bias:
        attn += heads * head_dim + 2 * kv * head_dim
    if qwen3:
        attn += 2 * head_dim  # q_norm, k_norm
    experts = t.get("num_experts") or t.get("num_local_experts") or 0  # to_dict() writes num_local_experts
    total = 0
    for layer in range(t["num_hidden_layers"]):
        sparse = (
            moe
            and experts > 0
            and layer not in (t.get("mlp_only_layers") or [])
            and (layer + 1) % t.get("decoder_sparse_step", 1) == 0
        )
        if sparse:
            mlp = experts * 3 * hidden * t["moe_intermediate_size"] + hidden * experts
        else:
            mlp = 3 * hidden * t["intermediate_size"]
        total += attn + mlp + 2 * hidden
    return total + t["vocab_size"] * hidden + hidden


def _vision_parameters(v: dict, family: Family) -> int:
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    m2 = v["spatial_merge_size"] ** 2
    if family.key == "qwen2_vl":
        e, inter = v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"])
        block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * inter + inter) + (inter * e + e)
        merger = 2 * e + (e * m2) ** 2 + e * m2 + e * m2 * v["hidden_size"] + v["hidden_size"]
        return patch * e + v["depth"] * block + merger
    h, inter, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    if family.key == "qwen2_5_vl":
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * inter + inter) + (inter * h + h)
        merger = h + (h * m2) ** 2 + h * m2 + h * m2 * out + out
        return patch * h + v["depth"] * block + merger
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
    fcs = (h * m2) ** 2 + h * m2 + h * m2 * out + out
    merger = 2 * h + fcs
    deepstack = len(v.get("deepstack_visual_indexes") or []) * (2 * h * m2 + fcs)
    return patch * h + h + v["num_position_embeddings"] * h + v["depth"] * block + merger + deepstack


def parameter_count(config: dict) -> int:
    """Parameters of a Qwen-VL model from its complete config (tied embeddings counted once)."""
    family = FAMILIES[config["model_type"]]
    text = config["text_config"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    lm_head = 0 if tied else text["vocab_size"] * text["hidden_size"]
    return (
        _text_parameters(text, family.key == "qwen3_vl_moe")
        + _vision_parameters(config["vision_config"], family)
        + lm_head
    )


# --- the configs and inputs a cell implies ------------------------------------------------------------


@cache
def _full_config(source_key: tuple) -> dict:
    """The complete config dict (library defaults filled in) of a cell's model."""
    import json

    import transformers

    from harness.models import architectures, checkpoints

    source = dict(source_key)
    if "tiny" in source:
        return checkpoints.tiny_config(FAMILIES[source["tiny"]], source.get("variant", "default")).to_dict()
    if "arch" in source:
        raw = architectures.load_config(source["arch"])
    else:
        folder = checkpoints.checkpoint_for(source)
        raw = (
            json.loads(open(f"{folder}/config.json").read())
            if "path" in source
            else architectures.load_config(source["hub"])
        )
    return getattr(transformers, FAMILIES[raw["model_type"]].config_class).from_dict(raw).to_dict()


def config_for(cell: Cell) -> dict:
    return _full_config(tuple(sorted(cell.source.items())))


_META_MODELS: dict[tuple, object] = {}


def meta_model(cell: Cell):
    """The cell's model on the meta device (shapes and dtypes, no memory), built once per model and dtype."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    key = (tuple(sorted(cell.source.items())), cell.dtype)
    if key not in _META_MODELS:
        config_dict = config_for(cell)
        config = getattr(transformers, FAMILIES[config_dict["model_type"]].config_class).from_dict(config_dict)
        with init_empty_weights():
            _META_MODELS[key] = transformers.AutoModelForImageTextToText.from_config(
                config, dtype=getattr(torch, cell.dtype)
            )
    return _META_MODELS[key]


@cache
def _video_tokens(family_key: str, width: int, height: int, min_pixels, max_pixels) -> int:
    """Video tokens, counted by the family's own video processor on the synthetic frames."""
    from harness.matrix import inputs
    from harness.models import checkpoints

    family = FAMILIES[family_key]
    processor = checkpoints.build_processor(family, checkpoints.TINY_SPECIAL_BASE).video_processor
    kwargs = {}
    if min_pixels or max_pixels:
        size = dict(processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
        kwargs["size"] = size
    out = processor(
        videos=[inputs.synthetic_video(width, height)], return_tensors="pt", do_sample_frames=False, **kwargs
    )
    return int(out["video_grid_thw"].prod()) // family.merge_size**2


def visual_tokens_for(cell: Cell, measured: int | None = None) -> tuple[int, int]:
    """(visual tokens, largest single attention chunk in patches) of the cell's input; a video's `measured`
    tokens (the worker's count) spare running the video processor again on the same frames."""
    family = FAMILIES[cell.family]
    m2 = family.merge_size**2
    if cell.input == "video":
        total = measured or _video_tokens(cell.family, cell.width, cell.height, cell.min_pixels, cell.max_pixels)
        return total, total * m2 // math.ceil(4 / family.temporal_patch_size)
    per_image = image_tokens(
        cell.height,
        cell.width,
        family.factor,
        cell.min_pixels or family.min_pixels,
        cell.max_pixels or family.max_pixels,
    )
    count = cell.images if cell.input == "images" else 1
    return per_image * count, per_image * m2


TEMPLATE_TOKENS = 30  # system prompt, roles and vision markers of Qwen's chat template


@dataclass
class Prediction:
    id: str
    predicted_peak_mib: float
    verdict: str  # fits | tight | over
    budget_mib: float | None
    parts: dict
    visual_tokens: int
    cached_tokens: int
    placement: dict | None = None  # a placed cell's device map and per-device peaks (harness/plan/placement.py)

    def to_dict(self) -> dict:
        return asdict(self)


def predict(
    cell: Cell,
    *,
    text_tokens: int | None = None,
    visual_tokens: int | None = None,
    device_kind: str | None = None,
    device_mib: float | None = None,
) -> Prediction:
    """Predicted peak memory of one cell. Measured token counts, when known, replace the estimates; `device_mib`
    is the memory of the device it runs on where the worker knows it (a MIG slice's)."""
    from harness.matrix.budgets import parse_budget_mib

    config = config_for(cell)
    text, vision = config["text_config"], config["vision_config"]
    family = FAMILIES[cell.family]
    nbytes = BYTES[cell.dtype]
    est_visual, chunk = visual_tokens_for(cell, visual_tokens)
    visual = est_visual if visual_tokens is None else visual_tokens
    prompt = len(cell.prompt.encode()) + TEMPLATE_TOKENS if text_tokens is None else text_tokens
    cached = prompt + visual + cell.max_new_tokens - 1

    weights = parameter_count(config) * nbytes
    quantized = None
    if cell.quantization != "none":
        from harness.plan.quantized import weight_bytes

        on_card = table()[cell.device].sm if (device_kind or cell.device) != "cpu" else None
        quantized = weight_bytes(meta_model(cell), cell.quantization, cell.dtype, gpu_sm=on_card)
        weights = quantized.resident
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kv = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * cached * nbytes

    patches = visual * family.merge_size**2
    v_hidden = vision.get("embed_dim") or vision["hidden_size"]
    v_inter = vision.get("intermediate_size") or int(v_hidden * vision.get("mlp_ratio", 4))
    vision_act = patches * (6 * v_hidden + 3 * v_inter) * nbytes + patches * 3 * family.patch_size**2 * 2 * 4
    if cell.attn_implementation == "eager":
        if family.key == "qwen2_5_vl" and not vision.get("fullatt_block_indexes"):
            chunk = (vision["window_size"] // family.patch_size) ** 2
        vision_act += 2 * vision["num_heads"] * chunk**2 * 4
    seq = prompt + visual
    text_inter = (
        text["moe_intermediate_size"] * text["num_experts_per_tok"]
        if family.key == "qwen3_vl_moe"
        else text["intermediate_size"]
    )
    text_act = seq * (4 * text["hidden_size"] + 3 * text_inter) * nbytes
    if cell.attn_implementation == "eager":
        text_act += 2 * text["num_attention_heads"] * seq**2 * 4

    on_gpu = (device_kind or cell.device) != "cpu"
    body = weights + max(vision_act, kv + text_act)
    overhead = (CUDA_CONTEXT_MIB * MIB + ALLOCATOR_SLACK * body) if on_gpu else CPU_RUNTIME_MIB * MIB
    peak = (body + overhead) / MIB
    card = device_mib or table()[cell.device].memory_mib
    budget = parse_budget_mib(cell.budget, cell.device, device_mib) if cell.budget else card
    if budget is None:
        verdict = "fits"
    else:
        verdict = "over" if peak > budget else "tight" if peak > (1 - TIGHT) * budget else "fits"
    parts = {
        "weights_mib": round(weights / MIB, 1),
        "kv_cache_mib": round(kv / MIB, 2),
        "vision_activations_mib": round(vision_act / MIB, 1),
        "text_activations_mib": round(text_act / MIB, 1),
        "overhead_mib": round(overhead / MIB, 1),
    }
    if quantized is not None:  # what the quantized checkpoint holds, beside what transformers runs
        parts["weights_packed_mib"] = round(quantized.packed / MIB, 1)
    return Prediction(cell.id, round(peak, 1), verdict, round(budget, 1) if budget else None, parts, visual, cached)


def largest_fitting_max_pixels(cell: Cell) -> int | None:
    """The largest max_pixels (a multiple of the family's factor squared) at which the planner predicts
    the cell `fits` its budget (or the card) with the planner's margin; None when not even min_pixels does.

    Bisection: the predicted peak only grows with max_pixels. The search stops at the cell's own pixel
    count, beyond which max_pixels no longer changes the visual tokens.
    """
    import dataclasses

    family = FAMILIES[cell.family]
    unit = family.factor**2
    min_pixels = cell.min_pixels or family.min_pixels

    def fits(k: int) -> bool:
        return predict(dataclasses.replace(cell, max_pixels=k * unit)).verdict == "fits"

    lo, hi = math.ceil(min_pixels / unit), max(math.ceil(min_pixels / unit), math.ceil(cell.width * cell.height / unit))
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * unit
