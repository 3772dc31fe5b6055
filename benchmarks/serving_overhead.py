"""What the openai backend costs: the harness against a bare client loop, same server, same requests.

One `transformers serve` (tiny Qwen2-VL, float32, CPU) is launched once by the harness's backend.
(a) a bare loop with the `openai` client: for each cell, its images encoded as PNG data URLs, one
    streamed greedy chat completion, the stream read to its end;
(b) the harness: `OpenAIBackend.run(cell)` on the same server: the same request built from the
    cell, the stream timed (time to first token, decode rate, usage), visual tokens counted, the
    server's peak memory reset and read, a record made.
The two sides alternate cell by cell, --repeat times over the cells; each side's figure is the sum
over cells of its best time for that cell (this machine is shared and noisy: a loop's total swings
by 30 % from one pass to the next). Prints both, the ratio b / a (target <= 1.05) and the overhead
per cell in ms.

    python benchmarks/serving_overhead.py [--repeat N] [--tokens N]
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from harness.matrix import inputs
from harness.matrix.cells import expand
from harness.matrix.schema import Matrix
from harness.run.backends.openai.group import OpenAIBackend, Target


def cells(tokens: int):
    matrix = Matrix.model_validate(
        {
            "models": [{"tiny": "qwen2_vl"}],
            "axes": {"resolution": ["224x224", "448x448", "1024x1024"], "input": ["image", "images"]},
            "defaults": {"max_new_tokens": tokens},
        }
    )
    return expand(matrix, "benchmark")


def bare_request(client: OpenAI, model: str, cell) -> float:
    start = time.perf_counter()
    count = cell.images if cell.input == "images" else 1
    parts = []
    for i in range(count):
        buffer = io.BytesIO()
        inputs.synthetic_image(cell.width, cell.height, seed=i).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": cell.prompt}]}],
        max_tokens=cell.max_new_tokens,
        temperature=0,
        seed=0,
        stream=True,
    )
    for _ in stream:
        pass
    return time.perf_counter() - start


def harness_request(backend: OpenAIBackend, cell) -> float:
    start = time.perf_counter()
    backend.run(cell)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="passes over the cells; each cell's best time counts")
    parser.add_argument("--tokens", type=int, default=16, help="max new tokens per cell")
    args = parser.parse_args()
    chosen = cells(args.tokens)
    with tempfile.TemporaryDirectory() as logs:
        backend = OpenAIBackend(Target(launch="transformers-serve"), Path(logs))
        try:
            backend.start(chosen[0])
            client = OpenAI(base_url=f"{backend.server.url}/v1", api_key="unused")
            model = backend.client.model()
            bare_request(client, model, chosen[0])  # both sides find the server warm,
            harness_request(backend, chosen[0])  # and the harness its model's tokenizer loaded
            bare = {c.id: [] for c in chosen}
            harness = {c.id: [] for c in chosen}
            for _ in range(args.repeat):
                for cell in chosen:
                    bare[cell.id].append(bare_request(client, model, cell))
                    harness[cell.id].append(harness_request(backend, cell))
        finally:
            backend.stop()
    a, b = sum(min(t) for t in bare.values()), sum(min(t) for t in harness.values())
    loops_a = [sum(t[i] for t in bare.values()) for i in range(args.repeat)]
    loops_b = [sum(t[i] for t in harness.values()) for i in range(args.repeat)]
    print(f"server: transformers serve, tiny Qwen2-VL, float32, CPU; {len(chosen)} cells of {args.tokens} new tokens")
    print(f"(a) bare openai client loop:    {a:6.3f} s (passes: {', '.join(f'{t:.3f}' for t in loops_a)})")
    print(f"(b) qwen-compat openai backend: {b:6.3f} s (passes: {', '.join(f'{t:.3f}' for t in loops_b)})")
    print(f"ratio b / a: {b / a:.3f}; overhead per cell: {(b - a) / len(chosen) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
