"""Quantized checkpoints loaded for real on the CPU: each format built here runs inference through the harness,
drifts from its float32 unquantized twin within its bound (and the bound is justified by what is measured), the
planner's weight bytes match what the loaded model holds, and the real refusals are what the rules predict.

Needs the `quant` extra (torchao, bitsandbytes, compressed-tensors, gguf); a missing package skips its tests.
"""

import dataclasses
import json
import shutil
import subprocess

import pytest
import yaml

from harness.errors import UserError
from harness.judge.failures import classify
from harness.matrix import cells
from harness.matrix import quantization as quant
from harness.matrix import schema as matrix
from harness.report.results import load_results

for package in ("torchao", "bitsandbytes", "compressed_tensors", "gguf"):
    pytest.importorskip(
        package, reason=f"the quant extra is not installed: pip install 'qwen-compat[quant]' ({package})"
    )

import torch  # noqa: E402

from harness.devices.memory import held_bytes  # noqa: E402
from harness.models.checkpoints import checkpoint_for, tiny_checkpoint  # noqa: E402
from harness.plan.memory import meta_model, predict  # noqa: E402
from harness.plan.quantized import weight_bytes  # noqa: E402
from harness.run import inference  # noqa: E402
from harness.run.backends.transformers import TransformersBackend, _quantized_folder  # noqa: E402

BUILT_HERE = [key for key, fmt in quant.formats().items() if fmt.made_here == "tiny" and key != "gguf-q8_0"]
FAMILIES = ["qwen2_vl", "qwen3_vl"]
RUN = f"""
models: [{{tiny: qwen2_vl}}, {{tiny: qwen3_vl}}]
defaults: {{max_new_tokens: 4}}
axes:
  quantization: [none, {", ".join(BUILT_HERE)}, gguf-q8_0, torchao-int8+vision, fp8+vision]
"""
# A bound must leave room over what the tiny models drift (MIN_HEADROOM) and still catch a format that has gone
# wrong (MAX_HEADROOM): a bound 15 times what is measured would let a broken kernel pass.
MIN_HEADROOM, MAX_HEADROOM = 1.5, 15


def cell_of(family: str, value: str, dtype: str = "float32") -> cells.Cell:
    m = matrix.Matrix.model_validate(
        {"models": [{"tiny": family}], "axes": {"quantization": [value], "dtype": [dtype]}}
    )
    return cells.expand(m, "m.yaml")[0]


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, suite_cmd):
    """One real CPU run of every format built here on two families, with their float32 unquantized twins."""
    folder = tmp_path_factory.mktemp("quantized")
    (folder / "matrix.yaml").write_text(RUN)
    args = ["--compat-matrix", "matrix.yaml", "--compat-reports", "reports", "-rA"]
    done = subprocess.run(suite_cmd(folder, *args), cwd=folder, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    return {c["id"]: c for c in load_results(folder / "reports" / "cpu" / "results.json")["cells"]}


def test_every_format_built_here_runs_real_inference_on_the_cpu(quantized_run):
    for family in ("tiny-qwen2-vl", "tiny-qwen3-vl"):
        for value in [*BUILT_HERE, "torchao-int8+vision"]:
            record = quantized_run[f"{family}-cpu-float32-sdpa-448x448-{value}"]
            assert record["outcome"] == "passed", (value, record.get("verdict"))
            assert record["output_text"] and record["measurements"]["visual_tokens"] > 0, value


def test_a_compressed_tensors_vision_tower_is_the_expected_failure_of_decompressing_after_it(quantized_run):
    """transformers' generate runs the vision tower before the first forward pass that decompresses the weights."""
    for family in ("tiny-qwen2-vl", "tiny-qwen3-vl"):
        record = quantized_run[f"{family}-cpu-float32-sdpa-448x448-fp8+vision"]
        assert record["outcome"] == "xfailed" and "Float8_e4m3fn" in json.dumps(record)


def test_gguf_is_the_expected_failure_transformers_raises_for_qwen_vl(quantized_run):
    record = quantized_run["tiny-qwen2-vl-cpu-float32-sdpa-448x448-gguf-q8_0"]
    assert record["outcome"] == "xfailed"
    assert "GGUF model with architecture qwen2vl is not supported yet" in json.dumps(record)
    assert quantized_run["tiny-qwen3-vl-cpu-float32-sdpa-448x448-gguf-q8_0"]["outcome"] == "xfailed"


def test_drift_is_measured_against_the_float32_unquantized_twin_within_each_formats_bound(quantized_run):
    measured: dict[str, float] = {}
    for cid, record in quantized_run.items():
        value = record["quantization"]
        if value in ("none", "gguf-q8_0", "fp8+vision"):
            continue
        m = record["measurements"]
        assert m["drift"] == "measured" and m["drift_reference"] == cid.removesuffix(f"-{value}"), cid
        assert m["drift_relative_diff"] <= quant.parse(value).format.drift_max and m["drift_topk_agree"], cid
        fmt = value.removesuffix("+vision")
        measured[fmt] = max(measured.get(fmt, 0), m["drift_relative_diff"])
    for fmt, worst in measured.items():
        bound = quant.formats()[fmt].drift_max
        assert worst * MIN_HEADROOM <= bound <= worst * MAX_HEADROOM, (fmt, worst, bound)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("value", [*BUILT_HERE, "torchao-int8+vision"])
def test_predicted_weight_bytes_are_what_the_loaded_model_holds(family, value):
    """Packed formats are measured after load (bitsandbytes' CPU path moves the int8 scales off the weight at the
    first forward); dequantized ones (compressed-tensors) after the first forward, which decompresses them."""
    cell = cell_of(family, value)
    folder, kwargs = _quantized_folder(cell, checkpoint_for(cell.source))
    processor, model = inference.load(
        folder, dtype="float32", attn_implementation="sdpa", device="cpu", quantization_kwargs=kwargs
    )
    loaded = held_bytes(model)
    inference.run(
        processor,
        model,
        inference.prepare(processor, model, inference.CellInput(width=56, height=56)),
        max_new_tokens=1,
    )
    held = max(loaded, held_bytes(model))
    predicted = weight_bytes(meta_model(cell), value, "float32").resident
    assert predicted == pytest.approx(held, rel=0.015), (value, predicted, held)
    assert predict(cell).parts["weights_mib"] == round(predicted / 2**20, 1)


def test_the_vision_tower_stays_unquantized_unless_the_value_says_plus_vision():
    def tower_and_text(value):
        cell = cell_of("qwen2_vl", value)
        folder, kwargs = _quantized_folder(cell, checkpoint_for(cell.source))
        _, model = inference.load(
            folder, dtype="float32", attn_implementation="sdpa", device="cpu", quantization_kwargs=kwargs
        )
        kinds = lambda module: {type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)}  # noqa: E731
        return kinds(model.model.visual), kinds(model.model.language_model), type(model.lm_head.weight).__name__

    tower, text, head = tower_and_text("torchao-int8")
    assert tower == {"Parameter"} and text == {"Int8Tensor"} and head == "Parameter"
    tower, text, head = tower_and_text("torchao-int8+vision")
    assert tower == {"Int8Tensor"} and head == "Parameter"


@pytest.mark.parametrize(("family", "arch"), [("qwen2_vl", "qwen2vl"), ("qwen3_vl", "qwen3vl")])
def test_transformers_refuses_the_gguf_file_in_its_own_words_and_the_classifier_knows_them(family, arch):
    cell = cell_of(family, "gguf-q8_0")
    folder, kwargs = _quantized_folder(cell, checkpoint_for(cell.source))
    assert kwargs == {"gguf_file": "model-q8_0.gguf"}
    with pytest.raises(ValueError, match=f"GGUF model with architecture {arch} is not supported yet") as err:
        inference.load(folder, dtype="float32", attn_implementation="sdpa", device="cpu", quantization_kwargs=kwargs)
    found = classify(f"ValueError: {err.value}")
    assert found.category == "dtype-unsupported" and found.matched == "gguf-architecture-not-supported"


def test_torchaos_cpu_int4_packing_refuses_any_other_device_and_the_classifier_knows_it():
    """What a GPU load of the CPU-packed int4 meets (the meta device stands for any non-CPU device here: the same
    check in torchao refuses both)."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    with pytest.raises(AssertionError, match="Expecting 2D tensor on CPU, but got") as err:
        Int4OpaqueTensor.from_hp(torch.empty(64, 64, device="meta"), [1, 32])
    found = classify(f"AssertionError: {err.value}")
    assert found.category == "dtype-unsupported" and found.matched == "torchao-cpu-int4-on-another-device"


def test_a_path_checkpoint_whose_files_do_not_match_its_config_is_an_error_naming_the_file(tmp_path):
    """An unquantized save whose config.json claims bitsandbytes: the matrix's input, named before any load."""
    folder = tmp_path / "claims-nf4"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    m = matrix.Matrix.model_validate(yaml.safe_load(f"models: [{{path: '{folder}'}}]\n"))
    cell = cells.expand(m, "m.yaml")[0]
    assert cell.quantization == "bnb-nf4" and cell.prequantized
    with pytest.raises(UserError) as err:
        TransformersBackend().load(cell, lambda event: None)
    text = str(err.value)
    assert str(folder / "config.json") in text and "quantization_config" in text and "model.safetensors" in text


def test_a_format_packed_differently_by_a_new_library_version_is_rebuilt(monkeypatch):
    """The library versions are part of a quantized checkpoint's recipe."""
    from importlib import metadata

    from harness.models.quantized import quantized_checkpoint

    first = quantized_checkpoint({"tiny": "qwen2_vl"}, "bnb-int8", "float32", group_size=None, library="bitsandbytes")
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: "99.0" if p == "bitsandbytes" else real(p))
    again = quantized_checkpoint({"tiny": "qwen2_vl"}, "bnb-int8", "float32", group_size=None, library="bitsandbytes")
    assert again != first and (again / "config.json").exists()


def test_the_drift_reference_is_saved_by_the_unquantized_float32_cell_only(tmp_path):
    from harness.judge.drift import NO_TWIN, drift

    logits = torch.randn(32)
    quantized = cell_of("qwen2_vl", "bnb-int8")
    assert drift(quantized, logits, tmp_path, "k") == {"drift": NO_TWIN}
    assert drift(dataclasses.replace(quantized, quantization="none"), logits, tmp_path, "k") == {}
    assert drift(quantized, logits + 0.01, tmp_path, "k")["drift"] == "measured"
