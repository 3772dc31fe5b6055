"""From what came back for a cell to a verdict: outcome, category, message and remedy.

Pure logic (no torch): the worker reports facts; this module judges them against the cell's
checks (new tokens, finite scores, degeneracy, drift, answer) and its memory budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.judge.failures import is_degenerate_text
from harness.judge.remedies import Context, explain
from harness.judge.result import WorkerResult
from harness.matrix.budgets import parse_budget_mib
from harness.matrix.cells import Cell

# Raised by the harness (bad input, its own fault): an error of the run, not a failure of the model.
HARNESS_ERRORS = {"UserError", "HarnessFault"}
SKIP_REMEDIES = {  # why a served cell did not run, said by its backend
    "input-mismatch": "serve the model with an engine (or a WebUI) that takes this input",
    "missing-package": "install the package the message names on this runner",
}


@dataclass
class Verdict:
    outcome: str  # passed | failed | error | skipped
    category: str | None = None
    message: str = ""
    remedy: str = ""
    matched: str | None = None


CHECKS_WITH_TWINS = ("drift", "agreement")  # measured against another cell of the same run


def unchecked(measurements: dict) -> list[str]:
    """The checks a cell asked for and could not make (its twin was not in the run): a pass that says so."""
    return [
        f"{name}: {value}"
        for name in CHECKS_WITH_TWINS
        if isinstance(value := measurements.get(name), str) and value.startswith("not measured")
    ]


def is_degenerate(new_token_ids: list[int]) -> bool:
    """Degenerate: two or more new tokens, all the same token (fp16 overflow's '!!!!!!!!')."""
    return len(new_token_ids) >= 2 and len(set(new_token_ids)) == 1


def _numerical(message: str) -> Verdict:
    return Verdict(
        "failed",
        "numerical",
        message,
        "run this cell in float32 to confirm; on V100/T4 prefer float32 for the vision tower or "
        "bfloat16 on sm80+ cards; check for fp16 overflow (values beyond 65504)",
    )


# vLLM on a GPU: weights, KV cache, activation peak, non-torch memory; on the CPU: KV cache and what the
# worker held besides it (weights, activations, runtime), its "non-kv usages"
ENGINE_PARTS = (
    "engine_weights_mib",
    "engine_kv_cache_mib",
    "engine_activation_peak_mib",
    "engine_non_torch_mib",
    "engine_non_kv_mib",
)


def _engine_budget(cell: Cell, m: dict, budget: float) -> Verdict:
    """A served cell whose peak is out of reach: the budget against what the engine says it holds (vLLM's
    weights, KV cache, activation peak and non-torch memory on a GPU; its KV cache and non-kv usages on the
    CPU), where it said so; otherwise the budget cannot be checked, which is an error of the run as it is
    in-process, never a pass."""
    if "engine_weights_mib" not in m and "engine_non_kv_mib" not in m:
        reason = m.get("peak_memory_unmeasured") or "the server's processes are out of this host's view"
        return Verdict(
            "error",
            "harness",
            f"the memory budget {cell.budget} cannot be checked: the server's peak memory was not measured "
            f"({reason}) and its log gave no memory figures",
            "remove `budget` from cells of a server this host cannot see (an `endpoint:`, a container without "
            "NVML access), or launch it here (`launch:`) on a GPU NVML reports",
        )
    total = sum(m.get(part) or 0.0 for part in ENGINE_PARTS)
    if total <= budget:
        return Verdict("passed")
    parts = ", ".join(f"{p.removeprefix('engine_').removesuffix('_mib')} {m[p]:.0f}" for p in ENGINE_PARTS if p in m)
    return Verdict(
        "failed",
        "over-budget",
        f"the engine's own figures add up to {total:.0f} MiB ({parts} MiB), over the budget of {budget:.0f} MiB "
        f"({cell.budget})",
        "lower the engine's gpu_memory_utilization or max_model_len, or raise the budget in the matrix",
    )


def judge(cell: Cell, result: WorkerResult) -> Verdict:
    """The verdict for one cell."""
    if result.skipped and result.skipped_category in SKIP_REMEDIES:
        return Verdict("skipped", result.skipped_category, result.skipped, SKIP_REMEDIES[result.skipped_category])
    if result.skipped:
        return Verdict(
            "skipped",
            "predicted-oom",
            result.skipped,
            "run it on a larger card, lower max_pixels, or pass --compat-run-predicted-oom to find out",
        )
    if not result.ok:
        text = "\n".join(t for t in (result.error_message, result.traceback) if t)
        if result.error_type == "HarnessFault":  # a full disk, an input the harness could not build
            return Verdict("error", "harness", result.error_message, "the harness failed, not the model: see Fix")
        if result.harness_error or result.error_type in HARNESS_ERRORS:
            return Verdict("error", "harness", result.error_message, "fix the input named in the message")
        if result.load_timed_out:
            return Verdict(
                "failed",
                "timeout",
                result.error_message,
                "the model did not finish loading: raise `defaults.load_timeout_s` for large models or slow "
                "storage, or check the stderr tail for a stalled download",
                "load-timeout",
            )
        found = explain(
            result.error_message if result.died else text, Context.from_cell(cell, result.prediction or None)
        )
        prefix = f"{result.error_type}: " if result.error_type else ""
        return Verdict("failed", found.category, f"{prefix}{result.error_message}".strip(), found.remedy, found.matched)
    gen, m = result.generation, result.measurements
    served = "new_token_ids" not in gen  # a server's answer: text and a token count, no ids, no logits
    if served and "output_tokens" not in gen:  # a WebUI's answer: the text a page shows, nothing else
        if not gen["text"].strip():
            return _numerical("the app's answer is empty")
    elif not (gen["output_tokens"] if served else gen["new_token_ids"]):
        return _numerical("no new token was generated")
    if gen.get("nonfinite_steps"):
        return _numerical(f"NaN or inf in the logits at decoding steps {gen['nonfinite_steps']}")
    if cell.degenerate_check and not served and is_degenerate(gen["new_token_ids"]):
        return _numerical(
            f"degenerate output: all {len(gen['new_token_ids'])} new tokens are token {gen['new_token_ids'][0]}"
        )
    if cell.degenerate_check and gen.get("nonfinite_steps") is None and is_degenerate_text(gen["text"]):
        return _numerical(f"degenerate output (no logits to check): {gen['text'][:80]!r}")
    if m.get("drift") == "measured":
        relative = m.get("drift_relative_diff")
        if relative is None or relative > cell.drift_max_abs_diff:
            size = "non-finite" if relative is None else f"{relative:.3g} of the float32 logits' largest magnitude"
            return _numerical(
                f"first-step logits drift from float32 by {size} "
                f"(bound {cell.drift_max_abs_diff:g}, reference {m['drift_reference']})"
            )
        if cell.drift_top1 and not m.get("drift_topk_agree"):
            return _numerical(
                f"first token differs from float32 and neither is in the other's top-{cell.drift_top_k} "
                f"(reference {m['drift_reference']})"
            )
    if served and m.get("agreement") == "measured" and not m["agrees"] and cell.dtype == "float32":
        return Verdict(
            "failed",
            "wrong-answer",
            f"served greedy output {gen['text']!r} is not how the in-process cell {m['agreement_reference']} "
            f"starts, {m['in_process_text']!r}",
            "the server does not run the model the harness tested: check the image's checkpoint, dtype, chat "
            "template and processor settings against the matrix's model",
        )
    answer = cell.expectation.answer
    if answer and not re.search(answer, gen["text"], re.IGNORECASE):
        return Verdict(
            "failed",
            "wrong-answer",
            f"answer {gen['text']!r} does not match /{answer}/",
            "check the prompt and image; a real checkpoint should answer this correctly",
        )
    if cell.budget:
        budget = parse_budget_mib(cell.budget, cell.device, m.get("device_memory_mib"))
        if m.get("peak_memory_mib") is None and served:
            return _engine_budget(cell, m, budget)  # a server's memory may be out of reach; the record says why
        if m.get("peak_memory_mib") is None:
            reason = m.get("peak_memory_unmeasured") or "no peak memory was recorded"
            return Verdict(
                "error",
                "harness",
                f"the memory budget {cell.budget} cannot be checked: peak memory was not measured ({reason})",
                "install nvidia-ml-py (qwen-compat[nvml]) on the runner, or run the worker alone on its GPU",
            )
        if m["peak_memory_mib"] > budget:
            return Verdict(
                "failed",
                "over-budget",
                f"peak memory {m['peak_memory_mib']:.0f} MiB ({m['peak_memory_source']}) is over the "
                f"budget of {budget:.0f} MiB ({cell.budget})",
                "lower max_pixels or the resolution, use sdpa, or raise the budget in the matrix",
            )
    return Verdict("passed")
