"""Memory measurement inside the worker, each number labelled with its source, all in MiB.

GPU: torch's allocator peaks (allocated, reserved; reset per cell) beside the peak budgets are
checked against, `peak_memory_mib`, taken by the first method that works here:
1. `nvml_process`: NVML's usage of this worker's pid (which includes the CUDA context), sampled
   every 5 ms. Inside a container NVML reports host pids, so the pid is often not there.
2. `nvml_device_delta`: the device's used memory minus what others hold on it. "Others" is read
   just before the worker creates its CUDA context, and only on a device where no process computes
   then (a process that leaves later would make the delta too small); it is re-checked at the start
   of every cell (the device's use now, less this worker's context and reserved memory) and the
   smaller figure kept. Valid only while the worker is the one compute process on the GPU (checked
   at every sample).
3. `torch_reserved_plus_context`: the allocator's reserved peak plus the CUDA context, measured
   once when the worker created it.
4. `torch_reserved`: without NVML; says that the CUDA context is not included.
No NVML figure below the allocator's own reserved peak is believed (memory that left the device
mid-cell would make it too small): the next method is taken, with a note saying why.
A peak that no method measured is `None` with the reason in `peak_memory_unmeasured`, never 0.
CPU: the worker's peak resident memory as the kernel keeps it (VmHWM, reset per cell), or sampled
where the kernel cannot reset it.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

from harness.devices import nvml as nvml_mod
from harness.matrix.gpus import split_mig_name

MIB = 2**20
SAMPLE_INTERVAL_S = 0.005


class _Sampler:
    """Polls `read()` on a side thread and keeps the maximum; a read returning None ends the method
    (it no longer measures what it claims), and `failed` says so."""

    def __init__(self, read):
        self.read, self.peak, self.failed = read, 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self) -> None:
        if self.failed:
            return
        value = self.read()
        if value is None:
            self.failed = True
        else:
            self.peak = max(self.peak, value)

    def _loop(self):
        while not self._stop.is_set():
            self._take()
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self):
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take()


class TorchCuda:
    """The few torch.cuda facts the trackers need, behind one seam (tests stand in for it)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def init(self) -> None:
        """Create this process's CUDA context (the first kernel-free call that needs one)."""
        self.cuda.init()
        self.cuda.synchronize()

    def identity(self) -> tuple[str | None, str | None]:
        """(UUID, PCI bus id) of the current device, as NVML can find it."""
        props = self.cuda.get_device_properties(self.cuda.current_device())
        uuid = str(props.uuid) if getattr(props, "uuid", None) else None
        bus = getattr(props, "pci_bus_id", None)
        pci = f"{props.pci_domain_id:04x}:{bus:02x}:{props.pci_device_id:02x}.0" if bus is not None else None
        return uuid, pci

    def synchronize(self) -> None:
        self.cuda.synchronize()

    def empty_cache(self) -> None:
        self.cuda.empty_cache()

    def reset_peaks(self) -> None:
        self.cuda.reset_peak_memory_stats()

    def reserved_mib(self) -> float:
        return self.cuda.memory_reserved() / MIB

    def name(self) -> str:
        """CUDA's name of the current device ("NVIDIA A100-SXM4-80GB MIG 1g.10gb" on a MIG slice)."""
        return self.cuda.get_device_name(self.cuda.current_device())

    def total_mib(self) -> float:
        return self.cuda.get_device_properties(self.cuda.current_device()).total_memory / MIB

    def peaks_mib(self) -> tuple[float, float]:
        """(allocated, reserved) peaks since the last reset."""
        return self.cuda.max_memory_allocated() / MIB, self.cuda.max_memory_reserved() / MIB


class GpuMemory:
    """One worker's view of its GPU's memory: what others hold on the device is read just before the
    worker's CUDA context exists, and re-checked per cell."""

    def __init__(self, nvml=None, pid: int | None = None):
        self.nvml = nvml_mod.load() if nvml is None else nvml
        self.pid = os.getpid() if pid is None else pid
        self.handle = None
        self.context_mib: float | None = None
        self.used_before: dict[str, float] = {}  # device uuid -> MiB others held, where no process computed
        self.why_not = "nvidia-ml-py (NVML) is not installed or finds no driver"

    def attach(self, cuda: TorchCuda) -> None:
        """Find the NVML device that torch's current device is and measure the CUDA context on it."""
        if self.nvml:
            # the last moment before this worker's context exists; devices where a process computes have none
            quiet = {
                nvml_mod.uuid_of(self.nvml, h): nvml_mod.quiet_used_mib(self.nvml, h)
                for h in nvml_mod.all_handles(self.nvml)
            }
            self.used_before = {uuid: used for uuid, used in quiet.items() if used is not None}
        cuda.init()
        if not self.nvml:
            return
        uuid, pci = cuda.identity()
        self.handle = nvml_mod.handle_for(self.nvml, uuid, pci)
        if self.handle is None:
            self.why_not = f"NVML has no device with torch's UUID {uuid} or PCI bus id {pci}"
            return
        before = self.used_before.get(nvml_mod.uuid_of(self.nvml, self.handle))
        if before is None:
            self.why_not = "another process computed on the device when this worker started"
        elif self._alone():
            self.context_mib = max(nvml_mod.used_mib(self.nvml, self.handle) - before - cuda.reserved_mib(), 0.0)

    def _processes(self) -> list:
        return list(self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle))

    def _alone(self) -> bool:
        """Exactly one compute process on the device: this worker, whatever pid NVML shows for it."""
        try:
            return len(self._processes()) == 1
        except Exception:
            return False

    def _own_usage(self) -> float | None:
        try:
            mine = [p.usedGpuMemory for p in self._processes() if p.pid == self.pid]
        except Exception:
            return None
        # usedGpuMemory is None where NVML cannot tell (NVML_VALUE_NOT_AVAILABLE) and 0 in some
        # containers; no process with a CUDA context uses 0 bytes.
        if not mine or any(not used for used in mine):
            return None
        return sum(mine) / MIB

    def _others_now(self, cuda: TorchCuda) -> float | None:
        """What others hold on the device as a cell starts: at most what they held before this worker, less
        what left since (the device's use now, less this worker's context and reserved memory); None where
        the delta does not apply."""
        before = self.used_before.get(nvml_mod.uuid_of(self.nvml, self.handle))
        if before is None or not self._alone():
            return None
        if self.context_mib is None:
            return before
        return min(before, nvml_mod.used_mib(self.nvml, self.handle) - self.context_mib - cuda.reserved_mib())

    def _device_delta(self, others_mib: float) -> float | None:
        if not self._alone():
            return None
        return nvml_mod.used_mib(self.nvml, self.handle) - others_mib

    def device_memory_mib(self, cuda: TorchCuda) -> float | None:
        """The memory of the device this worker computes on, which a percentage budget is of: NVML's total of
        it (a MIG slice's own, not its card's), or CUDA's for a MIG slice NVML cannot show; None for a whole
        card NVML cannot show (the GPU table's figure for it holds)."""
        if self.handle is not None:
            return nvml_mod.total_mib(self.nvml, self.handle)
        return cuda.total_mib() if split_mig_name(cuda.name())[1] else None

    def methods(self, cuda: TorchCuda) -> list[tuple[str, object]]:
        """The NVML methods that apply to the cell about to run, best first: (name, reader)."""
        if self.handle is None:
            return []
        found = []
        if self._own_usage() is not None:
            found.append(("nvml_process", self._own_usage))
        others = self._others_now(cuda)
        if others is not None:
            found.append(("nvml_device_delta", lambda: self._device_delta(others)))
        return found


def settle(device: str, cuda: TorchCuda | None = None, timeout_s: float = 5.0) -> float:
    """Wait until memory the previous cell left stops moving; returns it (MiB).

    Tensors are freed by reference counting when a cell ends; a full `gc.collect()` costs ~0.25 s
    with torch loaded, so it runs only when a model is released, not per cell.
    """
    if device.startswith("cuda"):
        cuda.synchronize()
        cuda.empty_cache()
        last, deadline = -1.0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = cuda.reserved_mib()
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

    def __init__(self, device: str, gpu: GpuMemory | None = None, cuda: TorchCuda | None = None):
        self.device = device
        self.gpu, self.cuda = gpu, cuda
        self.result: dict = {}
        self._samplers: list[tuple[str, _Sampler]] = []
        self._sampler: _Sampler | None = None

    def __enter__(self):
        on_gpu = self.device.startswith("cuda")
        self.baseline_mib = settle(self.device, self.cuda)
        if on_gpu:
            self.cuda.reset_peaks()
            self._samplers = [
                (name, _Sampler(read)) for name, read in (self.gpu.methods(self.cuda) if self.gpu else [])
            ]
        elif not _reset_peak_rss():  # else the kernel keeps the peak: see _reset_peak_rss
            process = psutil.Process()
            self._sampler = _Sampler(lambda: process.memory_info().rss / MIB)
        for sampler in [s for _, s in self._samplers] + [self._sampler]:
            if sampler:
                sampler.__enter__()
        return self

    def __exit__(self, *exc):
        for sampler in [s for _, s in self._samplers] + [self._sampler]:
            if sampler:
                sampler.__exit__(*exc)
        if self.device.startswith("cuda"):
            self.result = self._gpu_result()
        else:
            peak = self._sampler.peak if self._sampler else _peak_rss_mib()
            self.result = {"rss_peak_mib": round(peak, 1), "peak_memory_mib": round(peak, 1)}
            self.result["peak_memory_source"] = "worker_rss"
        self.result["settled_before_mib"] = round(self.baseline_mib, 1)
        return False

    def _gpu_result(self) -> dict:
        self.cuda.synchronize()
        allocated, reserved = self.cuda.peaks_mib()
        result = {"torch_allocated_peak_mib": round(allocated, 1), "torch_reserved_peak_mib": round(reserved, 1)}
        for name, sampler in self._samplers:
            if not sampler.failed and sampler.peak > 0:
                result.update({f"{name}_peak_mib": round(sampler.peak, 1)})
        measured = [(name, s.peak) for name, s in self._samplers if not s.failed and s.peak > 0]
        below = [(name, peak) for name, peak in measured if peak < reserved]
        measured = [(name, peak) for name, peak in measured if peak >= reserved]
        context = self.gpu.context_mib if self.gpu else None
        if measured:
            source, peak = measured[0]
        elif context is not None:
            source, peak = "torch_reserved_plus_context", reserved + context
            result["cuda_context_mib"] = round(context, 1)
        else:
            why = self.gpu.why_not if self.gpu else "no NVML view of this device"
            source, peak = "torch_reserved", reserved
            result["peak_memory_note"] = f"the CUDA context is not included: {why}"
        if peak > 0:
            result.update(peak_memory_mib=round(peak, 1), peak_memory_source=source)
        else:
            result.update(
                peak_memory_mib=None,
                peak_memory_source=None,
                peak_memory_unmeasured=f"every method read 0 MiB ({source} last), which no CUDA process uses",
            )
        if below:
            name, low = below[0]
            doubt = (
                f"{name} read {low:.0f} MiB, below the allocator's own reserved peak of {reserved:.0f} MiB, and is not "
                "believed (memory that left the device during the cell makes a device figure too small)"
            )
            result["peak_memory_note"] = "; ".join(filter(None, (doubt, result.get("peak_memory_note"))))
        elif self._samplers and measured and measured[0][0] != self._samplers[0][0]:
            result["peak_memory_note"] = f"{self._samplers[0][0]} stopped measuring during the cell"
        return result


class DevicePeaks:
    """Peaks on every device a placed model uses, each labelled, beside MemoryTracker's budget peak.

    The host's resident memory (VmHWM, reset per cell: offloaded weights live there) and, for each GPU
    besides the current one (whose peak MemoryTracker takes), the allocator's reserved peak plus the
    CUDA context measured on the first GPU.
    """

    def __init__(self, other_gpus: list[int], context_mib: float | None):
        self.other_gpus, self.context_mib = other_gpus, context_mib or 0.0
        self.result: dict = {}

    def __enter__(self):
        _reset_peak_rss()
        if self.other_gpus:
            import torch

            for index in self.other_gpus:
                torch.cuda.reset_peak_memory_stats(index)
        return self

    def __exit__(self, *exc):
        self.result = {"cpu": round(_peak_rss_mib(), 1)}
        if self.other_gpus:
            import torch

            for index in self.other_gpus:
                reserved = torch.cuda.max_memory_reserved(index) / MIB
                self.result[f"cuda:{index}"] = round(reserved + self.context_mib, 1)
        return False


def held_bytes(model) -> int:
    """Bytes a loaded model's tensors hold, whatever their format: every storage once (tied weights), the inner
    tensors of torchao's tensor subclasses, bitsandbytes' scales (SCB) and 4-bit code books and absmax. What the
    planner's weight bytes are checked against: a process's resident memory also counts what loading left behind."""
    seen: set[tuple[int, int]] = set()

    def add(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            return sum(add(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    total = 0
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        total += add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += add(state.absmax) + add(state.code)
        if getattr(tensor, "SCB", None) is not None:
            total += add(tensor.SCB)
    return total
