"""Seeding throughput: `seed_parameter` (the counter-based hash every `arch:` load fills its weights with)
against `torch.rand` filling the same tensor on the same device, in values per second.

Each figure is the best of --repeat fills of one --values-element parameter; the two sides alternate, so a
machine shared with other jobs slows both alike. On the CPU each thread count given is measured; on a GPU
(where there is one) the device is synchronised before each clock reading.

    python benchmarks/seeding.py [--values 50000000] [--repeat 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.models.weights import seed_parameter


def _best(fill, param: torch.Tensor, repeat: int) -> float:
    """Values per second of the fastest of `repeat` fills."""
    best = float("inf")
    for _ in range(repeat):
        if param.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fill(param)
        if param.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return param.numel() / best


def _seed(param: torch.Tensor) -> None:
    seed_parameter(param, "benchmark", "model.language_model.layers.0.mlp.down_proj.weight", std=0.02, norm=False)


def _rand(param: torch.Tensor) -> None:
    param.copy_(torch.rand(param.shape, device=param.device))  # drawn in float32, cast as seeding casts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=50_000_000, help="elements of the filled parameter")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to measure")
    args = parser.parse_args()
    runs = [("cpu", n) for n in args.threads] + ([("cuda", None)] if torch.cuda.is_available() else [])
    print(f"{args.values:,} values per fill, best of {args.repeat}")
    print(f"{'device':>24} {'dtype':>9} {'seeding values/s':>17} {'torch.rand values/s':>20} {'ratio':>6}")
    for device, threads in runs:
        if threads:
            torch.set_num_threads(threads)
        label = f"cpu, {threads} threads" if threads else torch.cuda.get_device_name()
        for dtype in (torch.float32, torch.bfloat16):
            param = torch.empty(args.values, dtype=dtype, device=device)
            _seed(param)  # warm-up: kernels loaded, memory touched
            _rand(param)
            seeding, rand = 0.0, 0.0
            for _ in range(args.repeat):  # alternated, one fill at a time
                seeding = max(seeding, _best(_seed, param, 1))
                rand = max(rand, _best(_rand, param, 1))
            name = str(dtype).removeprefix("torch.")
            print(f"{label:>24} {name:>9} {seeding:>17.3e} {rand:>20.3e} {seeding / rand:>6.2f}")
            del param


if __name__ == "__main__":
    main()
