"""Capability rules, derived from the GPU table instead of being repeated in every matrix.

A bfloat16 cell on a card without native bf16 is an expected failure (it either fails to launch or
falls back to slow emulation, depending on torch and the kernel); flash-attention-2 below sm80, on
the CPU or without the package cannot run and is skipped. A matrix's own `expect` rule wins.
"""

from __future__ import annotations

import functools
import importlib.util

from harness.matrix.cells import SERVED_BACKENDS, Cell, Expectation
from harness.matrix.gpus import Gpu
from harness.matrix.placement import pins_modules_off_gpu


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


def effective_expectation(cell: Cell, gpu: Gpu) -> Expectation:
    """Matrix rule first, then the card's capability rule, then a plain pass."""
    if cell.expectation.source == "matrix":
        return cell.expectation
    return capability_expectation(cell, gpu) or cell.expectation
