"""What a weight format costs and where a launched engine refuses it, known from the model's shapes alone.

- Weight bytes: each nn.Linear the format quantizes (the language model's; the vision tower's too with
  +vision; never lm_head or embeddings) holds bits x in x out / 8 packed, plus a scale (and zero point) per group
  and output row, GPTQ's g_idx per input row and per-module extras, from the layout in
  harness/data/quantization.yaml; everything else stays in the cell's dtype. `resident` is what transformers
  holds while generating (compressed-tensors and GGUF run dequantized), `packed` what the checkpoint and a
  kernel engine hold.
- Tensor parallelism: vLLM's Marlin kernels need each shard of a quantized layer to hold whole tiles
  (min_thread_n output columns, min_thread_k input rows) and whole groups; a model whose intermediate size split
  by the TP degree does not divide fails at load. Checked here from the config, before a server starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.matrix.quantization import Format, marlin, parse
from harness.models.quantized import KEEP_UNQUANTIZED, fitted_group_size

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class WeightBytes:
    resident: int  # what transformers holds after the first forward pass
    packed: int  # what the quantized checkpoint (and a kernel that keeps it packed) holds
    quantized_modules: int


def _per_value(size: float | str, dtype_bytes: int) -> float:
    return dtype_bytes if size == "dtype" else float(size)


def linear_bytes(fmt: Format, in_features: int, out_features: int, dtype_bytes: int, group: int | None) -> float:
    """Packed bytes of one quantized nn.Linear's weight: the quantized values, the per-group scales and zero points,
    GPTQ's per-input index and the module's fixed extras."""
    layout = fmt.layout
    groups = math.ceil(in_features / group) if group else 1
    per_group = _per_value(layout.scale_bytes, dtype_bytes) + _per_value(layout.zero_bytes, dtype_bytes)
    return (
        layout.bits * in_features * out_features / 8
        + groups * math.ceil(out_features / layout.block_rows) * per_group
        + layout.index_bytes * in_features
        + layout.module_bytes
    )


def _quantized(name: str, vision: bool) -> bool:
    skipped = ["lm_head"] if vision else KEEP_UNQUANTIZED
    return not any(name == s or name.startswith(s + ".") for s in skipped)


def weight_bytes(model, value: str, dtype: str, *, gpu_sm: int | None = None) -> WeightBytes:
    """Bytes of `model`'s weights (a meta-device model: shapes only) in the format `value`, in `dtype`, as
    transformers holds them on a card of compute capability `gpu_sm` (None: the CPU): a format it runs natively only
    from some capability (fine-grained FP8: sm89) is dequantized below it."""
    import torch

    q = parse(value)
    dtype_bytes = BYTES[dtype]
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _quantized(name, q.vision)
    }
    group = fitted_group_size(q.format.layout.group_size, sorted({m.in_features for m in linears.values()}))
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    quantized_weights = {f"{name}.weight" for name in linears}
    plain = sum(
        t.numel() * dtype_bytes
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name not in tied and name not in quantized_weights and t.is_floating_point()
    )
    packed = sum(linear_bytes(q.format, m.in_features, m.out_features, dtype_bytes, group) for m in linears.values())
    dense = sum(m.in_features * m.out_features * dtype_bytes for m in linears.values())
    extras = packed - sum(q.format.layout.bits * m.in_features * m.out_features / 8 for m in linears.values())
    native = q.format.engines["transformers"].native_sm if "transformers" in q.format.engines else None
    dequantized = q.format.layout.resident == "dense" or (native is not None and (gpu_sm or 0) < native)
    resident = dense + extras if dequantized else packed
    return WeightBytes(int(plain + resident), int(plain + packed), len(linears))


# --- tensor parallelism in a launched engine -------------------------------------------------------------


def _shards(text: dict, tp: int) -> list[tuple[str, str, int]]:
    """(layer, which side is split, size per shard) of the language model's parallel linears at TP degree `tp`:
    column-parallel layers split their outputs, row-parallel ones their inputs (vLLM's Qwen2 layers)."""
    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    intermediate = text.get("moe_intermediate_size") if text.get("num_experts") else text["intermediate_size"]
    kv_per_shard = max(kv // tp, 1)  # vLLM replicates KV heads when there are fewer than shards
    return [
        ("qkv_proj", "output", (heads // tp + 2 * kv_per_shard) * head_dim),
        ("o_proj", "input", heads * head_dim // tp),
        ("gate_up_proj", "output", 2 * intermediate // tp),
        ("down_proj", "input", intermediate // tp),
    ]


def tensor_parallel_refusal(config: dict, value: str, tp: int, *, engine: str, gpu_sm: int | None) -> str | None:
    """The engine's refusal of this quantized model at tensor-parallel degree `tp`, in its words, or None.

    vLLM sends AWQ, GPTQ and compressed-tensors wNa16 (and FP8 below sm89) through Marlin, whose shards must hold
    whole tiles; the group size must divide every split input too."""
    fmt = parse(value).format
    rule = fmt.engines.get(engine)
    if tp <= 1 or rule is None:
        return None
    native = rule.native_sm is not None and gpu_sm is not None and gpu_sm >= rule.native_sm
    if not (rule.marlin or (rule.native_sm is not None and not native)):
        return None
    tiles = marlin()
    group = (config.get("quantization_config") or {}).get("group_size", fmt.layout.group_size)
    for layer, side, size in _shards(config["text_config"], tp):
        if side == "output" and size % tiles["min_thread_n"]:
            return tiles["says_n"].format(size=size) + f" ({layer} at tensor_parallel_size {tp})"
        if side == "input" and size % tiles["min_thread_k"]:
            return tiles["says_k"].format(size=size) + f" ({layer} at tensor_parallel_size {tp})"
        if side == "input" and group and group > 0 and size % group:
            return (
                f"Weight input_size_per_partition={size} for layer '{layer}' is not divisible by group_size={group}. "
                "This happens when tensor_parallel_size splits the layer input into shards that are not a whole "
                "number of quant groups. Consider reducing tensor_parallel_size."
            )
    return None
