"""Quantized checkpoints made here, no download, each through the format's own library.

- torchao and bitsandbytes: the tiny float32 checkpoint loaded through `from_pretrained` with a TorchAoConfig /
  BitsAndBytesConfig (transformers' own quantizers), then `save_pretrained` (a pre-quantized folder);
- compressed-tensors (fp8, w4a16, w8a16): its own `apply_quantization_config`, weight scales from the weights'
  ranges (`calculate_qparams`: data-free, as llm-compressor does for weight-only and dynamic schemes), then its
  `ModelCompressor` packs the weights and writes `quantization_config`, as llm-compressor's save does;
- GGUF Q8_0: the language model written by the `gguf` package under llama.cpp's tensor names (qwen2vl /
  qwen3vl), beside the config and processor.

The vision tower (`model.visual`) and lm_head stay unquantized, as the real recipes keep them, unless the value
carries `+vision`. Folders are cached like the tiny checkpoints (harness.models.checkpoints._cached_build).
An `arch:` model, and torchao's CPU int4 (which torchao 0.18 cannot write to safetensors), are quantized at load
instead (`load_kwargs`), through the same quantizers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.models.checkpoints import _cached_build, tiny_checkpoint

# transformers 5 names the tower `model.visual`: a skip list of ["visual"] (what AutoAWQ and older recipes
# write) no longer matches it in transformers' should_convert_module, and the tower would be quantized.
KEEP_UNQUANTIZED = ["model.visual", "lm_head"]
CT_FORMATS = {
    "fp8": ("FP8_DYNAMIC", "float-quantized"),
    "w4a16": ("W4A16", "pack-quantized"),
    "w8a16": ("W8A16", "pack-quantized"),
}
GGUF_FILE = "model-q8_0.gguf"
# torchao 0.18's safetensors support has no Int4OpaqueTensor (its CPU int4 layout: "Unsupported tensor type"), and
# transformers 5 saves safetensors only: this format is quantized at every load, from the float32 checkpoint.
QUANTIZED_AT_LOAD = {"torchao-int4"}
GGUF_ARCH = {"qwen2_vl": "QWEN2VL", "qwen2_5_vl": "QWEN2VL", "qwen3_vl": "QWEN3VL", "qwen3_vl_moe": "QWEN3VLMOE"}


def fitted_group_size(size: int | None, in_features: list[int]) -> int | None:
    """The group size a format uses on a model whose quantized layers have these input widths: the format's
    (128 for the real models), halved until it divides every one of them (the tiny models: 32)."""
    while size and any(k % size for k in in_features):
        size //= 2
    return size


def _skipped(value: str) -> list[str]:
    return ["lm_head"] if value.endswith("+vision") else KEEP_UNQUANTIZED


def quantization_config(value: str, group_size: int | None):
    """transformers' config object that quantizes at load (torchao, bitsandbytes), for a value of the axis and the
    group size fitted to the model."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    fmt = value.removesuffix("+vision")
    skip = _skipped(value)
    if fmt == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if fmt == "torchao-int4":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=group_size), modules_to_not_convert=skip)
    if fmt == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if fmt == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    raise ValueError(f"{value} is not quantized at load")


def quantized_in_features(model, value: str) -> list[int]:
    """Input widths of the nn.Linear modules the value quantizes (for the group size)."""
    import torch

    skip = _skipped(value)
    return sorted(
        {
            m.in_features
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)
        }
    )


def _load(folder: Path, dtype: str, **kwargs):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype), device_map="cpu", **kwargs)


def _copy_processor(source: Path, out: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in ("config.json",):
            shutil.copy(item, out)


def _build_at_load(tiny: Path, value: str, dtype: str, group_size: int | None, out: Path) -> None:
    model = _load(tiny, dtype)
    group = fitted_group_size(group_size, quantized_in_features(model, value))
    del model
    model = _load(tiny, dtype, quantization_config=quantization_config(value, group))
    model.save_pretrained(out)
    _copy_processor(tiny, out)


def _build_compressed_tensors(tiny: Path, value: str, dtype: str, group_size: int | None, out: Path) -> None:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStrategy,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    preset, packing = CT_FORMATS[value.removesuffix("+vision")]
    model = _load(tiny, dtype)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.group_size:
        scheme.weights.group_size = fitted_group_size(group_size, quantized_in_features(model, value))
    ignore = ["lm_head"] + ([] if value.endswith("+vision") else ["re:.*visual.*"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            weight = module.weight
            if args.strategy == QuantizationStrategy.GROUP:
                weight = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = (
                weight.amin(-1, keepdim=args.strategy == QuantizationStrategy.CHANNEL),
                weight.amax(-1, keepdim=args.strategy == QuantizationStrategy.CHANNEL),
            )
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=packing)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    # The compressor lists the skipped modules by their checkpoint names (visual.blocks.0...), which transformers
    # 5 does not match against its own (model.visual...); the recipe's own patterns match both.
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["ignore"] = ignore
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _copy_processor(tiny, out)


def _build_gguf(tiny: Path, family_key: str, out: Path) -> None:
    """The language model's tensors in GGUF Q8_0 under llama.cpp's names; config and processor beside it."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((tiny / "config.json").read_text())
    text = config.get("text_config", config)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family_key])
    names = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out / GGUF_FILE), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(text["num_hidden_layers"])
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(text["hidden_size"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(text["num_attention_heads"])
    writer.add_head_count_kv(text["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(text.get("rms_norm_eps", 1e-6))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, tensor in load_file(str(next(tiny.glob("*.safetensors")))).items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:  # the vision tower: llama.cpp writes it to a separate mmproj file
            continue
        data = tensor.astype(np.float32)
        if data.ndim == 2 and data.shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            writer.add_tensor(
                target,
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shutil.copy(tiny / "config.json", out / "config.json")
    _copy_processor(tiny, out)


def quantized_checkpoint(source: dict, value: str, dtype: str, *, group_size: int | None, library: str) -> Path:
    """Folder of the tiny checkpoint of `source` in the format `value` (an axis value), quantized from the model in
    `dtype` (as real checkpoints are saved from the dtype they run in: a bitsandbytes int8 checkpoint saved from
    float32 fails in bfloat16 on the CPU, "self and mat2 must have the same dtype"), built once per recipe;
    `group_size` is the format's and `library` the package that quantizes (harness/data/quantization.yaml)."""
    from importlib import metadata

    tiny = tiny_checkpoint(source["tiny"], source.get("variant", "default"), source.get("seed", 0))
    fmt = value.removesuffix("+vision")
    if fmt in QUANTIZED_AT_LOAD:
        return tiny
    # a new torchao or bitsandbytes may pack differently: the versions are part of the recipe
    versions = {p: metadata.version(p) for p in ("transformers", library)}
    recipe = {"kind": "quantized", "from": tiny.name, "quantization": value, "dtype": dtype, "group": group_size}
    recipe["versions"] = versions

    def build(out: Path) -> None:
        if fmt in CT_FORMATS:
            _build_compressed_tensors(tiny, value, dtype, group_size, out)
        elif fmt == "gguf-q8_0":
            _build_gguf(tiny, source["tiny"], out)
        else:
            _build_at_load(tiny, value, dtype, group_size, out)

    return _cached_build(f"{tiny.name}-{value.replace('+', '-')}-{dtype}", recipe, build)


def load_kwargs(cell_source: dict, value: str, *, group_size: int | None, meta_model=None) -> dict:
    """What `from_pretrained` needs beyond the folder for a cell in this format: a pre-quantized folder needs
    nothing (its config carries `quantization_config`); a GGUF folder names its file; an `arch:` model and a
    format that cannot be saved are quantized at load by transformers' quantizer (`meta_model`: the model's
    modules, for the group size)."""
    if value == "none" or "quantization" in cell_source:
        return {}
    fmt = value.removesuffix("+vision")
    if fmt == "gguf-q8_0":
        return {"gguf_file": GGUF_FILE}
    if "arch" in cell_source or fmt in QUANTIZED_AT_LOAD:
        group = fitted_group_size(group_size, quantized_in_features(meta_model, value))
        return {"quantization_config": quantization_config(value, group)}
    return {}
