"""A cell's own bad input is the matrix's error, said in one paragraph; what a cell measures is the cell."""

import json

import pytest


def test_bad_sources_and_inputs_are_errors_naming_the_key_never_model_failures(
    suite, matrix_file, tmp_path, monkeypatch
):
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that cannot be reached
    not_a_model = tmp_path / "checkpoint-final"
    not_a_model.mkdir()
    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 10), (0, 0, 0)).save(wide)  # aspect ratio 300: Qwen's processors refuse it
    text = f"""
    defaults: {{max_new_tokens: 2}}
    sections:
      - models: [{{path: {not_a_model}, family: qwen2_vl}}]
      - models: [{{hub: Qwen/Qwen2-VL-2B-Instruct}}]
      - models: [{{tiny: qwen3_vl, id: wide}}]
        defaults: {{image: {wide}}}
    """
    result = suite.runpytest("--compat-matrix", str(matrix_file(text)), "--compat-reports", "r")
    result.assert_outcomes(errors=3)
    cells = {c["model"]: c for c in json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"]}
    expected = {"checkpoint-final": "models.path", "qwen2-vl-2b": "models.hub", "wide": "defaults.image"}
    for model, key in expected.items():
        cell = cells[model]
        assert cell["outcome"] == "error" and cell["category"] == "harness", cell
        assert f"key '{key}'" in cell["message"] and "Fix:" in cell["message"] and "\n" not in cell["message"]
        assert "Traceback" not in cell["message"]


def test_repeats_time_a_warm_up_then_n_runs_and_keep_their_spread(suite, matrix_file):
    text = """
    models: [{tiny: qwen2_vl}]
    axes: {resolution: [224x224]}
    defaults: {max_new_tokens: 3, repeats: 3}
    """
    assert suite.runpytest("--compat-matrix", str(matrix_file(text)), "--compat-reports", "r").ret == 0
    m = json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"][0]["measurements"]
    prefill = m["latency"]["prefill_s"]
    assert prefill["n"] == 3 and prefill["min"] <= prefill["median"] <= prefill["max"]
    assert prefill["spread"] == pytest.approx(prefill["max"] - prefill["min"], abs=1e-4)
    assert m["prefill_s"] == pytest.approx(prefill["median"], abs=1e-4)
    assert m["latency"]["decode_tokens_per_s"]["n"] == 3


def test_generation_keeps_first_logits_and_finiteness_not_every_step(monkeypatch):
    """A 151,936-token vocabulary costs 0.58 MiB a step in float32: generate must not return all of them."""
    import torch

    from harness.models import checkpoints
    from harness.run import inference

    folder = str(checkpoints.tiny_checkpoint("qwen2_vl"))
    processor, model = inference.load(folder, dtype="float32", attn_implementation="sdpa", device="cpu")
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prepared = inference.prepare(processor, model, inference.CellInput(width=224, height=224))
    gen = inference.run(processor, model, prepared, max_new_tokens=6)
    assert not seen.get("output_logits") and not seen.get("output_scores")
    assert gen.first_logits.shape == (model.config.get_text_config().vocab_size,)
    assert gen.first_logits.dtype == torch.float32 and gen.nonfinite_steps == [] and len(gen.new_token_ids) == 6


def test_on_a_gpu_steps_are_timed_by_cuda_events_read_after_one_synchronisation(monkeypatch):
    import torch

    from harness.run.inference import StepTimer

    events, syncs = [], []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = len(events) * 250.0  # ms: completion times as the GPU would stamp them
            events.append(self)

        def elapsed_time(self, other):
            assert syncs, "read before synchronising"
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    timer = StepTimer(torch.device("cuda"))
    for _ in range(3):
        timer.mark()
    assert not syncs  # nothing waits for the GPU while it works
    assert timer.seconds() == [0.25, 0.5] and len(syncs) == 1


def test_inputs_are_built_before_the_measured_region(monkeypatch, tiny_cell, tmp_path):
    """The tracker measures the cell's inference: images and tensors on the device exist before it starts."""
    from harness.devices import memory as measurements
    from harness.run import inference
    from harness.run.backends import RunContext
    from harness.run.backends.transformers import TransformersBackend

    order = []
    prepare, enter = inference.prepare, measurements.MemoryTracker.__enter__
    monkeypatch.setattr(inference, "prepare", lambda *a, **k: order.append("inputs") or prepare(*a, **k))
    monkeypatch.setattr(measurements.MemoryTracker, "__enter__", lambda self: order.append("measure") or enter(self))
    backend = TransformersBackend()
    try:
        reply = backend.run(
            tiny_cell(resolution="224x224"),
            RunContext(emit=lambda m: None, reference_dir=tmp_path, server_logs=tmp_path),
        )
    finally:
        backend.stop()
    assert reply["ok"] and order == ["inputs", "measure"]
