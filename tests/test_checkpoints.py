"""Tiny checkpoints of all four families load through from_pretrained and generate for real."""

import json
import multiprocessing

import pytest

from harness.errors import UserError
from harness.models import checkpoints
from harness.models.families import FAMILIES
from harness.run import inference

ALL_FAMILIES = list(FAMILIES)


@pytest.fixture(scope="module")
def loaded():
    """(family, dtype, attn) -> (processor, model), each loaded once from its saved folder."""
    cache = {}

    def get(family, dtype, attn):
        key = (family, dtype, attn)
        if key not in cache:
            cache[key] = inference.load(
                str(checkpoints.tiny_checkpoint(family)), dtype=dtype, attn_implementation=attn, device="cpu"
            )
        return cache[key]

    return get


@pytest.mark.parametrize("kind", ["image", "images", "video"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tiny_family_generates(loaded, family, dtype, attn, kind):
    processor, model = loaded(family, dtype, attn)
    assert type(model).__name__ == FAMILIES[family].model_class
    assert str(model.dtype) == f"torch.{dtype}"
    assert model.config._attn_implementation == attn
    gen = inference.run(
        processor,
        model,
        inference.prepare(processor, model, inference.CellInput(kind=kind, width=224, height=224)),
        max_new_tokens=4,
    )
    assert len(gen.new_token_ids) == 4
    assert gen.visual_tokens > 0
    assert gen.nonfinite_steps == []


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_special_tokens_agree_with_config(family):
    folder = checkpoints.tiny_checkpoint(family)
    config = json.loads((folder / "config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for token, key in [
        ("<|image_pad|>", "image_token_id"),
        ("<|video_pad|>", "video_token_id"),
        ("<|vision_start|>", "vision_start_token_id"),
        ("<|vision_end|>", "vision_end_token_id"),
    ]:
        assert tok.convert_tokens_to_ids(token) == config[key]
    for token in ("<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    assert "<|im_start|>" in tok.chat_template


def test_features_are_present():
    """The tiny configs keep what makes each family itself."""
    from transformers import AutoConfig

    q25 = AutoConfig.from_pretrained(checkpoints.tiny_checkpoint("qwen2_5_vl"))
    assert q25.vision_config.fullatt_block_indexes == [1] and q25.vision_config.depth == 2  # window + full
    q3 = AutoConfig.from_pretrained(checkpoints.tiny_checkpoint("qwen3_vl"))
    assert q3.vision_config.deepstack_visual_indexes == [0]
    moe = AutoConfig.from_pretrained(checkpoints.tiny_checkpoint("qwen3_vl_moe"))
    assert moe.text_config.num_experts == 4 and moe.text_config.num_experts_per_tok == 2
    for family in ALL_FAMILIES:
        config = AutoConfig.from_pretrained(checkpoints.tiny_checkpoint(family))
        assert config.text_config.rope_parameters["mrope_section"]


def test_second_build_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_COMPAT_CACHE", str(tmp_path))
    first = checkpoints.tiny_checkpoint("qwen2_vl")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = checkpoints.tiny_checkpoint("qwen2_vl")
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_a_changed_recipe_builds_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_COMPAT_CACHE", str(tmp_path))
    first = checkpoints.tiny_checkpoint("qwen2_vl")
    monkeypatch.setattr(checkpoints, "RECIPE_VERSION", checkpoints.RECIPE_VERSION + 1)
    assert checkpoints.tiny_checkpoint("qwen2_vl") != first


def _build_in_child(cache: str, queue) -> None:
    import os

    os.environ["QWEN_COMPAT_CACHE"] = cache
    from harness.models import checkpoints as c

    queue.put(str(c.tiny_checkpoint("qwen3_vl")))


def test_two_processes_building_at_once_agree(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    folders = {queue.get(timeout=300) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(folders) == 1
    folder = folders.pop()
    assert (tmp_path / folder.split("/")[-1] / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built leftovers


def test_flash_attention_without_the_package_is_one_clear_paragraph():
    with pytest.raises(UserError) as err:
        inference.load(
            str(checkpoints.tiny_checkpoint("qwen2_vl")),
            dtype="float32",
            attn_implementation="flash_attention_2",
            device="cpu",
        )
    text = str(err.value)
    assert "flash-attn" in text and "sdpa" in text and "eager" in text
    assert "\n" not in text


def test_fp16_overflow_variant_is_numerical_in_float16_only():
    """Scaled vision weights overflow float16 for real (inf/NaN), while float32 stays finite."""
    folder = str(checkpoints.tiny_checkpoint("qwen2_vl", "fp16-overflow"))
    spec = inference.CellInput(kind="image", width=224, height=224)
    proc, model = inference.load(folder, dtype="float32", attn_implementation="sdpa", device="cpu")
    assert inference.run(proc, model, inference.prepare(proc, model, spec), max_new_tokens=2).nonfinite_steps == []
    proc, model = inference.load(folder, dtype="float16", attn_implementation="sdpa", device="cpu")
    assert inference.run(proc, model, inference.prepare(proc, model, spec), max_new_tokens=2).nonfinite_steps != []


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_vllm_cpu_variant_keeps_the_family_with_head_size_64_and_generates(family):
    """vLLM's CPU attention takes head size 32; the variant keeps every feature of the family, its M-RoPE
    sections fill half the head as vLLM asserts, and its greedy output is no single repeated token."""
    from transformers import AutoConfig

    folder = checkpoints.tiny_checkpoint(family, "vllm-cpu")
    config = AutoConfig.from_pretrained(folder)
    text = config.text_config
    assert text.head_dim == 32 and text.num_attention_heads == 2 and text.num_key_value_heads == 1
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    default = AutoConfig.from_pretrained(checkpoints.tiny_checkpoint(family))
    assert config.vision_config.to_dict() == default.vision_config.to_dict()  # the family's own vision tower
    spec = inference.CellInput(kind="images", width=448, height=448, count=2)
    proc, model = inference.load(str(folder), dtype="float32", attn_implementation="sdpa", device="cpu")
    tokens = inference.run(proc, model, inference.prepare(proc, model, spec), max_new_tokens=8).new_token_ids
    assert len(tokens) == 8 and len(set(tokens)) > 1


def test_the_vllm_cpu_moe_has_the_published_expert_layout_and_loads_the_same_weights():
    import torch
    from safetensors import safe_open

    folder = checkpoints.tiny_checkpoint("qwen3_vl_moe", "vllm-cpu")
    config = json.loads((folder / "config.json").read_text())["text_config"]
    assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == []
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        gate_up = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
        down = f.get_slice("model.language_model.layers.0.mlp.experts.down_proj").get_shape()
    assert gate_up == [4, 64, 32] and down == [4, 16, 64]  # [experts, hidden, 2 x inter], [experts, inter, hidden]
    _, model = inference.load(str(folder), dtype="float32", attn_implementation="sdpa", device="cpu")
    experts = model.model.language_model.layers[0].mlp.experts
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        published = f.get_tensor("model.language_model.layers.0.mlp.experts.gate_up_proj")
    assert torch.equal(experts.gate_up_proj.detach(), published.transpose(1, 2))
