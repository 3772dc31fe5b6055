"""The memory planner: exact where it can be (weights, KV cache), and usable from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.matrix import inputs
from harness.models import architectures, checkpoints
from harness.models.families import FAMILIES
from harness.plan import memory as plan
from harness.run import inference

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.mark.parametrize("name", list(architectures.shipped()))
def test_parameter_arithmetic_equals_the_instantiated_model(name):
    import transformers

    raw = architectures.load_config(name)
    full = getattr(transformers, FAMILIES[raw["model_type"]].config_class).from_dict(raw).to_dict()
    assert plan.parameter_count(full) == architectures.count_parameters(raw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_planned_weights_and_kv_equal_what_the_tiny_model_allocates(family, dtype, tiny_cell):
    cell = tiny_cell(family, dtype=dtype)
    processor, model = inference.load(
        str(checkpoints.tiny_checkpoint(family)), dtype=dtype, attn_implementation="sdpa", device="cpu"
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = inference.CellInput(kind="image", width=448, height=448, prompt=cell.prompt)
    gen = inference.run(processor, model, inference.prepare(processor, model, spec), max_new_tokens=cell.max_new_tokens)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cell.prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[inputs.synthetic_image(448, 448)], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=cell.max_new_tokens,
            min_new_tokens=cell.max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cache = out.past_key_values
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    predicted = plan.predict(cell, text_tokens=gen.input_tokens - gen.visual_tokens, visual_tokens=gen.visual_tokens)
    assert predicted.parts["weights_mib"] == round(weight_bytes / MIB, 1)
    assert predicted.cached_tokens == cache.get_seq_length()
    assert predicted.parts["kv_cache_mib"] == round(kv_bytes / MIB, 2)
    assert predicted.visual_tokens == plan.visual_tokens_for(cell)[0] == gen.visual_tokens


def test_eager_attention_costs_more_than_sdpa_and_grows_quadratically(tiny_cell):
    sdpa = plan.predict(tiny_cell("qwen2_vl", resolution="1024x1024"))
    eager = plan.predict(tiny_cell("qwen2_vl", resolution="1024x1024", attn_implementation="eager"))
    small = plan.predict(tiny_cell("qwen2_vl", resolution="512x512", attn_implementation="eager"))
    assert eager.parts["vision_activations_mib"] > sdpa.parts["vision_activations_mib"]
    assert eager.parts["vision_activations_mib"] > 10 * small.parts["vision_activations_mib"]


def test_plan_nightly_on_v100_json():
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "plan", "matrices/nightly.yaml", "--device", "v100", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["id"]: r for r in json.loads(done.stdout)}
    assert rows and all(r["id"].split("-")[3] == "v100" or "-v100-" in r["id"] for r in rows.values())
    for r in rows.values():
        assert set(r["parts"]) >= {"weights_mib", "kv_cache_mib", "vision_activations_mib", "overhead_mib"}
        assert r["verdict"] in ("fits", "tight", "over")
    params = architectures.count_parameters(architectures.load_config("Qwen2-VL-7B-Instruct"))
    fp16 = rows["qwen2-vl-7b-v100-float16-sdpa-1024x1024"]
    assert fp16["parts"]["weights_mib"] == round(2 * params / MIB, 1)
    assert rows["qwen2-vl-7b-v100-float32-sdpa-1024x1024"]["verdict"] == "over"  # 33 GB of weights on 32 GB


def test_seed_article_prints_claims_beside_predictions():
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "plan", "matrices/seed-article.yaml", "--device", "a100", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = json.loads(done.stdout)
    claims = {r["id"]: r["claim"]["peak_gb"] for r in rows if "claim" in r}
    assert sorted(claims.values()) == [18.3, 19.5, 28.7, 31.2]
    fp32 = next(r for r in rows if r["id"] == "qwen2-vl-7b-a100-float32-sdpa-1024x1024")
    assert fp32["parts"]["weights_mib"] * MIB / 1e9 > fp32["claim"]["peak_gb"]  # the claim is below the weights alone


def test_doctor_runs_on_a_host_without_gpu():
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "doctor", "matrices/default.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr
    for needle in ("native bf16", "transformers", "flash-attn", "vLLM", "cells here:"):
        assert needle in done.stdout


def test_emulated_cells_on_a_host_without_cuda_are_errors_that_say_where(suite):
    """--emulate rtx4090 on a (declared) H100: the 4090's cells are this host's, reports say where they
    were emulated, and since this machine has no GPU the cell is an error, never a pass. What the cap
    itself does is tests/test_verdict.py::test_an_emulated_card_runs_out_of_memory_where_the_card_would."""
    result = suite.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "nightly.yaml"),
        "--compat-device",
        "h100",
        "--compat-emulate",
        "rtx4090",
        "-m",
        "rtx4090",
        "-k",
        "qwen2-vl-7b and 448x448-video and sdpa and bfloat16 and not max",
        "--compat-reports",
        "r",
    )
    env = json.loads((suite.path / "r" / "rtx4090" / "results.json").read_text())
    assert env["environment"]["device"] == "rtx4090" and env["environment"]["emulated_on"] == "NVIDIA H100 80GB"
    (cell,) = env["cells"]
    # This machine has no GPU, so the worker refuses to run a GPU cell on the CPU, and says why.
    assert cell["outcome"] == "error" and "torch sees no CUDA GPU" in cell["message"]
    assert result.ret == 1


def test_emulation_needs_a_gpu_host(pytester):
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    result = pytester.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "nightly.yaml"),
        "--compat-device",
        "cpu",
        "--compat-emulate",
        "t4",
        "--collect-only",
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--compat-emulate t4 caps a GPU's memory" in result.stderr.str() and "Fix:" in result.stderr.str()


def test_a_model_the_planner_cannot_read_still_runs(monkeypatch, tiny_cell):
    """The plan is advice: when it fails for a config, the cell runs and reports no prediction."""
    from harness.run.backends import transformers

    def broken(cell, **kwargs):
        raise KeyError("num_experts")

    monkeypatch.setattr(plan, "predict", broken)
    assert transformers._predict(tiny_cell()) is None
