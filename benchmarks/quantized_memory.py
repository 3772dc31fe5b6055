"""How well the planner predicts a quantized true-size model's weights: predicted against held, side by side.

An `arch:` model (default Qwen2-VL-2B-Instruct) in each format, quantized at load from its seeded weights through
transformers' own quantizers, each in a fresh process (a process that loaded another model keeps the freed memory
resident). Per format it prints the planner's weight bytes, what the loaded model's tensors hold (every storage
once, quantization scales included: harness.devices.memory.held_bytes), the error, and the process's resident
growth over the load with its peak over one generated token (what loading leaves behind, beside the tensors).

    flock /work/bigmodel.lock python benchmarks/quantized_memory.py [--arch Qwen2-VL-2B-Instruct]
        [--dtype bfloat16] [--formats none bnb-int8 bnb-nf4 torchao-int8]

The first run writes the model's seeded weights in the dtype to the checkpoint cache (4.4 GiB for the 2B model in
bfloat16, once). It loads a true-size model: on a shared machine, run it under the big-model lock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_FORMAT = """
import json, resource, sys, psutil
import torch
from harness.devices.memory import held_bytes
from harness.matrix import cells, schema
from harness.models.checkpoints import checkpoint_for, weights_seed
from harness.plan.memory import predict
from harness.run import inference
from harness.run.backends.transformers import _quantized_folder

arch, dtype, value = sys.argv[1:4]
matrix = schema.Matrix.model_validate(
    {"models": [{"arch": arch}], "axes": {"dtype": [dtype], "quantization": [value], "resolution": ["224x224"]}}
)
cell = cells.expand(matrix, "benchmark")[0]
quantized = value != "none"
folder = checkpoint_for(cell.source, dtype=dtype, with_weights=quantized)
folder, kwargs = _quantized_folder(cell, folder) if quantized else (folder, {})
before = psutil.Process().memory_info().rss
processor, model = inference.load(
    folder, dtype=dtype, attn_implementation="sdpa", device="cpu", source=cell.source,
    weights_seed=weights_seed(cell.source, folder), quantization_kwargs=kwargs,
)
loaded = psutil.Process().memory_info().rss
held = held_bytes(model)
inference.run(processor, model, inference.prepare(processor, model, inference.CellInput(width=224, height=224)),
              max_new_tokens=1)
held = max(held, held_bytes(model))
print(json.dumps({
    "value": value,
    "predicted_mib": predict(cell).parts["weights_mib"],
    "held_mib": held / 2**20,
    "rss_growth_at_load_mib": (loaded - before) / 2**20,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="Qwen2-VL-2B-Instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--formats", nargs="+", default=["none", "bnb-int8", "bnb-nf4", "torchao-int8"])
    args = parser.parse_args()
    rows = []
    for value in args.formats:
        done = subprocess.run(
            [sys.executable, "-c", ONE_FORMAT, args.arch, args.dtype, value],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if done.returncode != 0:
            print(f"{value}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.arch} in {args.dtype} on the CPU (MiB = 2**20 bytes)")
    print(f"{'format':<14}{'predicted':>11}{'held':>11}{'error':>9}{'RSS growth':>12}{'peak RSS':>10}")
    for r in rows:
        error = (r["predicted_mib"] - r["held_mib"]) / r["held_mib"] * 100
        print(
            f"{r['value']:<14}{r['predicted_mib']:>11.1f}{r['held_mib']:>11.1f}{error:>8.2f}%"
            f"{r['rss_growth_at_load_mib']:>12.0f}{r['peak_rss_mib']:>10.0f}"
        )


if __name__ == "__main__":
    main()
