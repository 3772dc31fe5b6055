"""Capability rules, derived from the GPU table instead of being repeated in every matrix.

A bfloat16 cell on a card without native bf16 is an expected failure (it either fails to launch or
falls back to slow emulation, depending on torch and the kernel); flash-attention-2 below sm80, on
the CPU or without the package cannot run and is skipped. A matrix's own `expect` rule wins.
"""

from __future__ import annotations

import functools
import importlib.util

from .cells import Cell, Expectation
from .gpus import Gpu, table
from .placement import pins_modules_off_gpu


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
    if cell.backend == "openai":
        if cell.placement != "single":
            return Expectation(
                "skip",
                ["other"],
                f"placement {cell.placement_id} places a model loaded in the worker (device_map); a served model "
                "is placed by its server (e.g. vLLM's --tensor-parallel-size or --cpu-offload-gb in `launch:`)",
                source="capability",
            )
        return serving_expectation(cell)
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


def serving_expectation(cell: Cell) -> Expectation | None:
    """A launched server's engine must be installed and able to run the cell's axes; the server's card
    and attention kernels are the engine's business, so the in-process rules do not apply."""
    launch = (cell.serving or {}).get("launch")
    if not launch:
        return None
    from .launch import MIN_CONTEXT, TEMPLATES, EngineMissing, Unsupported, launch_args, user_command

    try:  # what an engine refuses depends on dtype and attention, never on the context length
        args = launch_args(cell, "MODEL", host="127.0.0.1", port=0, max_model_len=MIN_CONTEXT)
        if launch in TEMPLATES:
            TEMPLATES[launch].check_installed()
            TEMPLATES[launch].argv(args)
        else:
            user_command(launch, args, cell.matrix_file)
    except EngineMissing as exc:
        return Expectation("skip", ["missing-package"], str(exc), source="capability")
    except Unsupported as exc:
        return Expectation("skip", ["other"], f"{launch}: {exc}", source="capability")
    return None


def effective_expectation(cell: Cell, gpu: Gpu) -> Expectation:
    """Matrix rule first, then the card's capability rule, then a plain pass."""
    if cell.expectation.source == "matrix":
        return cell.expectation
    return capability_expectation(cell, gpu) or cell.expectation


def disposition(cell: Cell, host_key: str) -> Expectation:
    """What happens to the cell on this host: another card's cell is skipped, else its expectation."""
    if cell.device != host_key:
        return Expectation("skip", [], f"this host is {host_key}; cell targets {cell.device}", source="host")
    return effective_expectation(cell, table()[cell.device])
