"""What one full garbage collection costs in a worker, before and after it freezes its imports' objects.

The worker imports torch, transformers and the harness (a few hundred thousand objects that live as long
as the process), then calls gc.freeze() so that the collector's full passes (a few in a run of the default
matrix) no longer walk them. Prints the median of --repeat full collections each way, in one process.

    python benchmarks/worker_gc.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time


def _full_collection_s(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch  # noqa: F401  (what the worker imports before it says ready)
    import transformers  # noqa: F401

    import harness.run.backends.transformers  # noqa: F401
    import harness.run.worker  # noqa: F401

    before = _full_collection_s(args.repeat)
    gc.freeze()
    frozen = gc.get_freeze_count()
    after = _full_collection_s(args.repeat)
    print(f"full collection, imports tracked: {before * 1000:.2f} ms")
    print(f"full collection, imports frozen:  {after * 1000:.2f} ms ({frozen} objects frozen)")
    print(f"ratio frozen / tracked: {after / before:.3f}")


if __name__ == "__main__":
    main()
