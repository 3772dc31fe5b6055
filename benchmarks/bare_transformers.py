"""The baseline for benchmarks/overhead.py: the same cells with transformers alone, in one process.

Each model is loaded once per dtype (its attention switched with set_attn_implementation between cells, as the
harness does); each cell is chat template -> processor -> greedy generate, as a user's own script would do it.
Prints one JSON line: cells run and models loaded.

    python benchmarks/bare_transformers.py MATRIX SUBSTRING
"""

import json
import sys

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from harness.matrix import cells, inputs
from harness.matrix import schema as matrix
from harness.models import checkpoints

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(matrix_path: str, substring: str) -> None:
    chosen = [
        c
        for c in cells.run_order(cells.expand(matrix.load(matrix_path), matrix_path))
        if c.device == "cpu" and substring in c.id
    ]
    loaded, loads = None, 0
    for cell in chosen:
        if loaded is None or loaded[0] != cell.group:
            folder = checkpoints.checkpoint_for(cell.source)
            model = AutoModelForImageTextToText.from_pretrained(
                folder, dtype=DTYPES[cell.dtype], attn_implementation=cell.attn_implementation
            )
            loaded, loads = (cell.group, AutoProcessor.from_pretrained(folder), model.eval()), loads + 1
        _, processor, model = loaded
        if model.config._attn_implementation != cell.attn_implementation:
            model.set_attn_implementation(cell.attn_implementation)
        part = {"type": "video"} if cell.input == "video" else {"type": "image"}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": cell.prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        size = {
            "shortest_edge": cell.min_pixels or processor.image_processor.size["shortest_edge"],
            "longest_edge": cell.max_pixels or processor.image_processor.size["longest_edge"],
        }
        if cell.input == "video":
            frames = inputs.synthetic_video(cell.width, cell.height)
            meta = {"fps": 2.0, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
            kwargs = {"videos": [frames], "videos_kwargs": {"do_sample_frames": False, "video_metadata": [meta]}}
            if cell.max_pixels:
                kwargs["videos_kwargs"]["size"] = size
        else:
            kwargs = {"images": [inputs.synthetic_image(cell.width, cell.height)], "images_kwargs": {"size": size}}
        batch = processor(text=[text], return_tensors="pt", **kwargs)
        with torch.inference_mode():
            model.generate(
                **batch, max_new_tokens=cell.max_new_tokens, min_new_tokens=cell.max_new_tokens, do_sample=False
            )
    print(json.dumps({"cells": len(chosen), "model_loads": loads}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
