"""Memory measurement inside the worker, each number labelled with its source, all in MiB.

GPU: torch's allocator peaks (allocated, reserved; reset per cell) and NVML's view of this process
(which includes the CUDA context), sampled by a side thread every 5 ms so a short peak is not
missed. CPU: the worker's peak resident memory as the kernel keeps it (VmHWM, reset per cell), or
sampled the same way where the kernel cannot reset it. One metric is named as the one
budgets are checked against (`peak_memory_source`); the others are reported beside it.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

MIB = 2**20
SAMPLE_INTERVAL_S = 0.005


class _Sampler:
    """Polls `read()` on a side thread and keeps the maximum."""

    def __init__(self, read):
        self.read, self.peak = read, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self):
        self.peak = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _nvml_process_reader(device_index: int):
    """A function returning this process's device memory per NVML (MiB), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:
        return None
    pid = os.getpid()

    def read() -> float:
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return 0.0
        return sum((p.usedGpuMemory or 0) for p in procs if p.pid == pid) / MIB

    return read


def settle(device: str, timeout_s: float = 5.0) -> float:
    """Wait until memory the previous cell left stops moving; returns it (MiB).

    Tensors are freed by reference counting when a cell ends; a full `gc.collect()` costs ~0.25 s
    with torch loaded, so it runs only when a model is released (`_Worker.release`), not per cell.
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        last, deadline = -1.0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = torch.cuda.memory_reserved() / MIB
            if abs(now - last) < 1.0:
                return now
            last = now
            time.sleep(0.05)
        return last
    return psutil.Process().memory_info().rss / MIB


def _reset_peak_rss() -> bool:
    """Reset the kernel's own peak-RSS counter (VmHWM) for this process; False where unsupported.

    Linux keeps the high-water mark exactly, with no sampling and no thread competing with the
    cell for the GIL; writing 5 to /proc/self/clear_refs restarts it at the current RSS.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


class MemoryTracker:
    """Context manager measuring one cell's peak memory on `device` ("cpu" or "cuda[:N]")."""

    def __init__(self, device: str):
        self.device = device
        self.result: dict = {}

    def __enter__(self):
        self.baseline_mib = settle(self.device)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
            reader = _nvml_process_reader(torch.cuda.current_device())
            self._sampler = _Sampler(reader) if reader else None
        elif _reset_peak_rss():
            self._sampler = None  # the kernel keeps the peak: see _reset_peak_rss
        else:
            process = psutil.Process()
            self._sampler = _Sampler(lambda: process.memory_info().rss / MIB)
        if self._sampler:
            self._sampler.__enter__()
        return self

    def __exit__(self, *exc):
        if self._sampler:
            self._sampler.__exit__(*exc)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            allocated = torch.cuda.max_memory_allocated() / MIB
            reserved = torch.cuda.max_memory_reserved() / MIB
            self.result = {
                "torch_allocated_peak_mib": round(allocated, 1),
                "torch_reserved_peak_mib": round(reserved, 1),
            }
            if self._sampler:
                self.result.update(
                    nvml_process_peak_mib=round(self._sampler.peak, 1),
                    peak_memory_mib=round(self._sampler.peak, 1),
                    peak_memory_source="nvml_process",
                )
            else:
                self.result.update(peak_memory_mib=round(reserved, 1), peak_memory_source="torch_reserved")
        else:
            peak = self._sampler.peak if self._sampler else _peak_rss_mib()
            self.result = {
                "rss_peak_mib": round(peak, 1),
                "peak_memory_mib": round(peak, 1),
                "peak_memory_source": "worker_rss",
            }
        self.result["settled_before_mib"] = round(self.baseline_mib, 1)
        return False
