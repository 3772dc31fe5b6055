"""Collection and planning time of generated matrices: `pytest --collect-only` over 1k, 10k and 100k cells,
then the run's planning of the same cells in this process.

Prints, for each size, the time pytest reports for collection (expansion into cells, ids, markers
and parametrization) as cells per second, and the whole command's wall time (interpreter start and
imports included): once with only qwen-compat's plugin, once with the plugins the test extras add
(hypothesis, pytest-benchmark, xdist), whose import and assertion rewriting are a fixed cost. Then, per
size, the seconds and cells per second of each planning step: expansion, run order, load plan, the progress
line's plan of loads, and the memory plan of every cell (what `qwen-compat plan --json` computes). Linear
means the cells per second stay the same from size to size.

    python benchmarks/collection.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generated_matrix(cells: int) -> str:
    """Four tiny families x 2 dtypes x 2 attention x 5 resolutions x 2 inputs = 160, times a user axis."""
    repeat = max(1, cells // 160)
    return f"""
models: [{{tiny: qwen2_vl}}, {{tiny: qwen2_5_vl}}, {{tiny: qwen3_vl}}, {{tiny: qwen3_vl_moe}}]
devices: [cpu]
axes:
  dtype: [float32, bfloat16]
  attn_implementation: [sdpa, eager]
  resolution: [224x224, 448x448, 672x672, 896x896, 1024x1024]
  input: [image, video]
  extra:
    seed: {list(range(repeat))}
"""


ALONE = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:xdist"]


def measure(cells: int, folder: Path, extra: list[str]) -> tuple[int, float, float]:
    matrix = folder / f"m{cells}.yaml"
    matrix.write_text(generated_matrix(cells))
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(folder),
            "--compat-matrix",
            str(matrix),
            "--compat-reports",
            str(folder / "r"),
            *extra,
            str(folder / "test_suite.py"),
        ],
        capture_output=True,
        text=True,
        cwd=folder,
    )
    wall = time.perf_counter() - start
    found = re.search(r"(\d+) tests? collected in ([\d.]+)s", done.stdout)
    if not found:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    return int(found.group(1)), float(found.group(2)), wall


def planning(cells: int) -> dict[str, float]:
    """Seconds of each planning step over the generated matrix of `cells` cells."""
    import yaml

    from harness.matrix import cells as cells_mod
    from harness.matrix.schema import Matrix
    from harness.plan.loads import load_plan
    from harness.plan.memory import predict
    from harness.report.progress import Progress

    m = Matrix.model_validate(yaml.safe_load(generated_matrix(cells)))
    seconds: dict[str, float] = {}

    def step(name, work):
        start = time.perf_counter()
        out = work()
        seconds[name] = time.perf_counter() - start
        return out

    expanded = step("expand", lambda: cells_mod.expand(m, "generated.yaml"))
    ordered = step("run order", lambda: cells_mod.run_order(expanded))
    step("load plan", lambda: load_plan(ordered))
    step("progress", lambda: Progress(lambda line: None, color=False, planned=ordered))
    step("memory plan", lambda: [predict(c) for c in ordered])
    seconds["cells"] = len(expanded)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "suites" / "test_inference.py", folder / "test_suite.py")
        print(f"{'plugins':>22} {'cells':>8} {'collect s':>10} {'cells/s':>10} {'wall s':>8}")
        for size in args.sizes:
            for label, extra in (("qwen-compat alone", ALONE), ("with test extras", [])):
                n, collect_s, wall = measure(size, folder, extra)
                print(f"{label:>22} {n:>8} {collect_s:>10.2f} {n / collect_s:>10.0f} {wall:>8.2f}")
    planning(160)  # caches of configs and video token counts filled, as in any run after its first cell
    print(f"\nplanning in this process: seconds (cells/s)\n{'cells':>8}", end="")
    steps = ("expand", "run order", "load plan", "progress", "memory plan")
    print("".join(f" {name:>20}" for name in steps))
    for size in args.sizes:
        seconds = planning(size)
        n = seconds["cells"]
        print(f"{n:>8}" + "".join(f" {seconds[s]:>8.3f} ({n / seconds[s]:>9.0f})" for s in steps))


if __name__ == "__main__":
    main()
