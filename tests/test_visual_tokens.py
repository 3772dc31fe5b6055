"""Visual-token arithmetic agrees with transformers' own processor for any size and budget."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.matrix import inputs
from harness.models import checkpoints
from harness.models.families import FAMILIES
from harness.plan import visual_tokens


@pytest.fixture(scope="module")
def image_processors():
    from transformers import AutoProcessor

    return {
        key: AutoProcessor.from_pretrained(checkpoints.tiny_checkpoint(key)).image_processor
        for key in ("qwen2_vl", "qwen3_vl")
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["qwen2_vl", "qwen3_vl"]),
    width=st.integers(32, 1600),
    height=st.integers(32, 1600),
    min_tokens=st.integers(4, 256),
    extra_tokens=st.integers(0, 4096),
)
def test_image_tokens_match_the_processor(image_processors, family, width, height, min_tokens, extra_tokens):
    fam = FAMILIES[family]
    min_pixels = min_tokens * fam.factor**2
    max_pixels = (min_tokens + extra_tokens) * fam.factor**2
    processed = image_processors[family](
        images=[inputs.synthetic_image(width, height)],
        return_tensors="pt",
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    real = int(processed["image_grid_thw"].prod()) // fam.merge_size**2
    assert visual_tokens.image_tokens(height, width, fam.factor, min_pixels, max_pixels) == real


@pytest.mark.parametrize(
    ("family", "size", "expected"),
    [
        ("qwen2_vl", (1024, 1024), 1369),
        ("qwen3_vl", (1024, 1024), 1024),
        ("qwen2_vl", (1480, 1480), 2809),
        ("qwen3_vl", (1920, 1080), 2040),
    ],
)
def test_known_counts_from_the_probe(family, size, expected):
    fam = FAMILIES[family]
    assert visual_tokens.image_tokens(size[1], size[0], fam.factor, fam.min_pixels, fam.max_pixels) == expected


def test_max_pixels_caps_tokens():
    assert visual_tokens.image_tokens(1024, 1024, 28, 3136, 800 * 28 * 28) <= 800
