"""Remedies written for one cell: its GPU (name, compute capability, memory), dtype, attention
implementation, resolution and pixel budget turn the catalog's general advice into the step to take.

The out-of-memory remedy names the largest max_pixels the memory planner predicts fits the card. The
planner needs transformers (torch), which the pytest process never imports: for a failed cell the
worker computes the plan (`memory_plan`) and the verdict passes it in; `explain --model` plans here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harness.errors import UserError
from harness.judge.failures import Classification, classify
from harness.matrix.gpus import Gpu, table
from harness.models.families import FAMILIES

if TYPE_CHECKING:
    from harness.matrix.cells import Cell


@dataclass(frozen=True)
class Context:
    gpu: str | None = None  # GPU table key
    dtype: str | None = None
    attn_implementation: str | None = None
    resolution: str | None = None  # WxH
    max_pixels: int | None = None
    model: str | None = None  # the cell's model id, or a shipped architecture / tiny family name
    family: str | None = None
    memory_plan: dict | None = None  # `memory_plan(cell)`, computed where transformers is loaded
    cell: Cell | None = None  # set where the planner may run in this process (the CLI)

    @classmethod
    def from_cell(cls, cell: Cell, memory_plan: dict | None = None, plan_here: bool = False) -> Context:
        """The context of a cell; `plan_here` lets the planner import transformers in this process."""
        return cls(
            gpu=cell.device,
            dtype=cell.dtype,
            attn_implementation=cell.attn_implementation,
            resolution=cell.resolution,
            max_pixels=cell.max_pixels,
            model=cell.model,
            family=cell.family,
            memory_plan=memory_plan,
            cell=cell if plan_here else None,
        )

    @classmethod
    def from_options(
        cls,
        gpu: str | None = None,
        dtype: str | None = None,
        attn: str | None = None,
        resolution: str | None = None,
        max_pixels: int | None = None,
        model: str | None = None,
    ) -> Context:
        """A context from `explain`'s options; with a model (shipped architecture or tiny family), a cell too."""
        if gpu is not None and gpu not in table():
            raise UserError(
                f"unknown GPU key '{gpu}'.", key="--gpu", fix=f"use one of the GPU table's keys: {', '.join(table())}."
            )
        cell = None
        if model is not None:
            cell = _cell_for(model, gpu or "cpu", dtype, attn, resolution, max_pixels)
        return cls(
            gpu=gpu,
            dtype=dtype,
            attn_implementation=attn,
            resolution=resolution,
            max_pixels=max_pixels,
            model=model,
            family=cell.family if cell else None,
            cell=cell,
        )


def _cell_for(model, gpu, dtype, attn, resolution, max_pixels) -> Cell:
    """The one cell a matrix of these options expands to (validated the way a matrix file is)."""
    from pydantic import ValidationError

    from harness.matrix.cells import expand
    from harness.matrix.schema import Matrix
    from harness.models.architectures import shipped

    if model in FAMILIES:
        entry = {"tiny": model}
    elif model in shipped():
        entry = {"arch": model}
    else:
        raise UserError(
            f"unknown model '{model}'.",
            key="--model",
            fix=f"use a shipped architecture ({', '.join(shipped())}) or a tiny family ({', '.join(FAMILIES)}).",
        )
    axes = {
        "dtype": [dtype or "bfloat16"],
        "attn_implementation": [attn or "sdpa"],
        "resolution": [resolution or "448x448"],
        "pixel_budget": [{"max_pixels": max_pixels} if max_pixels else None],
    }
    try:
        matrix = Matrix.model_validate({"models": [entry], "devices": [gpu], "axes": axes})
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(
            f"{first['msg']} ({'.'.join(str(p) for p in first['loc'])}).",
            key="--dtype/--attn/--resolution/--max-pixels",
            fix="dtype float32|bfloat16|float16, attn sdpa|eager|flash_attention_2, resolution WxH.",
        ) from None
    return expand(matrix, "explain")[0]


def _describe(gpu: Gpu) -> str:
    memory = f", {gpu.memory_gb:g} GB" if gpu.memory_gb else ""
    return f"{gpu.name} (sm{gpu.sm}{memory})" if gpu.sm else gpu.name


def memory_plan(cell: Cell) -> dict:
    """The planner's prediction for the cell and the largest max_pixels it predicts fits (imports transformers)."""
    from harness.plan.memory import largest_fitting_max_pixels, predict

    return {**predict(cell).to_dict(), "largest_fitting_max_pixels": largest_fitting_max_pixels(cell)}


def _out_of_memory(ctx: Context, gpu: Gpu | None) -> str | None:
    where = f" at {ctx.resolution}" if ctx.resolution else ""
    on = f" on the {_describe(gpu)}" if gpu else ""
    plan = ctx.memory_plan
    if plan is None and ctx.cell is not None:
        try:
            plan = memory_plan(ctx.cell)
        except Exception as exc:  # noqa: BLE001 - a plan is advice: a model the planner cannot read keeps the general remedy
            return f"Out of memory{where}{on} (no memory plan for this model: {type(exc).__name__})."
    if plan is None or "largest_fitting_max_pixels" not in plan:
        return (
            f"Out of memory{where}{on}: lower max_pixels; `qwen-compat explain` with --model (a shipped "
            "architecture) and this context names the largest max_pixels the memory planner predicts fits."
            if gpu or ctx.resolution
            else None
        )
    best = plan["largest_fitting_max_pixels"]
    budget = f"{plan['budget_mib']:.0f} MiB" if plan["budget_mib"] else "the host's memory"
    if best is None:
        return (
            f"Out of memory{where}{on}: the memory planner predicts that no max_pixels fits {budget} "
            f"in {ctx.dtype} (weights alone {plan['parts']['weights_mib']:.0f} MiB): use a card with more memory, "
            "a quantized checkpoint, or shard the model."
        )
    if plan["verdict"] == "fits":
        return (
            f"Out of memory{where}{on}, although the memory planner predicts this cell fits "
            f"({plan['predicted_peak_mib']:.0f} of {budget}): look for other processes on the card or a "
            "fragmented allocator before lowering max_pixels."
        )
    factor = FAMILIES[ctx.family].factor if ctx.family in FAMILIES else 28
    return (
        f"Out of memory{where}{on}: set max_pixels to {best} ({best // factor**2}*{factor}*{factor}) or "
        f"less, the largest the memory planner predicts fits {budget} with {ctx.attn_implementation} "
        f"in {ctx.dtype} (it predicts {plan['predicted_peak_mib']:.0f} MiB for the cell as it stands)."
    )


def _without_native_bf16(ctx: Context, gpu: Gpu | None) -> str | None:
    if gpu and gpu.is_gpu and not gpu.native_bf16 and ctx.dtype == "bfloat16":
        return (
            f"The {_describe(gpu)} has no native bfloat16: run float16 or float32 on sm{gpu.sm} "
            "(float32 is the safe fix; float16 needs the overflow checks)."
        )
    return None


def _specific(found: Classification, ctx: Context, gpu: Gpu | None) -> str | None:
    category = found.category
    if category in ("kernel-launch", "dtype-unsupported", "numerical"):
        advice = _without_native_bf16(ctx, gpu)
        if advice:
            return advice
    if category == "dtype-unsupported" and gpu and gpu.sm and gpu.sm < 89 and "fp8" in (found.matched or ""):
        return f"The {_describe(gpu)} has no FP8 kernels (sm89+ only): use the bf16/fp16 or an int4 checkpoint."
    if category in ("attention-backend-unsupported", "missing-package") and ctx.attn_implementation == (
        "flash_attention_2"
    ):
        if gpu and not gpu.flash_attn_2:
            return (
                f"flash_attention_2 needs sm80+, which the {_describe(gpu)} is not: "
                "use attn_implementation=sdpa (or eager)."
            )
        if category == "attention-backend-unsupported":
            return "Use attn_implementation=sdpa for this cell."
    if category == "numerical" and ctx.dtype == "float16":
        if gpu and gpu.native_bf16 and gpu.is_gpu:
            return f"float16 overflows here: the {_describe(gpu)} has native bfloat16, run bfloat16 (or float32)."
        return "float16 overflows here: run float32 (at least for the vision tower)."
    if category == "out-of-memory":
        return _out_of_memory(ctx, gpu)
    if category == "driver-or-arch" and gpu and gpu.sm:
        return f"Use builds compiled for sm{gpu.sm} (the {_describe(gpu)}) and a driver that supports them."
    return None


def remedy_for(found: Classification, context: Context) -> str:
    """The classification's remedy, preceded by the step specific to this GPU, dtype, attention and budget."""
    gpu = table().get(context.gpu) if context.gpu else None
    specific = _specific(found, context, gpu)
    return f"{specific} {found.remedy}" if specific else found.remedy


def explain(text: str, context: Context | None = None) -> Classification:
    """Classify a failure text; with a context (the cell's GPU, dtype, attention, resolution, pixel
    budget) the remedy is written for that cell."""
    found = classify(text)
    return replace(found, remedy=remedy_for(found, context)) if context is not None else found
