"""The four Qwen-VL families as plain data: classes (by name), patch geometry, processor defaults.

Kept free of torch/transformers imports so the pytest process can read it at collection time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from harness.errors import UserError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Family:
    key: str  # transformers model_type, also the pytest marker
    config_class: str
    model_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int
    merge_size: int = 2
    temporal_patch_size: int = 2
    # Processor pixel budget defaults (areas in pixels), as the public preprocessor configs ship them.
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: list[float] = field(default_factory=lambda: CLIP_MEAN)
    image_std: list[float] = field(default_factory=lambda: CLIP_STD)

    @property
    def factor(self) -> int:
        """Pixels per merged visual token along one side (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size


_QWEN2_VL = Family(
    "qwen2_vl",
    "Qwen2VLConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLProcessor",
    "Qwen2VLVideoProcessor",
    patch_size=14,
)
# Qwen3-VL: patch 16, mean/std 0.5 and the pixel budget its published preprocessor configs ship.
_QWEN3_VL = Family(
    "qwen3_vl",
    "Qwen3VLConfig",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLProcessor",
    "Qwen3VLVideoProcessor",
    patch_size=16,
    min_pixels=65536,
    max_pixels=16777216,
    image_mean=[0.5] * 3,
    image_std=[0.5] * 3,
)

FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        _QWEN2_VL,
        replace(
            _QWEN2_VL,
            key="qwen2_5_vl",
            config_class="Qwen2_5_VLConfig",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
        ),
        _QWEN3_VL,
        replace(
            _QWEN3_VL,
            key="qwen3_vl_moe",
            config_class="Qwen3VLMoeConfig",
            model_class="Qwen3VLMoeForConditionalGeneration",
        ),
    )
}


def get_family(key: str, *, file: str | None = None) -> Family:
    try:
        return FAMILIES[key]
    except KeyError:
        raise UserError(
            f"unknown model family '{key}'.", file=file, key="family", fix=f"use one of {', '.join(FAMILIES)}."
        ) from None
