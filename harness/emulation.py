"""Emulate a smaller card on a bigger one: cap this process's usable GPU memory at its size.

What emulation cannot show: register and shared-memory limits of the emulated card (the
"too many resources requested for launch" class), its speed, and kernels it lacks.
"""

from __future__ import annotations

from .gpus import table


def apply_memory_cap(key: str) -> float:
    """Cap usable memory of GPU 0 at the emulated card's size; returns the fraction applied."""
    import torch

    gpu = table()[key]
    if not torch.cuda.is_available() or not gpu.memory_mib:
        return 1.0
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    fraction = min(1.0, gpu.memory_mib / total_mib)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction
