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


@pytest.mark.parametrize("name", list(architectures.shipped()))
def test_every_shipped_architectures_prompt_carries_its_image_and_video_tokens(name):
    """ba93f90 mapped <|image_pad|> to 268 for Qwen2.5-VL-3B/72B and Qwen3-VL-4B (configs without a text
    vocab_size): a 448x448 prompt carried 0 image tokens. No weights are loaded here."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    config = architectures.load_config(name)
    text = config.get("text_config") or {}
    processor = AutoProcessor.from_pretrained(checkpoints.architecture_checkpoint(name))
    tokenizer = processor.tokenizer
    for key, token in checkpoints.CONFIG_TOKENS.items():
        if config.get(key, text.get(key)) is not None:
            assert tokenizer.convert_tokens_to_ids(token) == config.get(key, text.get(key)), (name, key)
    eos = config.get("eos_token_id", text.get("eos_token_id"))
    if eos is not None:
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    video = np.zeros((4, 224, 224, 3), dtype=np.uint8)
    out = processor(
        text=[prompt],
        images=[Image.new("RGB", (448, 448))],
        videos=[video],
        return_tensors="np",
        do_sample_frames=False,
    )
    ids = out["input_ids"][0].tolist()
    image_id = config.get("image_token_id", text.get("image_token_id"))
    video_id = config.get("video_token_id", text.get("video_token_id")) or tokenizer.convert_tokens_to_ids(
        "<|video_pad|>"
    )
    merge = 2 * 2
    assert ids.count(image_id) == int(np.prod(out["image_grid_thw"][0])) // merge > 0, name
    assert ids.count(video_id) == int(np.prod(out["video_grid_thw"][0])) // merge > 0, name
