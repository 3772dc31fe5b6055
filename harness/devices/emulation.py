"""Emulate a smaller card on a bigger one: cap this process's usable GPU memory at its size.

The cap is the emulated card's physical memory less the CUDA context this process already holds
(`set_per_process_memory_fraction` limits the caching allocator only, never the context), as a
fraction of what CUDA reports for the real card. What emulation cannot show: register and
shared-memory limits of the emulated card (the "too many resources requested for launch" class),
its speed, and kernels it lacks.
"""

from __future__ import annotations

from harness.errors import UserError
from harness.matrix.gpus import table


def check_fits(key: str, host_name: str, host_mib: float | None) -> None:
    """Emulating a card with more memory than this one's would promise what cannot be measured here."""
    emulated = table()[key]
    if host_mib and emulated.memory_mib and emulated.memory_mib > host_mib:
        raise UserError(
            f"--compat-emulate {key} needs {emulated.memory_mib:.0f} MiB ({emulated.name}), more than this host's "
            f"{host_name} has ({host_mib:.0f} MiB).",
            key="--compat-emulate",
            fix="emulate a card with less memory than this one, or run those cells on the real card.",
        )


def cap_fraction(emulated_mib: float, cuda_total_mib: float, context_mib: float | None) -> float:
    """The allocator's share of the real card such that allocator + CUDA context = the emulated card."""
    if emulated_mib > cuda_total_mib:
        raise UserError(
            f"the emulated card's {emulated_mib:.0f} MiB exceed the {cuda_total_mib:.0f} MiB CUDA reports here.",
            key="--compat-emulate",
            fix="emulate a card with less memory than this one.",
        )
    return max(emulated_mib - (context_mib or 0.0), 0.0) / cuda_total_mib


def apply_memory_cap(key: str, context_mib: float | None) -> float:
    """Cap usable memory of GPU 0 at the emulated card's physical memory; returns the fraction applied."""
    import torch

    gpu = table()[key]
    if not torch.cuda.is_available() or not gpu.memory_mib:
        return 1.0
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    fraction = cap_fraction(gpu.memory_mib, total_mib, context_mib)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction
