"""True-size (empty-weights) models are one model every time, and drift compares like with like.

The folders here hold a tiny config and an empty weights file, exactly what `arch:` builds from a
shipped true-size config, so every load goes through the same seeding as a 2B model does.
"""

import pytest
import torch

from harness.judge import drift as health
from harness.models import checkpoints, weights
from harness.models.families import FAMILIES
from harness.run import inference


@pytest.fixture(scope="module")
def empty_folders():
    return {
        family: str(
            checkpoints.empty_weights_checkpoint(
                f"test-empty-{family}", checkpoints.tiny_config(FAMILIES[family]).to_dict()
            )
        )
        for family in FAMILIES
    }


def _weights(folder: str, dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    source = {"path": folder, "seed": seed}
    _, model = inference.load(
        folder,
        source=source,
        dtype=dtype,
        attn_implementation="sdpa",
        device="cpu",
        weights_seed=checkpoints.weights_seed(source, folder),
    )
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_loads_are_the_same_model_and_reduced_dtypes_are_its_cast(empty_folders, family):
    folder = empty_folders[family]
    first, second = _weights(folder, "float32"), _weights(folder, "float32")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(t.std() > 0 for t in first.values())  # real random weights, not a constant
    for dtype in ("bfloat16", "float16"):
        reduced = _weights(folder, dtype)
        cast = {name: t.to(inference.DTYPES[dtype]) for name, t in first.items()}
        assert all(torch.equal(reduced[name], cast[name]) for name in first), dtype


def _splitmix64_code(key: int, index: int) -> int:
    """The reference: splitmix64's mix in Python's unbounded integers, cut to 64 bits by hand; the top 24 bits."""
    mask = (1 << 64) - 1
    z = (key + index * weights.GOLDEN) & mask
    z = ((z ^ (z >> 30)) * weights.MIX_1) & mask
    z = ((z ^ (z >> 27)) * weights.MIX_2) & mask
    return (z ^ (z >> 31)) >> (64 - weights.CODE_BITS)


def test_seeded_values_are_exact_integer_arithmetic():
    """torch's int64 ops wrap and shift as the unsigned reference does, also past 2**32 and 2**63 elements' products."""
    key = weights.parameter_key("identity", "model.layers.0.mlp.down_proj.weight")
    for start in (0, 1, 2**31 - 3, 2**40 + 5):
        codes = weights.uniform_codes(key, start, 4, "cpu").tolist()
        assert codes == [_splitmix64_code(key, start + i) for i in range(4)], start
    values = weights.uniform_values(key, 0, 5, 0.5, "cpu")
    step = 0.5 / 2**23  # a power of two: the value is the code's exactly
    assert values.tolist() == [(_splitmix64_code(key, i) - 2**23) * step for i in range(5)]


def _seeded(shape, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    param = torch.empty(shape, dtype=dtype, device=device)
    weights.seed_parameter(param, "identity", "model.visual.blocks.0.attn.qkv.weight", std=0.02, norm=False)
    return param.cpu()


def test_seeded_values_do_not_depend_on_thread_count_or_chunking(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _seeded((600, 1000))
        torch.set_num_threads(2)
        two = _seeded((600, 1000))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    monkeypatch.setitem(weights.CHUNK, "cpu", 4096)
    assert torch.equal(one, _seeded((600, 1000)))
    half_width = 0.02 * 3**0.5
    assert -half_width <= one.min() and one.max() < half_width
    assert one.mean().abs() < 1e-4 and abs(one.std() - 0.02) < 1e-4
    assert torch.equal(_seeded((600, 1000), dtype=torch.bfloat16), one.bfloat16())  # the cast of float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here to compare the CPU with")
def test_a_gpu_computes_the_cpus_values():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(_seeded((3000, 2000), device="cuda", dtype=dtype), _seeded((3000, 2000), dtype=dtype))


def test_another_seed_is_another_model(empty_folders):
    folder = empty_folders["qwen2_vl"]
    a, b = _weights(folder, "float32", seed=0), _weights(folder, "float32", seed=1)
    name = next(n for n, t in a.items() if t.ndim == 2)
    assert not torch.equal(a[name], b[name])


def test_a_stale_reference_from_another_model_is_never_used(tiny_cell, tmp_path):
    """Run 1 saved float32 logits for seed 0; a bfloat16 cell of the seed-1 model must not compare with them."""
    cell32 = tiny_cell(dtype="float32")
    cell16 = tiny_cell(dtype="bfloat16", id=cell32.id.replace("float32", "bfloat16"))
    logits = torch.randn(320)
    seed0 = health.reference_key(cell32, {"source": {"path": "/m", "seed": 0}})
    health.drift(cell32, logits, tmp_path, seed0)
    seed1 = health.reference_key(cell16, {"source": {"path": "/m", "seed": 1}})
    assert health.drift(cell16, logits, tmp_path, seed1) == {"drift": health.NO_TWIN}
    same = health.reference_key(cell16, {"source": {"path": "/m", "seed": 0}})
    assert same == seed0  # the twin's key ignores the dtype only
    assert health.drift(cell16, logits.bfloat16().float(), tmp_path, same)["drift_topk_agree"]


def test_a_flipped_first_token_within_each_others_top_k_agrees(tiny_cell, tmp_path):
    cell32, cell16 = tiny_cell(dtype="float32"), tiny_cell(dtype="bfloat16")
    reference = torch.zeros(100)
    reference[[7, 8]] = torch.tensor([5.0, 4.999])
    health.drift(cell32, reference, tmp_path, "k")
    flipped = reference.clone()
    flipped[8] = 5.001  # rounding flips the top-1
    found = health.drift(cell16, flipped, tmp_path, "k")
    assert not found["drift_top1_agree"] and found["drift_topk_agree"]
    assert found["drift_relative_diff"] == pytest.approx(0.002 / 5, abs=1e-5)  # relative to the logits' scale
    far = torch.zeros(100)
    far[50] = 5.0  # a token outside the reference's top-5, and the reference's outside ours
    assert not health.drift(cell16, far, tmp_path, "k")["drift_topk_agree"]


def test_a_run_compares_its_own_float32_twin_and_says_when_it_has_none(suite, matrix_file, empty_folders):
    import json

    folder = empty_folders["qwen2_5_vl"]
    pair = f"""
    models: [{{path: {folder}, family: qwen2_5_vl, id: empty25}}]
    axes: {{dtype: [float32, bfloat16], resolution: [224x224]}}
    defaults: {{max_new_tokens: 3, degenerate_check: false}}  # drift is checked; random weights may repeat a token
    """
    assert suite.runpytest("--compat-matrix", str(matrix_file(pair)), "--compat-reports", "r").ret == 0
    cells = json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"]
    reduced = next(c for c in cells if c["dtype"] == "bfloat16")
    assert reduced["measurements"]["drift"] == "measured" and reduced["outcome"] == "passed"
    alone = pair.replace("[float32, bfloat16]", "[bfloat16]").replace("id: empty25", "id: empty25, seed: 3")
    assert suite.runpytest("--compat-matrix", str(matrix_file(alone, "alone.yaml")), "--compat-reports", "r").ret == 0
    cells = json.loads((suite.path / "r" / "cpu" / "results.json").read_text())["cells"]
    assert cells[0]["measurements"]["drift"] == health.NO_TWIN
