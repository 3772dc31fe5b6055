"""Capability rules come from the GPU table; a matrix's own expect rule wins."""

import yaml

from harness.matrix import capabilities, cells
from harness.matrix import schema as matrix
from harness.matrix.gpus import table
from harness.run.disposition import disposition

TEXT = """
models: [{tiny: qwen2_vl}]
devices: [v100, t4, a10g, cpu]
axes:
  dtype: [bfloat16, float16]
  attn_implementation: [sdpa, flash_attention_2]
  backend: [transformers, vllm]
"""


def expand(text=TEXT):
    return {c.id: c for c in cells.expand(matrix.Matrix.model_validate(yaml.safe_load(text)), "m.yaml")}


def test_bf16_without_native_support_is_an_expected_failure():
    for device in ("v100", "t4"):
        cell = expand()[f"tiny-qwen2-vl-{device}-bfloat16-sdpa-448x448"]
        e = capabilities.effective_expectation(cell, table()[device])
        assert e.outcome == "xfail" and "no native bfloat16" in e.reason and not e.strict
    cell = expand()["tiny-qwen2-vl-a10g-bfloat16-sdpa-448x448"]
    assert capabilities.effective_expectation(cell, table()["a10g"]).outcome == "pass"


def test_flash_attention_is_skipped_below_sm80_on_cpu_and_without_the_package():
    c = expand()
    v100 = capabilities.capability_expectation(
        c["tiny-qwen2-vl-v100-float16-flash_attention_2-448x448"], table()["v100"]
    )
    assert v100.outcome == "skip" and "8.0" in v100.reason and "7.0" in v100.reason and "sdpa" in v100.reason
    cpu = capabilities.capability_expectation(c["tiny-qwen2-vl-cpu-float16-flash_attention_2-448x448"], table()["cpu"])
    assert cpu.outcome == "skip" and "CUDA GPU" in cpu.reason
    a10g = capabilities.capability_expectation(
        c["tiny-qwen2-vl-a10g-float16-flash_attention_2-448x448"], table()["a10g"], flash_attn=False
    )
    assert a10g.outcome == "skip" and "flash-attn" in a10g.reason and a10g.categories == ["missing-package"]
    assert (
        capabilities.capability_expectation(
            c["tiny-qwen2-vl-a10g-float16-flash_attention_2-448x448"], table()["a10g"], flash_attn=True
        )
        is None
    )


def test_vllm_backend_says_what_is_missing():
    cell = expand()["tiny-qwen2-vl-a10g-float16-sdpa-448x448-vllm"]
    e = capabilities.effective_expectation(cell, table()["a10g"])
    assert e.outcome == "skip" and "vllm" in e.reason


def test_a_matrix_rule_overrides_the_capability_rule():
    text = (
        TEXT + "expect:\n  - when: {device: v100, dtype: bfloat16}\n    outcome: skip\n    reason: not on our V100s\n"
    )
    cell = expand(text)["tiny-qwen2-vl-v100-bfloat16-sdpa-448x448"]
    e = capabilities.effective_expectation(cell, table()["v100"])
    assert e.outcome == "skip" and e.reason == "not on our V100s" and e.source == "matrix"


def test_another_devices_cell_is_skipped_with_the_host_named():
    cell = expand()["tiny-qwen2-vl-v100-float16-sdpa-448x448"]
    e = disposition(cell, "cpu")
    assert e.outcome == "skip" and e.reason == "this host is cpu; cell targets v100"
