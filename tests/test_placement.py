"""Placement: values and ids, the real accelerate load path on the CPU (disk offload included), the planner's
split against the map transformers produced, offload advice, and CUDA_VISIBLE_DEVICES per xdist worker."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from harness.devices import visible as visible_gpus
from harness.errors import UserError
from harness.matrix import placement
from harness.models import checkpoints
from harness.plan import placement as placement_plan
from harness.run import inference

GIB = 2**30


@pytest.mark.parametrize(
    ("value", "cell_id"),
    [
        ("single", None),
        ("auto", "auto"),
        ({"gpus": 2}, "auto-2gpu"),
        ({"max_memory": {"gpu": "20GiB", "cpu": "64GiB"}}, "maxmem-gpu20gib-cpu64gib"),
        ({"max_memory": {1: "20GiB", 0: "10GiB", "cpu": "0.5MiB"}}, "maxmem-gpu0_10gib-gpu1_20gib-cpu0.5mib"),
        ({"offload": ["vision"]}, "offload-vision"),
        ({"offload": ["vision", "layers:6"], "disk": ["lm_head"]}, "offload-vision-layers6-disk-lmhead"),
    ],
)
def test_placement_ids_and_json_round_trip(value, cell_id):
    assert placement.cell_id_part(value) == cell_id
    carried = json.loads(json.dumps(placement.normalize(value)))  # as a cell travels to the worker
    assert placement.parse(carried) == placement.parse(value)


def test_sizes_use_the_budget_syntax():
    assert placement.size_bytes("0.5MiB") == 2**19
    assert placement.size_bytes("20GiB") == 20 * GIB
    assert placement.size_bytes("1.5 GiB") == 3 * 2**29


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("multi-gpu", "Input should be 'single' or 'auto'"),
        ({"max_memory": {"gpu": "20GB"}}, "max_memory.gpu"),
        ({"offload": ["vision"], "gpus": 2}, "not both"),
        ({"offlaod": ["vision"]}, "offlaod"),
    ],
)
def test_a_bad_placement_is_one_paragraph_with_the_fix(value, says):
    with pytest.raises(UserError) as err:
        placement.parse(value, file="m.yaml")
    text = str(err.value)
    assert says in text and "m.yaml" in text and "axes.placement" in text and "Fix:" in text


def test_gpus_requested_and_pinned_modules():
    assert placement.gpus_requested("auto") is None
    assert placement.gpus_requested({"gpus": 2}) == 2
    assert placement.gpus_requested({"max_memory": {1: "20GiB", "cpu": "1GiB"}}) == 2
    assert placement.pins_modules_off_gpu({"offload": ["vision"]})
    assert not placement.pins_modules_off_gpu({"max_memory": {"cpu": "1GiB"}})


def test_max_memory_is_complete_for_the_host():
    """accelerate uses only the devices a max_memory names: the harness fills in what transformers would measure."""
    free = {0: 70 * GIB, 1: 60 * GIB, "cpu": 100 * GIB}
    spec = placement.parse
    assert placement.max_memory_bytes(spec({"max_memory": {"cpu": "64GiB"}}), free) == {
        0: 70 * GIB,
        1: 60 * GIB,
        "cpu": 64 * GIB,
    }
    assert placement.max_memory_bytes(spec({"max_memory": {"gpu": "20GiB", 1: "10GiB"}}), free) == {
        0: 20 * GIB,
        1: 10 * GIB,
        "cpu": 90 * GIB,
    }
    assert placement.max_memory_bytes(spec({"gpus": 1}), free) == {0: 70 * GIB, "cpu": 90 * GIB}


def test_an_offload_prefix_that_names_no_module_lists_the_top_level_modules(tiny_cell):
    meta = placement_plan.meta_model(tiny_cell("qwen2_vl"))
    with pytest.raises(UserError) as err:
        placement.from_pretrained_kwargs({"offload": ["vison"]}, meta, free={"cpu": GIB}, offload_folder=None)
    text = str(err.value)
    assert "no module 'vison'" in text and "model.visual, model.language_model, lm_head" in text
    with pytest.raises(UserError, match="has 2"):
        placement.from_pretrained_kwargs({"offload": ["layers:3"]}, meta, free={"cpu": GIB}, offload_folder=None)


def _load(cell, value, folder):
    """The cell's tiny checkpoint through from_pretrained with the placement's kwargs, as the worker loads it."""
    kwargs = placement.from_pretrained_kwargs(
        value, placement_plan.meta_model(cell), free=placement_plan.host_free(None, 0), offload_folder=str(folder)
    )
    source = str(checkpoints.tiny_checkpoint(cell.family))
    processor = inference.AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
    return processor, model


@pytest.mark.parametrize(
    "value",
    [
        {"max_memory": {"cpu": "0.4MiB"}},
        {"max_memory": {"cpu": "0.2MiB"}},  # everything on disk: the model's `device` reads meta
        {"offload": ["vision"], "disk": ["lm_head", "layers:1"]},
    ],
    ids=["cpu-cap-forces-disk", "everything-on-disk", "pinned-disk"],
)
def test_disk_offload_generates_and_the_planned_split_is_the_one_transformers_used(tiny_cell, tmp_path, value):
    cell = tiny_cell("qwen2_vl")
    predicted = placement_plan.predict_placement(cell, value, free=placement_plan.host_free(None, 0))
    processor, offloaded = _load(cell, value, tmp_path)
    assert offloaded.hf_device_map == predicted.device_map
    assert "disk" in offloaded.hf_device_map.values() and predicted.weights_mib["disk"] > 0
    spec = inference.CellInput(prompt=cell.prompt)
    gen = inference.run(processor, offloaded, inference.prepare(processor, offloaded, spec), max_new_tokens=4)
    _, whole = _load(cell, "single", tmp_path)
    reference = inference.run(processor, whole, inference.prepare(processor, whole, spec), max_new_tokens=4)
    # Same weights, read back from disk module by module: the same greedy tokens as the model held whole.
    assert len(gen.new_token_ids) == 4 and gen.new_token_ids == reference.new_token_ids
    assert "disk" in predicted.summary and predicted.budget_devices == ["cpu"]


def test_summary_of_a_two_gpu_map():
    names = (
        ["model.visual.patch_embed.proj.weight", "model.visual.blocks.0.attn.qkv.weight"]
        + ["model.language_model.embed_tokens.weight"]
        + [f"model.language_model.layers.{i}.mlp.up_proj.weight" for i in range(28)]
        + ["model.language_model.norm.weight", "lm_head.weight"]
    )
    device_map = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": 0,
        **{f"model.language_model.layers.{i}": 0 if i < 14 else 1 for i in range(28)},
        "model.language_model.norm": 1,
        "lm_head": "disk",
    }
    assert placement_plan.summarize(device_map, names) == (
        "vision: cpu, embed_tokens: cuda:0, layers 0–13: cuda:0, 14–27: cuda:1, norm: cuda:1, lm_head: disk"
    )
    assert placement_plan.summarize({"": 0}, names) == "all: cuda:0"


def test_two_gpus_split_the_layers_and_each_gets_a_peak(tiny_cell):
    cell = dataclasses.replace(tiny_cell("qwen2_vl"), device="a10g")
    free = {0: int(0.3 * 2**20), 1: 40 * GIB, "cpu": 64 * GIB}
    predicted = placement_plan.predict_placement(cell, {"gpus": 2}, free=free)
    assert set(predicted.device_map.values()) == {0, 1} and "cuda:1" in predicted.summary
    assert predicted.budget_devices == ["cuda:0", "cuda:1"] and set(predicted.peaks_mib) == {"cuda:0", "cuda:1", "cpu"}
    total = placement_plan.predict_placement(cell, "single", free=free).weights_mib["cuda:0"]
    assert sum(predicted.weights_mib.values()) == pytest.approx(total, abs=0.2)


def test_a_cell_over_its_card_is_told_which_offload_fits(tiny_cell):
    """Qwen2-VL-7B in float16 is 15.5 GiB of weights: over a 16 GB T4 whole, under it with modules on the CPU."""
    cell = dataclasses.replace(
        tiny_cell("qwen2_vl"), source={"arch": "Qwen2-VL-7B-Instruct"}, device="t4", dtype="float16"
    )
    value, sentence = placement_plan.offload_remedy(cell)
    assert value["offload"][0] == "vision" and sentence.startswith("fits with the vision tower")
    fits = placement_plan.predict_placement(cell, value)
    assert (
        fits.peaks_mib["cuda:0"]
        <= fits.budget_mib
        < placement_plan.predict_placement(cell, "single").peaks_mib["cuda:0"]
    )
    if len(value["offload"]) > 1:  # one layer fewer on the CPU would not fit
        fewer = int(value["offload"][1].split(":")[1]) - 1
        less = {"offload": ["vision"] + ([f"layers:{fewer}"] if fewer else [])}
        assert placement_plan.predict_placement(cell, less).peaks_mib["cuda:0"] > fits.budget_mib
    assert placement_plan.offload_remedy(dataclasses.replace(cell, device="h100")) is None


# --- CUDA_VISIBLE_DEVICES per xdist worker, against the shared NVML stand-in --------------------------


@pytest.fixture
def nvml():
    """Four GPUs as NVML numbers them: H100s 0, 1 and 3, and GPU 2 in MIG mode with two MIG devices."""
    from fake_nvml import Device, FakeNvml, h100

    migs = [
        Device(uuid=f"MIG-aaaa000{n}-1111-2222-3333-444455556666", name="MIG 3g.40gb", total_mib=40000, bus_id="")
        for n in range(2)
    ]
    gpus = [h100(0), h100(1), dataclasses.replace(h100(2), migs=migs), h100(3)]
    return FakeNvml(gpus).module()


@pytest.mark.parametrize(
    ("given", "workers", "expected"),
    [
        (
            None,
            5,
            ["0", "1", "MIG-aaaa0000-1111-2222-3333-444455556666", "MIG-aaaa0001-1111-2222-3333-444455556666", "3"],
        ),
        ("3,1", 2, ["3", "1"]),
        ("GPU-00000003,GPU-00000001-1111", 2, ["GPU-00000003", "GPU-00000001-1111"]),
        ("MIG-aaaa0001,MIG-aaaa0000", 2, ["MIG-aaaa0001", "MIG-aaaa0000"]),
    ],
    ids=["unset", "indices", "gpu-uuids", "mig-uuids"],
)
def test_each_worker_gets_its_own_gpu_from_what_the_job_was_given(nvml, given, workers, expected):
    values = [visible_gpus.worker_value(given, f"gw{i}", workers, nvml) for i in range(workers)]
    assert values == expected


def test_a_job_with_fewer_gpus_than_workers_is_told_how_many_it_has(nvml):
    with pytest.raises(UserError) as err:
        visible_gpus.worker_value("1,3", "gw0", 4, nvml)
    assert "4 xdist workers" in str(err.value) and "sees 2" in str(err.value) and "-n 2" in str(err.value)
    with pytest.raises(UserError) as err:  # CUDA stops at the first entry that names no GPU
        visible_gpus.worker_value("2,7,0", "gw0", 2, nvml)
    assert "ignores '7'" in str(err.value) and "sees 1" in str(err.value)
    with pytest.raises(UserError, match="sees 0"):  # an ambiguous UUID prefix names no device
        visible_gpus.worker_value("MIG-aaaa", "gw0", 1, nvml)
    with pytest.raises(UserError, match="sees 0"):
        visible_gpus.worker_value("", "gw0", 1, nvml)


def test_without_nvml_a_given_list_is_used_as_written_and_unset_is_an_error():
    assert visible_gpus.worker_value("5,4", "gw1", 2, None) == "4"
    with pytest.raises(UserError, match="nvml extra"):
        visible_gpus.worker_value(None, "gw0", 1, None)


def test_an_architecture_offloaded_to_disk_holds_the_same_seeded_weights_as_its_single_load(tmp_path, monkeypatch):
    """`arch:` folders hold no weights, and transformers cannot disk-offload weights a checkpoint lacks: the
    folder written for such placements holds exactly what `seed_weights` gives the single load."""
    from harness.models.families import FAMILIES

    config = checkpoints.tiny_config(FAMILIES["qwen2_vl"]).to_dict()
    monkeypatch.setattr(checkpoints.architectures, "load_config", lambda name: config)
    source = {"arch": "tiny-architecture"}
    empty = checkpoints.checkpoint_for(source)
    processor, single = inference.load(
        empty,
        dtype="float32",
        attn_implementation="sdpa",
        device="cpu",
        weights_seed=checkpoints.weights_seed(source, empty),
    )
    folder = checkpoints.checkpoint_for(source, dtype="float32", with_weights=True)
    assert checkpoints.weights_seed(source, folder) is None  # the weights are in the files: nothing to re-seed
    offloaded = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, device_map="auto", max_memory={"cpu": 400_000}, offload_folder=tmp_path
    ).eval()
    assert "disk" in offloaded.hf_device_map.values()
    resident = {k: v for k, v in offloaded.state_dict().items() if v.device.type != "meta"}
    assert resident and all(torch.equal(v, single.state_dict()[k]) for k, v in resident.items())
    spec = inference.CellInput()
    on_disk = inference.run(processor, offloaded, inference.prepare(processor, offloaded, spec), max_new_tokens=4)
    whole = inference.run(processor, single, inference.prepare(processor, single, spec), max_new_tokens=4)
    assert on_disk.new_token_ids == whole.new_token_ids and len(whole.new_token_ids) == 4


def test_gpu_per_worker_gives_each_xdist_worker_its_own_entry(pytester, matrix_file, monkeypatch):
    """Through the plugin and real xdist workers: CUDA_VISIBLE_DEVICES=5,7 becomes 5 for gw0 and 7 for gw1."""
    matrix = matrix_file("models: [{tiny: qwen2_vl}]\ndevices: [cpu]\naxes: {resolution: [448x448, 512x512]}\n")
    seen = pytester.path / "seen"
    seen.mkdir()
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    pytester.makeconftest(
        "import os, pathlib\n"
        "def pytest_collection_finish(session):\n"
        "    worker = os.environ.get('PYTEST_XDIST_WORKER')\n"
        "    if worker:\n"
        f"        pathlib.Path({str(seen)!r}, worker).write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    # CPU cells whose test takes `cell` only: collected in each worker, no inference started.
    args = [
        "--compat-matrix",
        str(matrix),
        "--compat-device",
        "cpu",
        "-p",
        "no:cacheprovider",
        "--compat-gpu-per-worker",
    ]
    result = pytester.runpytest_subprocess(*args, "-n", "2")
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert {p.name: p.read_text() for p in seen.iterdir()} == {"gw0": "5", "gw1": "7"}
    short = pytester.runpytest_subprocess(*args, "-n", "3")
    assert short.ret == pytest.ExitCode.USAGE_ERROR
    assert "3 xdist workers" in short.stderr.str() and "-n 2" in short.stderr.str()


PLACED = """
models:
  - tiny: qwen2_vl
axes:
  placement: [single, {max_memory: {cpu: 0.4MiB}}, {offload: [vison]}, {gpus: 2}]
defaults:
  max_new_tokens: 4
"""


def test_a_placed_cell_runs_through_the_harness_with_its_map_peaks_and_slowdown(suite, matrix_file, monkeypatch):
    """The real path: matrix axis -> cells -> worker -> from_pretrained(device_map, max_memory, offload_folder)
    -> results.json and summary.md; a misspelt module is the matrix's error, naming the model's modules."""
    scratch = suite.path / "worker-tmp"  # the worker's temporary folders, this test's alone
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    result = suite.runpytest("--compat-matrix", str(matrix_file(PLACED)), "--compat-reports", "r")
    result.assert_outcomes(passed=2, errors=1, skipped=1)
    cells = {c["id"]: c for c in json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"]}
    single = cells["tiny-qwen2-vl-cpu-float32-sdpa-448x448"]
    disk = cells["tiny-qwen2-vl-cpu-float32-sdpa-448x448-maxmem-cpu0.4mib"]
    m = disk["measurements"]
    assert disk["placement"] == {"max_memory": {"cpu": "0.4MiB"}} and disk["single_twin"] == single["id"]
    assert "disk" in m["device_map"].values() and "disk" in m["device_map_summary"] and m["device_map_as_planned"]
    assert m["budget_devices"] == ["cpu"] and m["peaks_mib"]["cpu"] == m["peak_memory_mib"] > 0
    assert disk["prediction"]["placement"]["device_map"] == m["device_map"]
    assert disk["prediction"]["predicted_peak_mib"] == disk["prediction"]["placement"]["peaks_mib"]["cpu"]
    slowdown = disk["slowdown_vs_single"]
    assert slowdown["single"] == single["id"] and slowdown["ttft"] > 0 and slowdown["decode"] > 0
    assert slowdown["ttft"] == round(m["prefill_s"] / single["measurements"]["prefill_s"], 2)
    assert disk["output_text"] == single["output_text"]  # the same weights, read back from disk
    assert not list(scratch.glob("qwen-compat-offload-*"))  # removed with its group
    bad = cells["tiny-qwen2-vl-cpu-float32-sdpa-448x448-offload-vison"]
    assert bad["outcome"] == "error" and "model.visual, model.language_model, lm_head" in bad["message"]
    two = cells["tiny-qwen2-vl-cpu-float32-sdpa-448x448-auto-2gpu"]
    assert two["outcome"] == "skipped" and "asks for 2 GPUs, and this worker sees 0" in two["message"]
    summary = (suite.path / "r" / "cpu" / "summary.md").read_text()
    assert f"TTFT ×{slowdown['ttft']:g}" in summary and m["device_map_summary"] in summary


def test_selectors_and_capability_rules_see_the_placement(tiny_cell):
    from harness.matrix.cells import expand
    from harness.matrix.schema import Matrix
    from harness.run.disposition import disposition

    matrix = Matrix.model_validate(
        {
            "models": [{"tiny": "qwen2_vl"}],
            "devices": ["h100"],
            "axes": {"attn_implementation": ["flash_attention_2"], "placement": ["single", {"offload": ["vision"]}]},
            "expect": [{"when": {"placement": "single"}, "outcome": "xfail", "reason": "r"}],
        }
    )
    single, offloaded = expand(matrix, "m.yaml")
    assert (single.placement_id, offloaded.placement_id) == ("single", "offload-vision")
    assert single.expectation.outcome == "xfail" and offloaded.expectation.outcome == "pass"
    assert single.group != offloaded.group and single.xdist_group == offloaded.xdist_group
    assert offloaded.single_twin == single.id
    skip = disposition(offloaded, "h100")
    assert skip.outcome == "skip" and "flash-attn runs on CUDA tensors only" in skip.reason
    served = disposition(dataclasses.replace(offloaded, backend="openai"), "h100")
    assert served.outcome == "skip" and "placed by its server" in served.reason


def test_plan_prints_the_seed_articles_offload_remedy_and_advice_for_cells_over_their_card():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def plan(*args):
        command = [sys.executable, "-m", "harness.cli", "plan", *args, "--json"]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return {r["id"]: r for r in json.loads(done.stdout)}

    rows = plan("matrices/seed-article.yaml", "--device", "rtx4090")
    offloaded = rows["qwen3-vl-4b-rtx4090-float16-sdpa-1024x1024-offload-vision"]
    single = rows["qwen3-vl-4b-rtx4090-float16-sdpa-1024x1024"]
    assert offloaded["placement"]["summary"].startswith("vision: cpu, embed_tokens: cuda:0")
    assert offloaded["predicted_peak_mib"] == offloaded["placement"]["peaks_mib"]["cuda:0"]
    assert offloaded["predicted_peak_mib"] < single["predicted_peak_mib"] and offloaded["verdict"] == "fits"
    over = plan("matrices/nightly.yaml", "--device", "t4")["qwen2-vl-7b-t4-float16-sdpa-448x448"]
    assert over["verdict"] == "over" and over["offload_remedy"]["placement"]["offload"][0] == "vision"
