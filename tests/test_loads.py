"""One load per model and dtype: cells that differ only in attention run on one loaded model, its attention
switched, and compute what a fresh load with that attention computes; the run order, the load count and the
load plan follow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.matrix import cells
from harness.matrix import schema as matrix
from harness.models import checkpoints
from harness.models.families import FAMILIES
from harness.run import inference

REPO = Path(__file__).resolve().parents[1]


def _first_step(processor, model, prepared):
    generation = inference.run(processor, model, prepared, max_new_tokens=3)
    return generation.first_logits, generation.new_token_ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_switched_model_computes_what_a_fresh_load_computes(family):
    folder = str(checkpoints.tiny_checkpoint(family))
    processor, with_sdpa = inference.load(folder, dtype="float32", attn_implementation="sdpa", device="cpu")
    _, with_eager = inference.load(folder, dtype="float32", attn_implementation="eager", device="cpu")
    prepared = inference.prepare(processor, with_sdpa, inference.CellInput(width=224, height=224))
    fresh = {"sdpa": _first_step(processor, with_sdpa, prepared), "eager": _first_step(processor, with_eager, prepared)}
    assert not torch.equal(fresh["sdpa"][0], fresh["eager"][0])  # the two attentions round differently: it shows
    assert inference.switch_attention(with_sdpa, "eager") and inference.switch_attention(with_eager, "sdpa")
    switched = {
        "eager": _first_step(processor, with_sdpa, prepared),
        "sdpa": _first_step(processor, with_eager, prepared),
    }
    for attention in ("sdpa", "eager"):
        assert torch.equal(switched[attention][0], fresh[attention][0]), attention
        assert switched[attention][1] == fresh[attention][1], attention


def test_a_placed_model_switched_computes_what_a_fresh_placed_load_computes(tiny_cell, tmp_path):
    """Modules on disk and CPU behind accelerate's hooks: the switch is the configs', the hooks stay as they were."""
    from harness.matrix.placement import from_pretrained_kwargs
    from harness.plan.placement import host_free, meta_model

    cell, value = tiny_cell("qwen2_vl"), {"offload": ["vision"], "disk": ["lm_head", "layers:1"]}
    folder = str(checkpoints.tiny_checkpoint("qwen2_vl"))

    def placed(attention: str, offload: str):
        kwargs = from_pretrained_kwargs(value, meta_model(cell), free=host_free(None, 0), offload_folder=offload)
        return inference.load(
            folder, dtype="float32", attn_implementation=attention, device="cpu", placement_kwargs=kwargs
        )

    processor, switched = placed("sdpa", str(tmp_path / "a"))
    _, fresh = placed("eager", str(tmp_path / "b"))
    assert "disk" in switched.hf_device_map.values()
    prepared = inference.prepare(processor, switched, inference.CellInput(width=224, height=224))
    assert inference.switch_attention(switched, "eager")
    assert switched.hf_device_map == fresh.hf_device_map
    ours, theirs = _first_step(processor, switched, prepared), _first_step(processor, fresh, prepared)
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]


def test_a_switch_transformers_refuses_is_no_switch():
    """flash-attention-2 without flash-attn (the CPU here): set_attn_implementation raises, the caller loads again."""
    folder = str(checkpoints.tiny_checkpoint("qwen2_vl"))
    _, model = inference.load(folder, dtype="float32", attn_implementation="sdpa", device="cpu")
    assert not inference.switch_attention(model, "flash_attention_2")


def test_the_backend_loads_a_group_once_and_switches_its_attention(tiny_cell, monkeypatch):
    import dataclasses

    from harness.run.backends.transformers import TransformersBackend

    backend, events = TransformersBackend(), []
    sdpa = tiny_cell()
    eager = dataclasses.replace(sdpa, id=sdpa.id.replace("-sdpa-", "-eager-"), attn_implementation="eager")
    assert sdpa.group == eager.group
    assert backend.load(sdpa, events.append) > 0 and backend.load(eager, events.append) == 0.0
    assert backend.model.config._attn_implementation == "eager" and backend.attention == "eager"
    assert [e["event"] for e in events] == ["loading", "loaded"]
    monkeypatch.setattr(inference, "switch_attention", lambda model, attention: False)  # a switch that did not take
    assert backend.load(sdpa, events.append) > 0
    assert backend.model.config._attn_implementation == "sdpa" and len(events) == 4  # loaded again


def _default_cpu_cells():
    return [c for c in cells.expand(matrix.load(REPO / "matrices" / "default.yaml"), "d") if c.device == "cpu"]


def test_attention_variants_share_a_group_in_process_only():
    ordered = cells.run_order(_default_cpu_cells())
    groups = [c.group for c in ordered]
    assert len(set(groups)) == 4 * 2  # the four tiny families x two dtypes: sdpa and eager share each
    assert sum(a != b for a, b in zip(groups, groups[1:], strict=False)) == len(set(groups)) - 1
    m = matrix.Matrix.model_validate(
        yaml.safe_load(
            """
            models: [{tiny: qwen2_vl, launch: transformers-serve}]
            devices: [h100]
            axes: {attn_implementation: [sdpa, eager, flash_attention_2], backend: [transformers, openai]}
            """
        )
    )
    ordered = cells.run_order(cells.expand(m, "m.yaml"))
    assert [(c.backend, c.attn_implementation) for c in ordered] == [
        ("transformers", "eager"),
        ("transformers", "sdpa"),
        ("transformers", "flash_attention_2"),  # not switched: a load of its own
        ("openai", "eager"),  # a server's attention is its launch flag: one server each
        ("openai", "flash_attention_2"),
        ("openai", "sdpa"),
    ]
    assert len({c.group for c in ordered}) == 5


def test_a_run_loads_once_for_both_attentions_and_counts_it(suite, matrix_file):
    path = matrix_file(
        """
        models: [{tiny: qwen2_vl}]
        axes: {attn_implementation: [sdpa, eager], resolution: [224x224]}
        defaults: {max_new_tokens: 3}
        """
    )
    suite.runpytest("--compat-matrix", str(path), "--compat-reports", "r").assert_outcomes(passed=2)
    run = json.loads((suite.path / "r" / "cpu" / "run.json").read_text())
    assert run["cells"] == 2 and run["model_loads"] == 1
    records = json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"]
    assert [(r["attn_implementation"], r["model_loaded"]) for r in records] == [("eager", True), ("sdpa", False)]


def test_plan_prints_the_load_plan_timed_at_this_hosts_cached_speeds(tmp_path, checkpoint_cache):
    import socket

    (checkpoint_cache / "host-speeds.json").write_text(
        json.dumps({socket.gethostname(): {"read_bytes_per_s": 1e6, "seed_values_per_s cpu": 1e6}})
    )
    path = tmp_path / "m.yaml"
    path.write_text(
        """
        models: [{tiny: qwen2_vl}, {arch: Qwen2-VL-2B-Instruct}]
        axes: {attn_implementation: [sdpa, eager], dtype: [bfloat16]}
        """
    )
    command = [sys.executable, "-m", "harness.cli", "plan", str(path), "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 loads for 4 cells (2 attention switches on a loaded model, not loads)" in done.stdout
    assert "at this host's read 1.0 MB/s, seeding 1e+06 values/s (measured once, cached)" in done.stdout

    from harness.plan.loads import load_plan

    plan_cells = cells.expand(matrix.load(path), str(path))
    tiny, arch = load_plan(plan_cells, read_bytes_per_s=1e6, seed_values_per_s=1e6)
    assert (tiny.weights, arch.weights) == ("read", "seeded")
    assert tiny.predicted_s == pytest.approx(tiny.bytes / 1e6) and tiny.bytes == tiny.values * 4  # saved in float32
    stored = (Path(checkpoints.tiny_checkpoint("qwen2_vl")) / "model.safetensors").stat().st_size
    assert abs(tiny.bytes - stored) / stored < 0.01  # the file holds those bytes (and its small header)
    assert arch.predicted_s == pytest.approx(arch.values / 1e6) and arch.bytes == 2 * arch.values
    assert arch.attentions == ["eager", "sdpa"] and arch.cells == 2


def test_this_hosts_speeds_are_measured_once_and_kept_per_host(tmp_path, monkeypatch):
    import socket

    from harness.devices import speeds

    monkeypatch.setenv("QWEN_COMPAT_CACHE", str(tmp_path))
    monkeypatch.setattr(speeds, "READ_PROBE_BYTES", 16 * 2**20)
    monkeypatch.setattr(speeds, "SEED_PROBE_VALUES", 1 << 18)
    read, seeding = speeds.read_bytes_per_s(), speeds.seed_values_per_s("cpu")
    assert read > 0 and seeding > 0
    assert [p.name for p in tmp_path.iterdir()] == ["host-speeds.json"]  # the probe file is gone
    kept = json.loads((tmp_path / "host-speeds.json").read_text())[socket.gethostname()]
    assert kept == {"read_bytes_per_s": read, "seed_values_per_s cpu": seeding}

    def measured_again(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(speeds, "_measure_read", measured_again)
    monkeypatch.setattr(speeds, "_measure_seeding", measured_again)
    assert (speeds.read_bytes_per_s(), speeds.seed_values_per_s("cpu")) == (read, seeding)
