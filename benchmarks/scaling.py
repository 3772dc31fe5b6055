"""Run time against cell count: 1, 10, 100 and 1,000 tiny cells through the harness and through the bare
transformers script, each line fitted, so that a per-cell cost that grows with the run (a file rewritten per
cell, a list walked per cell) shows as a rising slope.

Cells: one tiny Qwen2-VL, a 56x56 image (4 visual tokens), one new token, a user axis `case` repeated N times;
as cheap as a real cell gets, so the harness's own share is as large as it gets. For each size the two sides run
one after the other, each a fresh process (its fixed cost: interpreter, imports, worker start, one load). Prints
each run's wall time, the least-squares line T = fixed + slope x cells of each side, the slope between each pair
of neighbouring sizes, and the harness's slope minus the bare script's: its own cost per cell.

    python benchmarks/scaling.py [--sizes 1 10 100 1000] [--repeat 1]

On a shared machine the figures are noisy: --repeat N alternates the sides N times per size and keeps the best.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from overhead import REPO, bare_command, compile_bytecode, harness_command, timed

MATRIX = """
models: [{{tiny: qwen2_vl}}]
devices: [cpu]
axes:
  resolution: [56x56]
  extra: {{case: {cases}}}
defaults: {{max_new_tokens: 1}}
"""


def fit(sizes: list[int], times: list[float]) -> tuple[float, float]:
    """(fixed, slope) of the least-squares line through (size, time)."""
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(times) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, times, strict=True)) / sum(
        (x - mean_x) ** 2 for x in sizes
    )
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two sides N times per size; keep the best")
    args = parser.parse_args()
    from harness.models.checkpoints import tiny_checkpoint

    tiny_checkpoint("qwen2_vl")  # built before either side is timed
    compile_bytecode()
    bare, harness = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "suites" / "test_inference.py", folder / "test_suite.py")
        for size in args.sizes:
            matrix = folder / f"m{size}.yaml"
            matrix.write_text(MATRIX.format(cases=list(range(size))))
            for _ in range(args.repeat):
                bare_run = timed(bare_command(str(matrix)), folder)
                assert json.loads(bare_run.stdout.strip().splitlines()[-1])["cells"] == size
                bare_s, harness_s = bare_run.wall, timed(harness_command(str(matrix)), folder).wall
                assert json.loads((folder / "r" / "cpu" / "run.json").read_text())["cells"] == size
                bare[size] = min(bare.get(size, bare_s), bare_s)
                harness[size] = min(harness.get(size, harness_s), harness_s)
            print(f"{size:>6} cells: bare {bare[size]:8.2f} s   harness {harness[size]:8.2f} s", flush=True)
    sizes = sorted(bare)
    print(f"\n{'':>24} {'fixed s':>8} {'slope ms/cell':>14}   slope between sizes (ms/cell)")
    slopes = {}
    for label, times in (("(a) bare transformers", bare), ("(b) qwen-compat harness", harness)):
        fixed, slope = fit(sizes, [times[s] for s in sizes])
        slopes[label] = slope
        between = ", ".join(
            f"{a}->{b}: {(times[b] - times[a]) / (b - a) * 1000:.1f}" for a, b in zip(sizes, sizes[1:], strict=False)
        )
        print(f"{label:>24} {fixed:>8.2f} {slope * 1000:>14.1f}   {between}")
    own = (slopes["(b) qwen-compat harness"] - slopes["(a) bare transformers"]) * 1000
    print(f"\nthe harness's own cost per cell (slope b - slope a): {own:.1f} ms")


if __name__ == "__main__":
    main()
