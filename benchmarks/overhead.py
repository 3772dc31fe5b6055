"""What isolation and reporting cost: the harness against a bare transformers script, in one run.

(a) benchmarks/bare_transformers.py: one process, each tiny model loaded once, the cells run with
    transformers alone; (b) the same cells through the harness: pytest, the plugin, the isolated
    worker, measurements, verdicts and reports. Prints both wall times (each a fresh process, so
    each pays the ~5 s import of torch and transformers once), their ratio b / a, the model loads
    of each, the overhead per cell in ms, and the ratio of the CPU seconds both sides' processes used
    (the harness's own work, whatever the machine's neighbours did to the wall clock).

    python benchmarks/overhead.py [--repeat N] [--select SUBSTRING] [--matrix matrices/default.yaml]

This machine is shared and noisy (one run of each side has given ratios from 0.98 to 1.30), so
with --repeat N the two sides alternate N times, in turns a b, b a, a b, ... (so that neither side is always
the second of its pair): the figure is the median of the N pairs' ratios (a pair's two runs, a minute apart,
see the same machine), printed beside the ratio of each side's best time. Each harness run starts from a
fresh reports folder.

By default every CPU cell of the default matrix runs. pytest runs with only qwen-compat's plugin (`-p no:`
for every other installed pytest plugin: the test extras' and their dependencies'), as after README command
(1). Both sides find the tiny checkpoints built and the project's bytecode compiled, as any run after the
first does (where PYTHONDONTWRITEBYTECODE is set, no run would write it, and each would compile the
harness's modules again).
"""

from __future__ import annotations

import argparse
import compileall
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Timing(NamedTuple):
    wall: float
    cpu: float  # user + system seconds of the command's processes (the worker's included)
    stdout: str


def timed(cmd: list[str], cwd: Path) -> Timing:
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Timing(wall, cpu, done.stdout)


def compile_bytecode() -> None:
    """The harness's and the benchmarks' bytecode, written once before either side is timed."""
    for folder in ("harness", "benchmarks"):
        compileall.compile_dir(REPO / folder, quiet=1)


def other_plugins() -> list[str]:
    """`-p no:NAME` for every installed pytest plugin but qwen-compat's."""
    names = sorted({ep.name for ep in entry_points(group="pytest11")} - {"qwen_compat"})
    return [arg for name in names for arg in ("-p", f"no:{name}")]


def bare_command(matrix: str, select: str = "") -> list[str]:
    """The run of side (a): the bare transformers script over the matrix's CPU cells (those matching `select`)."""
    return [sys.executable, str(REPO / "benchmarks" / "bare_transformers.py"), matrix, select]


def harness_command(matrix: str, *pytest_args: str) -> list[str]:
    """The harness run of side (b): pytest in the folder holding test_suite.py, with only qwen-compat's plugin."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "test_suite.py",
        "-q",
        "-p",
        "no:cacheprovider",
        *other_plugins(),
        "--rootdir",
        ".",
        "--compat-matrix",
        matrix,
        *pytest_args,
        "--compat-reports",
        "r",
    ]


def _runs(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(REPO / "matrices" / "default.yaml"))
    parser.add_argument("--select", default="", help="only cells whose id contains this (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="alternate the two sides N times (default 3)")
    args = parser.parse_args()
    from harness.models import checkpoints
    from harness.models.families import FAMILIES

    for family in FAMILIES:  # both sides find the checkpoints built: neither pays for building them
        checkpoints.tiny_checkpoint(family)
    compile_bytecode()
    select = ["-k", args.select] if args.select else []
    bare_runs, harness_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "suites" / "test_inference.py", folder / "test_suite.py")

        def run_bare():
            bare_runs.append(timed(bare_command(args.matrix, args.select), folder))

        def run_harness():
            shutil.rmtree(folder / "r", ignore_errors=True)  # each harness run starts a fresh reports folder
            harness_runs.append(timed(harness_command(args.matrix, *select), folder))

        for pair in range(args.repeat):
            for side in (run_bare, run_harness)[:: 1 if pair % 2 == 0 else -1]:  # a b, b a, a b, ...
                side()
        run = json.loads((folder / "r" / "cpu" / "run.json").read_text())
    bare = json.loads(bare_runs[-1].stdout.strip().splitlines()[-1])
    bare_times, harness_times = [t.wall for t in bare_runs], [t.wall for t in harness_runs]
    cpu_ratios = [b.cpu / a.cpu for a, b in zip(bare_runs, harness_runs, strict=True)]
    cells = bare["cells"]
    assert cells == run["cells"], (cells, run["cells"])
    best_bare, best_harness = min(bare_times), min(harness_times)
    print(f"cells: {cells}" + (f" (ids containing '{args.select}')" if args.select else " (every CPU cell)"))
    loads = bare["model_loads"]
    print(f"(a) bare transformers script: {best_bare:6.2f} s (runs: {_runs(bare_times)}), model loads {loads}")
    print(
        f"(b) qwen-compat harness:      {best_harness:6.2f} s (runs: {_runs(harness_times)}), model loads "
        f"{run['model_loads']}, worker starts {run['worker_starts']}"
    )
    ratios = [b / a for a, b in zip(bare_times, harness_times, strict=True)]
    print(
        f"ratio b / a: {statistics.median(ratios):.3f} (median of {len(ratios)} pairs: {_runs(ratios, 3)}; bests: "
        f"{best_harness / best_bare:.3f}); overhead per cell: {(best_harness - best_bare) / cells * 1000:.0f} ms"
    )
    print(f"CPU seconds b / a: {statistics.median(cpu_ratios):.3f} (median of the pairs: {_runs(cpu_ratios, 3)})")


if __name__ == "__main__":
    main()
