"""Capability rules, derived from the GPU table and the quantization table instead of being repeated in every matrix.

A bfloat16 cell on a card without native bf16 is an expected failure (it either fails to launch or
falls back to slow emulation, depending on torch and the kernel); flash-attention-2 below sm80, on
the CPU or without the package cannot run and is skipped; a weight format below the compute capability its
engine needs is an expected failure in that engine's words. A matrix's own `expect` rule wins.
"""

from __future__ import annotations

import functools
import importlib.util

from harness.matrix import quantization as quant
from harness.matrix.cells import SERVED_BACKENDS, Cell, Expectation
from harness.matrix.gpus import Gpu
from harness.matrix.placement import pins_modules_off_gpu

QUANT_EXTRA = "quant"  # the pyproject extra that installs the packages qwen-compat builds quantized checkpoints with


@functools.cache
def installed(package: str) -> bool:
    """Whether an optional package can be imported here, looked up once per run, not once per cell."""
    return importlib.util.find_spec(package) is not None


def capability_expectation(cell: Cell, gpu: Gpu, *, flash_attn: bool | None = None) -> Expectation | None:
    """The expectation the card's facts imply for this cell, or None when nothing stands out."""
    if cell.backend == "vllm":
        return Expectation(
            "skip",
            ["other"],
            "backend vllm runs nothing: vLLM is served over the OpenAI API, as `backend: openai` with the "
            "model's `launch: vllm` (or its `endpoint:`)",
            source="capability",
        )
    quantized = quantization_expectation(cell, gpu)
    if quantized is not None:
        return quantized
    if cell.backend in SERVED_BACKENDS:
        if cell.placement != "single":
            return Expectation(
                "skip",
                ["other"],
                f"placement {cell.placement_id} places a model loaded in the worker (device_map); a served model "
                "is placed by its server (e.g. vLLM's --tensor-parallel-size or --cpu-offload-gb in `launch:`)",
                source="capability",
            )
        return None  # the engine decides: harness.engines.availability
    if cell.attn_implementation == "flash_attention_2":
        if pins_modules_off_gpu(cell.placement):
            return Expectation(
                "skip",
                ["attention-backend-unsupported"],
                f"flash_attention_2 with modules kept off the GPU (placement {cell.placement_id}): flash-attn runs "
                "on CUDA tensors only; use sdpa or eager with this placement",
                source="capability",
            )
        if not gpu.is_gpu:
            return Expectation(
                "skip",
                ["attention-backend-unsupported"],
                "flash_attention_2 needs a CUDA GPU; use sdpa or eager on the CPU",
                source="capability",
            )
        if not gpu.flash_attn_2:
            return Expectation(
                "skip",
                ["attention-backend-unsupported"],
                f"flash_attention_2 needs compute capability 8.0 or newer; {gpu.name} is "
                f"{gpu.compute_capability}: use sdpa",
                source="capability",
            )
        if not (installed("flash_attn") if flash_attn is None else flash_attn):
            return Expectation(
                "skip",
                ["missing-package"],
                "the flash-attn package is not installed: pip install 'qwen-compat[flash-attn]', or use sdpa",
                source="capability",
            )
    if cell.dtype == "bfloat16" and not gpu.native_bf16:
        return Expectation(
            "xfail",
            ["dtype-unsupported", "kernel-launch"],
            f"{gpu.name} (sm{gpu.sm}) has no native bfloat16: use float16 or float32",
            strict=False,
            source="capability",
        )
    return None


def _engine(cell: Cell) -> str | None:
    """The engine that loads the cell's weights: transformers in the worker, or a launched server's template."""
    if cell.backend == "transformers":
        return "transformers"
    return (cell.serving or {}).get("launch")


def quantization_expectation(cell: Cell, gpu: Gpu) -> Expectation | None:
    """What the cell's weight format implies on this card and engine (harness/data/quantization.yaml), or None."""
    if cell.quantization == quant.NONE:
        return None
    q = quant.parse(cell.quantization)
    fmt, engine = q.format, _engine(cell)

    def skip(category: str, reason: str) -> Expectation:
        return Expectation("skip", [category], reason, source="capability")

    if cell.backend in SERVED_BACKENDS and not cell.prequantized:
        return skip(
            "other",
            f"{cell.quantization}: a served cell runs a real quantized checkpoint (a hub:/path: model whose config "
            "carries the format); the quantized checkpoints qwen-compat makes run in the worker "
            "(backend: transformers)",
        )
    if not cell.prequantized:
        if fmt.made_here == "none":
            return skip("other", f"{fmt.key} checkpoints are not made here: {fmt.why}")
        if "arch" in cell.source and fmt.layout.resident == "dense":
            return skip(
                "other",
                f"{fmt.key} is built here for tiny models only (a true-size {fmt.method} checkpoint would be the "
                "whole model compressed on this host); bnb-* and torchao-* quantize an arch: model at load",
            )
        if cell.placement != "single":
            return skip(
                "other",
                f"placement {cell.placement_id} with {fmt.key}: the quantized model is placed whole (bitsandbytes "
                "refuses modules on the CPU or disk without llm_int8_enable_fp32_cpu_offload)",
            )
    if engine == "transformers" and q.vision and fmt.vision_tower:
        return Expectation("xfail", ["other"], fmt.vision_tower, source="capability")
    refused = fmt.refusal_of_every_qwen_vl(engine, _gguf_arch(cell.family)) if engine else None
    if refused:
        return Expectation("xfail", ["dtype-unsupported"], refused, source="capability")
    if gpu.is_gpu and fmt.cpu_only and not cell.prequantized:
        return Expectation("xfail", ["dtype-unsupported"], fmt.cpu_only, strict=False, source="capability")
    refusal = fmt.refusal(engine, gpu.sm) if gpu.is_gpu and engine else None
    if refusal:
        return Expectation("xfail", ["dtype-unsupported"], refusal, strict=False, source="capability")
    if engine == "transformers" and not installed(fmt.package):
        return skip(
            "missing-package",
            f"{fmt.key} needs the {fmt.pip} package, which is not installed here: "
            + (f"pip install 'qwen-compat[{QUANT_EXTRA}]'" if fmt.made_here == "tiny" else f"pip install {fmt.pip}"),
        )
    return None


def _gguf_arch(family: str) -> str:
    """The architecture llama.cpp writes into a Qwen-VL GGUF file (its convert script: qwen2vl for Qwen2-VL and
    Qwen2.5-VL, qwen3vl / qwen3vlmoe for Qwen3-VL)."""
    return {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl", "qwen3_vl": "qwen3vl", "qwen3_vl_moe": "qwen3vlmoe"}[family]


def effective_expectation(cell: Cell, gpu: Gpu) -> Expectation:
    """Matrix rule first, then the card's capability rule, then a plain pass."""
    if cell.expectation.source == "matrix":
        return cell.expectation
    return capability_expectation(cell, gpu) or cell.expectation
