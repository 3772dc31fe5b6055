"""Shipped true-size architectures: parameter counts match the published ones within 1 %."""

import pytest

from harness.errors import UserError
from harness.models import architectures, checkpoints


@pytest.mark.parametrize("name", list(architectures.shipped()))
def test_true_size_parameter_count_matches_published(name):
    published = architectures.shipped()[name]["published_params"]
    counted = architectures.count_parameters(architectures.load_config(name))
    assert abs(counted / published - 1) < 0.01, f"{name}: {counted / 1e9:.3f}B vs published {published / 1e9:.2f}B"


def test_every_shipped_entry_names_its_sources():
    for name, entry in architectures.shipped().items():
        assert entry["sources"], name
        assert entry["hub_id"].endswith(name)


def test_hub_id_of_a_shipped_model_uses_the_shipped_copy():
    assert architectures.load_config("Qwen/Qwen2-VL-7B-Instruct")["hidden_size"] == 3584


def test_unshipped_name_ends_in_a_clear_message():
    with pytest.raises(UserError) as err:
        architectures.load_config("Qwen3-VL-2B-Instruct")
    assert "not shipped" in str(err.value) and "no copy of config.json was found" in str(err.value)


def test_unreachable_hub_config_ends_in_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        architectures.load_config("Qwen/Qwen3-VL-2B-Instruct")
    assert "could not be fetched" in str(err.value) and "Fix:" in str(err.value)


def test_true_size_loads_through_from_pretrained_without_allocating_weights():
    """The one loading path, on the meta device: true shapes, nothing materialised on the CPU."""
    from harness.run import inference

    folder = checkpoints.architecture_checkpoint("Qwen2-VL-2B-Instruct")
    _, model = inference.load(str(folder), dtype="bfloat16", attn_implementation="sdpa", device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == architectures.count_parameters(
        architectures.load_config("Qwen2-VL-2B-Instruct")
    )


def test_architecture_checkpoint_is_loadable_config_without_weights():
    """The folder a true-size model loads from: real config and processor, an empty weights file."""
    from transformers import AutoConfig, AutoProcessor

    folder = checkpoints.architecture_checkpoint("Qwen2-VL-2B-Instruct")
    assert (folder / "model.safetensors").stat().st_size < 1024
    assert AutoConfig.from_pretrained(folder).text_config.hidden_size == 1536
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
