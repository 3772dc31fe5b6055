"""Verdicts: the definitions behind pass/fail, and how they reach pytest's outcomes."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.judge.result import WorkerResult
from harness.judge.verdict import is_degenerate, judge, parse_budget_mib


def healthy(**measurements) -> WorkerResult:
    m = {"peak_memory_mib": 800.0, "peak_memory_source": "worker_rss", "visual_tokens": 256, **measurements}
    return WorkerResult(
        ok=True, generation={"new_token_ids": [5, 6, 7, 8], "text": "abcd", "nonfinite_steps": []}, measurements=m
    )


def test_degenerate_means_every_new_token_is_the_same_token():
    assert is_degenerate([0, 0, 0, 0])
    assert not is_degenerate([133, 8, 8, 8])  # the tiny Qwen2-VL's honest random output
    assert not is_degenerate([7])  # one token cannot repeat


@given(st.lists(st.integers(0, 500), min_size=2))
def test_degenerate_exactly_when_one_distinct_token(tokens):
    assert is_degenerate(tokens) == (len(set(tokens)) == 1)


def test_budgets_in_gib_mib_or_a_fraction_of_the_card():
    assert parse_budget_mib("14GiB", "t4") == 14 * 1024
    assert parse_budget_mib("900 MiB", "cpu") == 900
    assert parse_budget_mib("50%", "v100-32gb") == 16 * 1024


def test_over_budget_names_measured_budget_and_source(tiny_cell):
    v = judge(tiny_cell(budget="512MiB"), healthy())
    assert v.outcome == "failed" and v.category == "over-budget"
    assert "800 MiB" in v.message and "512 MiB" in v.message and "worker_rss" in v.message


def test_nonfinite_logits_and_drift_are_numerical(tiny_cell):
    bad = healthy()
    bad.generation["nonfinite_steps"] = [0, 1]
    assert judge(tiny_cell(), bad).category == "numerical"
    measured = {"drift": "measured", "drift_reference": "c32"}
    drifted = healthy(**measured, drift_relative_diff=0.9, drift_top1_agree=True, drift_topk_agree=True)
    assert judge(tiny_cell(), drifted).category == "numerical" and "drift" in judge(tiny_cell(), drifted).message
    flipped = healthy(**measured, drift_relative_diff=0.01, drift_top1_agree=False, drift_topk_agree=False)
    assert "top-5" in judge(tiny_cell(), flipped).message
    close = healthy(**measured, drift_relative_diff=0.01, drift_top1_agree=False, drift_topk_agree=True)
    assert judge(tiny_cell(), close).outcome == "passed"  # within each other's top-k, as check_logprobs_close


def test_a_dead_worker_is_classified_from_its_signal(tiny_cell):
    died = WorkerResult(
        returncode=-11,
        signal_name="SIGSEGV",
        error_message="worker was killed by signal 11 (SIGSEGV) while running the cell",
    )
    assert judge(tiny_cell(), died).category == "crash"
    killed = WorkerResult(
        returncode=-9,
        signal_name="SIGKILL",
        error_message="worker was killed by signal 9 (SIGKILL) while running the cell",
    )
    assert judge(tiny_cell(), killed).category == "out-of-memory"


EXPECTATIONS = """
models:
  - tiny: qwen3_vl
devices: [cpu]
axes:
  resolution: [224x224]
  extra:
    case: [strict, lenient]
defaults:
  max_new_tokens: 2
expect:
  - when: {case: strict}
    outcome: xfail
    category: numerical
    reason: expected to fail, but it passes
  - when: {case: lenient}
    outcome: xfail
    strict: false
    reason: may fail
sections:
  - models: [{tiny: qwen3_vl, id: tiny-small-budget}]
    axes: {resolution: [224x224]}
    budgets: {cpu: 64MiB}
"""


def test_xpass_fails_the_run_unless_non_strict_and_over_budget_fails(suite, matrix_file):
    result = suite.runpytest("--compat-matrix", str(matrix_file(EXPECTATIONS)), "--compat-reports", "reports")
    assert result.ret == 1
    cells = {c["id"]: c for c in json.loads((suite.path / "reports" / "cpu" / "results.json").read_text())["cells"]}
    assert cells["tiny-qwen3-vl-cpu-float32-sdpa-224x224-case=strict"]["outcome"] == "xpassed-strict"
    assert cells["tiny-qwen3-vl-cpu-float32-sdpa-224x224-case=lenient"]["outcome"] == "xpassed"
    small = cells["tiny-small-budget-cpu-float32-sdpa-224x224"]
    assert small["outcome"] == "failed" and small["category"] == "over-budget"


def test_an_expected_answer_is_a_regex_on_the_generated_text(tiny_cell):
    from harness.matrix.cells import Expectation

    cell = tiny_cell(expectation=Expectation(answer=r"\bred\b"))
    assert judge(cell, healthy()).category == "wrong-answer"
    right = healthy()
    right.generation["text"] = "It is Red."
    assert judge(cell, right).outcome == "passed"


def test_matrix_image_option_picks_a_colour_or_a_file():
    from harness.matrix.inputs import image_source

    assert image_source("rgb(255,0,0)") == {"color": (255, 0, 0)}
    assert image_source("/data/cat.png") == {"image_path": "/data/cat.png"}
    assert image_source(None) == {}


def test_percent_budgets_are_of_the_physical_memory_nvml_reports():
    # An A10G is sold as 24 GB and NVML reports 23028 MiB: 90 % is 20725 MiB, not 22118.
    assert parse_budget_mib("90%", "a10g") == pytest.approx(0.9 * 23028)
    assert parse_budget_mib("95%", "t4") < 15360


def test_emulation_caps_the_allocator_at_the_card_less_the_context():
    from harness.devices.emulation import cap_fraction, check_fits
    from harness.errors import UserError

    fraction = cap_fraction(15360, 81106, 520)  # a T4 on an H100 whose CUDA context holds 520 MiB
    assert fraction * 81106 + 520 == pytest.approx(15360)
    with pytest.raises(UserError, match="more than this host"):
        check_fits("h200", "NVIDIA H100 80GB HBM3", 81559)
    check_fits("t4", "NVIDIA H100 80GB HBM3", 81559)
    with pytest.raises(UserError):
        cap_fraction(143771, 81106, 0)


class OneCardAllocator:
    """torch.cuda on one H100 for `apply_memory_cap`, as torch 2.14 behaves: the fraction is checked
    as torch/cuda/memory.py checks it, and an allocation past total × fraction raises
    torch.OutOfMemoryError with the caching allocator's text (its pieces as in libc10_cuda.so)."""

    def __init__(self, total_mib: float, context_mib: float):
        self.total_mib, self.context_mib, self.fraction, self.reserved_mib = total_mib, context_mib, 1.0, 0.0

    def is_available(self) -> bool:
        return True

    def get_device_properties(self, device):
        import types

        return types.SimpleNamespace(total_memory=int(self.total_mib * 2**20), name="NVIDIA H100 80GB HBM3")

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.fraction = fraction

    def allocate(self, mib: float) -> None:
        import torch

        allowed = self.total_mib * self.fraction
        if self.reserved_mib + mib > allowed:
            free = self.total_mib - self.reserved_mib - self.context_mib
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {mib / 1024:.2f} GiB. GPU 0 has a total capacity of "
                f"{self.total_mib / 1024:.2f} GiB of which {free / 1024:.2f} GiB is free. Including non-PyTorch "
                f"memory, this process has {(self.reserved_mib + self.context_mib) / 1024:.2f} GiB memory in use. "
                f"{allowed / 1024:.2f} GiB allowed; Of the allocated memory {self.reserved_mib / 1024:.2f} GiB is "
                "allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated."
            )
        self.reserved_mib += mib


def test_an_emulated_card_runs_out_of_memory_where_the_card_would(monkeypatch, tiny_cell):
    """--compat-emulate t4 on an H100: the worker's allocator gets the T4's 15,360 MiB less the context
    it holds, so what fits a T4 runs and what does not is an out-of-memory failure of the T4 cell."""
    import torch

    from harness.devices.emulation import apply_memory_cap

    card = OneCardAllocator(total_mib=81559, context_mib=520)
    for name in ("is_available", "get_device_properties", "set_per_process_memory_fraction"):
        monkeypatch.setattr(torch.cuda, name, getattr(card, name))
    fraction = apply_memory_cap("t4", context_mib=520)
    assert card.fraction == fraction and card.total_mib * fraction + 520 == pytest.approx(15360)
    card.allocate(14_000)  # weights and activations a T4 holds
    with pytest.raises(torch.OutOfMemoryError) as raised:
        card.allocate(1_000)  # 15,000 MiB + the context: more than a T4 has, a sixth of the H100
    failed = WorkerResult(error_type="OutOfMemoryError", error_message=str(raised.value))
    verdict = judge(tiny_cell(device="t4", budget="14GiB"), failed)
    assert verdict.outcome == "failed" and verdict.category == "out-of-memory"


def test_the_images_input_sends_as_many_images_as_the_matrix_asks_even_from_one_file(tmp_path):
    from PIL import Image

    from harness.run.inference import CellInput, _visual

    path = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path)
    for spec in ({"image_path": str(path)}, {"color": (255, 0, 0)}, {}):
        visual, parts = _visual(CellInput(kind="images", count=3, **spec))
        assert len(visual["images"]) == 3 and len(parts) == 3


def test_a_harness_error_of_any_subclass_is_an_error_never_the_models_failure(tiny_cell):
    """ba93f90 matched the class name `UserError` exactly: an unreachable endpoint (a subclass) was failed/other."""
    result = WorkerResult(
        error_type="EndpointUnreachable", harness_error=True, error_message="nothing answers at http://127.0.0.1:9/v1"
    )
    verdict = judge(tiny_cell(), result)
    assert (verdict.outcome, verdict.category) == ("error", "harness") and "127.0.0.1:9" in verdict.message
