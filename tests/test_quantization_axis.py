"""The quantization axis as data: values and their errors, cell ids, selectors, real checkpoints recognised from
their config, and the capability rules per card and engine (no torch, no quantization package needed)."""

import json

import pytest
import yaml

from harness.errors import UserError
from harness.matrix import capabilities, cells
from harness.matrix import quantization as quant
from harness.matrix import schema as matrix
from harness.matrix.gpus import table
from harness.run.disposition import disposition

AWQ_CONFIG = {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm", "zero_point": True}


def expand(text: str) -> dict[str, cells.Cell]:
    return {c.id: c for c in cells.expand(matrix.Matrix.model_validate(yaml.safe_load(text)), "m.yaml")}


def expectation(cell: cells.Cell):
    return capabilities.effective_expectation(cell, table()[cell.device])


def test_every_format_row_has_a_source_per_engine_and_a_layout_the_planner_reads():
    for fmt in quant.formats().values():
        assert fmt.engines and fmt.made_here in ("tiny", "none") and 0 < fmt.drift_max < 1, fmt.key
        assert fmt.layout.resident in ("packed", "dense") and fmt.layout.bits in (4, 8), fmt.key
        for engine, rule in fmt.engines.items():
            assert engine in quant.ENGINES and rule.source.startswith("https://"), (fmt.key, engine)
        assert fmt.made_here == "tiny" or fmt.why, fmt.key


def test_values_ids_and_selectors():
    text = """
models: [{tiny: qwen2_vl}]
axes: {quantization: [none, bnb-nf4, fp8+vision]}
expect:
  - when: {quantization: fp8+vision}
    outcome: skip
    reason: vision tower in fp8 is not what we ship
"""
    found = expand(text)
    assert list(found) == [
        "tiny-qwen2-vl-cpu-float32-sdpa-448x448",
        "tiny-qwen2-vl-cpu-float32-sdpa-448x448-bnb-nf4",
        "tiny-qwen2-vl-cpu-float32-sdpa-448x448-fp8+vision",
    ]
    nf4 = found["tiny-qwen2-vl-cpu-float32-sdpa-448x448-bnb-nf4"]
    assert nf4.axis_values()["quantization"] == "bnb-nf4" and nf4.drift_twin == "tiny-qwen2-vl-cpu-float32-sdpa-448x448"
    assert nf4.group != found["tiny-qwen2-vl-cpu-float32-sdpa-448x448"].group  # a quantized model is loaded apart
    assert found["tiny-qwen2-vl-cpu-float32-sdpa-448x448-fp8+vision"].expectation.outcome == "skip"
    assert quant.parse("fp8+vision").vision and not quant.parse("fp8").vision


def test_unknown_format_says_did_you_mean_with_file_and_line(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("models: [{tiny: qwen2_vl}]\naxes:\n  quantization: [none, nf4]\n")
    with pytest.raises(UserError) as err:
        matrix.load(path)
    text = str(err.value)
    assert "did you mean 'bnb-nf4'?" in text and "line 3" in text and "axes.quantization" in text


def test_the_unquantized_float32_cell_runs_first_and_is_the_drift_reference():
    text = "models: [{tiny: qwen2_vl}]\naxes: {dtype: [bfloat16, float32], quantization: [bnb-int8, none]}\n"
    order = [c.id for c in cells.run_order(list(expand(text).values()))]
    assert order[0] == "tiny-qwen2-vl-cpu-float32-sdpa-448x448"
    references = [c.id for c in expand(text).values() if c.drift_reference]
    assert references == ["tiny-qwen2-vl-cpu-float32-sdpa-448x448"]


def test_drift_bound_is_the_formats_plus_the_dtypes_unless_the_matrix_sets_one():
    text = "models: [{tiny: qwen2_vl}]\naxes: {dtype: [float32, bfloat16], quantization: [bnb-nf4]}\n"
    found = expand(text)
    nf4 = quant.formats()["bnb-nf4"].drift_max
    assert found["tiny-qwen2-vl-cpu-float32-sdpa-448x448-bnb-nf4"].drift_max_abs_diff == nf4
    assert found["tiny-qwen2-vl-cpu-bfloat16-sdpa-448x448-bnb-nf4"].drift_max_abs_diff == nf4 + 0.25
    own = expand(text + "defaults: {drift_max_abs_diff: 0.9}\n")
    assert {c.drift_max_abs_diff for c in own.values()} == {0.9}


def test_a_path_checkpoint_whose_config_says_awq_is_an_awq_cell_whatever_the_axis_lists(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "quantization_config": AWQ_CONFIG}))
    text = f"models: [{{path: '{tmp_path}', id: mine}}]\naxes: {{quantization: [none, bnb-nf4]}}\n"
    found = expand(text)
    assert list(found) == ["mine-cpu-float32-sdpa-448x448-awq"]
    cell = found["mine-cpu-float32-sdpa-448x448-awq"]
    assert cell.prequantized and cell.drift_reference and cell.source["quantization"] == "awq"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb-nf4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb-int8"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8-block"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}, "input_activations": None}},
            },
            "w4a16",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8}, "input_activations": {}}},
            },
            "fp8",
        ),
        ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}, "torchao-int8"),
        ({"quant_method": "hqq"}, None),
    ],
)
def test_real_quantization_configs_are_recognised(config, expected):
    assert quant.recognise(config) == expected


def test_a_hub_id_says_its_format_by_name_and_an_entry_may_declare_it():
    text = """
models:
  - hub: Qwen/Qwen2.5-VL-72B-Instruct-AWQ
  - hub: Qwen/Qwen3-VL-8B-Instruct-FP8
  - hub: RedHatAI/Qwen2.5-VL-7B-Instruct-FP8-Dynamic
  - {hub: org/Qwen2-VL-7B-x, quantization: gptq}
"""
    assert sorted(c.quantization for c in expand(text).values()) == ["awq", "fp8", "fp8-block", "gptq"]


def test_quantization_on_a_tiny_model_entry_is_refused_with_the_axis_as_the_fix():
    with pytest.raises(UserError) as err:
        expand("models: [{tiny: qwen2_vl, quantization: awq}]\n")
    assert "axes: quantization:" in str(err.value)


def test_a_path_whose_config_and_entry_disagree_is_an_error_naming_both(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "quantization_config": AWQ_CONFIG}))
    with pytest.raises(UserError) as err:
        expand(f"models: [{{path: '{tmp_path}', quantization: gptq}}]\n")
    assert "gptq" in str(err.value) and "awq" in str(err.value)


FLEET = """
sections:
  - models: [{tiny: qwen2_vl}]
    devices: [cpu, v100, t4, a100, h100]
    axes: {dtype: [float16], quantization: [bnb-int8, bnb-nf4, torchao-int4, gguf-q8_0, awq]}
  - models: [{hub: Qwen/Qwen2.5-VL-72B-Instruct-AWQ, launch: vllm}]
    devices: [v100, t4]
    axes: {dtype: [float16], backend: [openai]}
"""


def test_awq_on_a_v100_in_vllm_is_an_expected_failure_in_vllms_words_and_runs_on_a_t4():
    found = expand(FLEET)
    v100 = expectation(found["qwen2-5-vl-72b-instruct-awq-v100-float16-sdpa-448x448-openai-awq"])
    assert v100.outcome == "xfail" and v100.categories == ["dtype-unsupported"]
    assert v100.reason.startswith("awq needs sm75 in vllm")
    assert "Minimum capability: 75. Current capability: 70." in v100.reason
    t4 = found["qwen2-5-vl-72b-instruct-awq-t4-float16-sdpa-448x448-openai-awq"]
    assert capabilities.capability_expectation(t4, table()["t4"]) is None


def test_card_rules_for_the_formats_built_here():
    found = expand(FLEET)

    def rule(fmt, device):
        return expectation(found[f"tiny-qwen2-vl-{device}-float16-sdpa-448x448-{fmt}"])

    assert rule("bnb-int8", "v100").outcome == "xfail" and "sm75" in rule("bnb-int8", "v100").reason
    assert rule("bnb-int8", "t4").outcome != "xfail" and rule("bnb-nf4", "v100").outcome != "xfail"
    for device in ("t4", "a100", "h100"):  # the CPU-packed int4 checkpoint loads only on the CPU
        assert rule("torchao-int4", device).outcome == "xfail" and "CPU" in rule("torchao-int4", device).reason
    gguf = rule("gguf-q8_0", "cpu")
    assert (
        gguf.outcome == "xfail"
        and gguf.strict
        and "GGUF model with architecture qwen2vl is not supported yet" in (gguf.reason)
    )
    awq = rule("awq", "cpu")
    assert awq.outcome == "skip" and "not made here" in awq.reason


def test_a_format_whose_package_is_missing_is_a_skip_naming_package_and_extra(monkeypatch):
    monkeypatch.setattr(capabilities, "installed", lambda package: package != "bitsandbytes")
    cell = expand("models: [{tiny: qwen2_vl}]\naxes: {quantization: [bnb-nf4]}\n")
    e = disposition(next(iter(cell.values())), "cpu")
    assert e.outcome == "skip" and e.categories == ["missing-package"]
    assert "bitsandbytes" in e.reason and "qwen-compat[quant]" in e.reason


def test_served_cells_of_formats_built_here_are_skipped_and_placements_too():
    text = """
models: [{tiny: qwen2_vl, launch: vllm}]
axes: {quantization: [bnb-nf4], backend: [openai, transformers], placement: [single, auto]}
"""
    reasons = {cid: expectation(c) for cid, c in expand(text).items()}
    served = reasons["tiny-qwen2-vl-cpu-float32-sdpa-448x448-openai-bnb-nf4"]
    assert served.outcome == "skip" and "real quantized checkpoint" in served.reason
    placed = reasons["tiny-qwen2-vl-cpu-float32-sdpa-448x448-bnb-nf4-auto"]
    assert placed.outcome == "skip" and "placed whole" in placed.reason


def _awq_folder(tmp_path, name: str, base: str, **text) -> str:
    """A local folder with a shipped architecture's config and AWQ's quantization_config (the unpadded first
    release of Qwen2.5-VL-72B-Instruct-AWQ when given the bf16 intermediate size)."""
    from harness.models.architectures import load_config

    folder = tmp_path / name
    folder.mkdir()
    config = {**load_config(base), **text, "quantization_config": AWQ_CONFIG}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_tensor_parallel_refusal_of_marlin_is_predicted_from_the_config_in_vllms_words(tmp_path):
    from harness.engines.availability import serving_expectation, tensor_parallel_expectation

    first = _awq_folder(tmp_path, "first-awq", "Qwen2.5-VL-72B-Instruct", intermediate_size=29568)
    text = f"""
models:
  - {{path: '{first}', id: first, launch: {{command: vllm, tensor_parallel_size: 2}}}}
  - {{path: '{first}', id: four, launch: {{command: vllm, tensor_parallel_size: 4}}}}
  - {{hub: Qwen/Qwen2.5-VL-72B-Instruct-AWQ, id: padded, launch: {{command: vllm, tensor_parallel_size: 2}}}}
devices: [a100]
axes: {{dtype: [float16], backend: [openai]}}
"""
    found = {c.model: c for c in expand(text).values()}
    at_two = serving_expectation(found["first"])
    assert at_two.outcome == "xfail" and at_two.categories == ["dtype-unsupported"]
    assert (
        "Weight input_size_per_partition = 14784 is not divisible by min_thread_k = 128. Consider reducing "
        "tensor_parallel_size or running with --quantization gptq." in at_two.reason
    )
    assert "input_size_per_partition = 7392" in serving_expectation(found["four"]).reason
    padded = found["padded"]  # the published AWQ file pads the intermediate size to 29696: 14848 per shard
    assert padded.quantization == "awq" and tensor_parallel_expectation(padded) is None


def test_plan_says_in_advance_what_fails_on_the_card(tmp_path, capsys):
    from harness.cli import main

    first = _awq_folder(tmp_path, "first-awq", "Qwen2.5-VL-72B-Instruct", intermediate_size=29568)
    seven = _awq_folder(tmp_path, "Qwen2.5-VL-7B-Instruct-AWQ", "Qwen2.5-VL-7B-Instruct")
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""
sections:
  - models: [{{arch: Qwen2-VL-2B-Instruct}}]
    devices: [v100]
    axes: {{dtype: [float16], quantization: [none, bnb-int8, bnb-nf4]}}
  - models:
      - {{path: '{seven}', launch: vllm}}
      - {{path: '{first}', id: first-awq, launch: {{command: vllm, tensor_parallel_size: 2}}}}
    devices: [v100, a100]
    axes: {{dtype: [float16], backend: [openai]}}
"""
    )
    assert main(["plan", str(path), "--device", "v100", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    awq = rows["qwen2-5-vl-7b-instruct-awq-v100-float16-sdpa-448x448-openai-awq"]["expected"]
    assert awq["outcome"] == "xfail" and awq["reason"].startswith("awq needs sm75 in vllm")
    assert "expected" not in rows["qwen2-vl-2b-v100-float16-sdpa-448x448-bnb-nf4"]
    assert rows["qwen2-vl-2b-v100-float16-sdpa-448x448-bnb-int8"]["expected"]["reason"].startswith(
        "bnb-int8 needs sm75"
    )
    plain, int8, nf4 = (
        rows["qwen2-vl-2b-v100-float16-sdpa-448x448" + suffix]["parts"] for suffix in ("", "-bnb-int8", "-bnb-nf4")
    )
    assert nf4["weights_mib"] < int8["weights_mib"] < plain["weights_mib"] and "weights_packed_mib" in nf4
    assert main(["plan", str(path), "--device", "a100"]) == 0
    out = capsys.readouterr().out
    assert "first-awq-a100-float16-sdpa-448x448-openai-awq: expected failure: vllm will refuse awq" in out


def test_fine_grained_fp8_is_held_packed_from_sm89_and_dequantized_below(tmp_path):
    """transformers runs Qwen3-VL's FP8 images natively from sm89; below (and on the CPU) it dequantizes them."""
    from harness.models.architectures import load_config
    from harness.plan.memory import predict

    folder = tmp_path / "Qwen3-VL-8B-Instruct-FP8"
    folder.mkdir()
    config = {**load_config("Qwen3-VL-8B-Instruct"), "quantization_config": {"quant_method": "fp8"}}
    (folder / "config.json").write_text(json.dumps(config))
    found = expand(f"models: [{{path: '{folder}', id: fp8}}]\ndevices: [a100, h100]\naxes: {{dtype: [bfloat16]}}\n")
    a100, h100 = (predict(found[f"fp8-{d}-bfloat16-sdpa-448x448-fp8-block"]).parts for d in ("a100", "h100"))
    assert h100["weights_mib"] == h100["weights_packed_mib"] == a100["weights_packed_mib"] < a100["weights_mib"]
    assert expectation(found["fp8-a100-bfloat16-sdpa-448x448-fp8-block"]).outcome == "pass"


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (
            "ValueError: Weight input_size_per_partition = 14784 is not divisible by min_thread_k = 128. Consider "
            "reducing tensor_parallel_size or running with --quantization gptq.",
            "marlin-tensor-parallel-shard-not-divisible",
        ),
        (
            "ValueError: The quantization method awq is not supported for the current GPU. Minimum capability: 75. "
            "Current capability: 70.",
            "vllm-quantization-method-below-min-capability",
        ),
        (
            "RuntimeError: ('Quantization scheme is not supported for ', 'the current GPU. Min capability: 75. ', "
            "'Current capability: 70.')",
            "compressed-tensors-scheme-below-capability",
        ),
        ("ValueError: GGUF model with architecture qwen3vl is not supported yet.", "gguf-architecture-not-supported"),
    ],
)
def test_the_classifier_knows_the_refusals_the_rules_predict_with_the_format_in_its_cause(text, rule):
    from harness.judge.failures import classify

    found = classify(text)
    assert found.category == "dtype-unsupported" and found.matched == rule
    assert any(fmt in found.cause.lower() for fmt in ("awq", "gguf", "marlin", "fp8", "w4a16"))
