"""Verdicts: the definitions behind pass/fail, and how they reach pytest's outcomes."""

import json

from hypothesis import given
from hypothesis import strategies as st

from harness.verdict import is_degenerate, judge, parse_budget_mib
from harness.worker import WorkerResult


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
    assert parse_budget_mib("50%", "v100") == 16 * 1024


def test_over_budget_names_measured_budget_and_source(tiny_cell):
    v = judge(tiny_cell(budget="512MiB"), healthy())
    assert v.outcome == "failed" and v.category == "over-budget"
    assert "800 MiB" in v.message and "512 MiB" in v.message and "worker_rss" in v.message


def test_nonfinite_logits_and_drift_are_numerical(tiny_cell):
    bad = healthy()
    bad.generation["nonfinite_steps"] = [0, 1]
    assert judge(tiny_cell(), bad).category == "numerical"
    drifted = healthy(drift_reference="c32", drift_max_abs_diff=9.0, drift_top1_agree=True)
    assert judge(tiny_cell(), drifted).category == "numerical" and "drift" in judge(tiny_cell(), drifted).message
    flipped = healthy(drift_reference="c32", drift_max_abs_diff=0.1, drift_top1_agree=False)
    assert judge(tiny_cell(), flipped).category == "numerical"
    assert (
        judge(tiny_cell(), healthy(drift_reference="c32", drift_max_abs_diff=0.1, drift_top1_agree=True)).outcome
        == "passed"
    )


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
    result = suite.runpytest("--matrix", str(matrix_file(EXPECTATIONS)), "--reports", "reports")
    assert result.ret == 1
    cells = {c["id"]: c for c in json.loads((suite.path / "reports" / "cpu" / "results.json").read_text())["cells"]}
    assert cells["tiny-qwen3-vl-cpu-float32-sdpa-224x224-case=strict"]["outcome"] == "xpassed-strict"
    assert cells["tiny-qwen3-vl-cpu-float32-sdpa-224x224-case=lenient"]["outcome"] == "xpassed"
    small = cells["tiny-small-budget-cpu-float32-sdpa-224x224"]
    assert small["outcome"] == "failed" and small["category"] == "over-budget"


def test_an_expected_answer_is_a_regex_on_the_generated_text(tiny_cell):
    from harness.cells import Expectation

    cell = tiny_cell(expectation=Expectation(answer=r"\bred\b"))
    assert judge(cell, healthy()).category == "wrong-answer"
    right = healthy()
    right.generation["text"] = "It is Red."
    assert judge(cell, right).outcome == "passed"


def test_matrix_image_option_picks_a_colour_or_a_file():
    from harness.inference import image_source

    assert image_source("rgb(255,0,0)") == {"color": (255, 0, 0)}
    assert image_source("/data/cat.png") == {"image_path": "/data/cat.png"}
    assert image_source(None) == {}
