"""Collection time of generated matrices: `pytest --collect-only` over 1k, 10k and 100k cells.

Prints, for each size, the time pytest reports for collection (expansion into cells, ids, markers
and parametrization) as cells per second, and the whole command's wall time (interpreter start and
imports included): once with only qwen-compat's plugin, once with the plugins the test extras add
(hypothesis, pytest-benchmark, xdist), whose import and assertion rewriting are a fixed cost.

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


if __name__ == "__main__":
    main()
