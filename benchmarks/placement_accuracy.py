"""How well the placement planner predicts a true-size cell whose modules go to disk, run through the harness.

A Qwen2-VL-2B-Instruct `arch:` model in float32 (8.2 GiB of weights) on the CPU, twice: `single`, and with
`max_memory: {cpu: CAP}` below its weights so accelerate sends the rest to disk. Both cells run through
pytest, the plugin and the isolated worker; this script then reads results.json and prints, per cell, the
resolved device map, whether it is the map the planner predicted, the predicted and measured host peaks
(the worker's resident high-water mark) and the error, and the slowdown against `single`.

    flock /work/bigmodel.lock python benchmarks/placement_accuracy.py [--cap 6GiB] [--max-new-tokens 4]

It loads a true-size model: on a shared machine, run it under the big-model lock. The first run writes the
model's seeded float32 weights to the checkpoint cache (8.2 GiB on disk, once) for the disk offload.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MATRIX = """
models:
  - arch: {arch}
devices: [cpu]
axes:
  dtype: [float32]
  resolution: [{resolution}]
  placement: [single, {{max_memory: {{cpu: {cap}}}}}]
defaults:
  max_new_tokens: {max_new_tokens}
  repeats: {repeats}
  degenerate_check: false  # random true-size weights repeat one token; this measures memory and time
  timeout_s: 3600
  load_timeout_s: 3600
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="Qwen2-VL-2B-Instruct")
    parser.add_argument(
        "--cap", default="6GiB", help="max_memory for the CPU; below the weights, the rest goes to disk"
    )
    parser.add_argument("--resolution", default="448x448")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell after a warm-up (the median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "suites" / "test_inference.py", folder / "test_suite.py")
        (folder / "matrix.yaml").write_text(MATRIX.format(**vars(args)))
        command = [sys.executable, "-m", "pytest", "test_suite.py", "-p", "no:cacheprovider", "--rootdir", "."]
        command += ["--matrix", "matrix.yaml", "--reports", "reports", "-q"]
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        results = folder / "reports" / "cpu" / "results.json"
        if not results.exists():
            raise SystemExit(f"the harness wrote no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        cells = json.loads(results.read_text())["cells"]
    print(
        f"{args.arch} float32 on the CPU, {args.resolution}, {args.max_new_tokens} new tokens, median of "
        f"{args.repeats} timed runs; cap cpu {args.cap}"
    )
    for cell in cells:
        m, p = cell.get("measurements") or {}, cell.get("prediction") or {}
        print(f"\n{cell['id']}: {cell['outcome']} {cell.get('message') or ''}".rstrip())
        if not m:
            continue
        predicted, measured = p.get("predicted_peak_mib"), m.get("peak_memory_mib")
        if predicted and measured:
            error = (predicted - measured) / measured
            print(f"  host peak: predicted {predicted:.0f} MiB, measured {measured:.0f} MiB, error {error:+.1%}")
        if m.get("device_map_summary"):
            print(f"  map: {m['device_map_summary']} (as planned: {m['device_map_as_planned']})")
            print(f"  weights per device (MiB): {p.get('placement', {}).get('weights_mib')}")
        print(
            f"  load {m.get('load_s')} s, TTFT {m.get('prefill_s')} s, decode {m.get('decode_tokens_per_s')} tokens/s"
        )
        if cell.get("slowdown_vs_single"):
            s = cell["slowdown_vs_single"]
            print(f"  slowdown against single: TTFT x{s.get('ttft')}, decode x{s.get('decode')}")


if __name__ == "__main__":
    main()
