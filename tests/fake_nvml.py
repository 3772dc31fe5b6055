"""A stand-in for pynvml that behaves as NVML does on real hosts, including where it disappoints.

What it reproduces (sources in harness/devices/nvml.py and the tests using it):
- indices are physical: `nvmlDeviceGetHandleByIndex` ignores CUDA_VISIBLE_DEVICES and raises
  NVMLError_InvalidArgument past the count (gpuopenanalytics/pynvml#28);
- `nvmlDeviceGetHandleByUUID` wants the whole UUID (`GPU-…` or `MIG-…`) and raises NotFound otherwise;
- in a container, process pids are host pids (NVIDIA/nvidia-docker#1483), and some drivers report
  `usedGpuMemory` 0 (Project-HAMi/HAMi-core#112) or None (NVML_VALUE_NOT_AVAILABLE, e.g. MIG);
- MIG devices are reached through their parent (`nvmlDeviceGetMigDeviceHandleByIndex`), are not
  counted by `nvmlDeviceGetCount`, and cards without MIG raise NotSupported when asked; a MIG device
  leads back to its card (`nvmlDeviceGetDeviceHandleFromMigDeviceHandle`, InvalidArgument for a
  whole GPU), its memory `total` is its slice's, and a card in MIG mode shows the memory and the
  processes of all its slices;
- device memory (`used`) counts every process's memory, whatever namespace it runs in, and some that no
  listed process holds (the driver's; processes NVML does not list, e.g. under MPS or vGPU);
- a process that exits frees its memory at once and is no longer listed: "used" falls by what it held.
"""

from __future__ import annotations

import os
import threading
import types
from dataclasses import dataclass, field

MIB = 2**20


class NVMLError(Exception):
    pass


class NVMLError_NotFound(NVMLError):  # noqa: N801 (pynvml's names)
    pass


class NVMLError_InvalidArgument(NVMLError):  # noqa: N801
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


@dataclass
class Device:
    uuid: str
    name: str
    total_mib: float
    bus_id: str
    compute_capability: tuple[int, int] = (9, 0)
    other_used_mib: float = 0.0  # memory of processes that are not in `processes` (driver, other namespaces)
    processes: dict[int, float] = field(default_factory=dict)  # NVML pid -> MiB
    migs: list = field(default_factory=list)
    # How NVML reports a process's usedGpuMemory: "reported", "zero" (some container drivers) or
    # "unavailable" (None: NVML_VALUE_NOT_AVAILABLE, e.g. on MIG without privileges).
    process_memory: str = "reported"

    @property
    def used_mib(self) -> float:
        return self.other_used_mib + sum(self.processes.values()) + sum(m.used_mib for m in self.migs)

    def compute_processes(self) -> dict[int, float]:
        return {pid: mib for d in [self, *self.migs] for pid, mib in d.processes.items()}


class FakeNvml:
    """The NVML of one host: its GPUs, and a pid translation when the caller runs in a container."""

    def __init__(
        self, devices: list[Device], host_pid_offset: int = 0, driver: str = "580.65.06", driver_cuda: int = 13000
    ):
        self.devices = devices
        self.driver, self.driver_cuda = driver, driver_cuda  # nvmlSystemGetCudaDriverVersion_v2: 13000 is CUDA 13.0
        self.host_pid_offset = host_pid_offset  # 0 on bare metal; NVML shows pid + offset in a container
        self.lock = threading.Lock()

    # -- what the harness (or the test, playing torch) does to the GPU --------------------------------
    def by_uuid(self, uuid: str) -> Device:
        return next(d for d in self._all() if d.uuid == uuid)

    def use(self, uuid: str, pid: int, mib: float) -> None:
        """Process `pid` (as the process itself sees its pid) now holds `mib` on that device."""
        with self.lock:
            device = self.by_uuid(uuid)
            device.processes[pid + self.host_pid_offset] = mib

    def leave(self, uuid: str, pid: int) -> None:
        """Process `pid` exits: NVML lists it no more, and what it held is free."""
        with self.lock:
            self.by_uuid(uuid).processes.pop(pid + self.host_pid_offset, None)

    def _all(self) -> list[Device]:
        return [d for top in self.devices for d in [top, *top.migs]]

    # -- the pynvml module ---------------------------------------------------------------------------
    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = NVMLError
        mod.NVMLError_NotFound = NVMLError_NotFound
        mod.NVMLError_InvalidArgument = NVMLError_InvalidArgument
        mod.NVMLError_NotSupported = NVMLError_NotSupported
        mod.nvmlInit = lambda: None
        mod.nvmlShutdown = lambda: None
        mod.nvmlDeviceGetCount = lambda: len(self.devices)
        mod.nvmlDeviceGetHandleByIndex = self._by_index
        mod.nvmlDeviceGetHandleByUUID = self._by_uuid
        mod.nvmlDeviceGetUUID = lambda h: h.uuid
        mod.nvmlDeviceGetName = lambda h: h.name
        mod.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=h.bus_id.encode())
        mod.nvmlDeviceGetCudaComputeCapability = lambda h: h.compute_capability
        mod.nvmlDeviceGetMemoryInfo = self._memory
        mod.nvmlDeviceGetComputeRunningProcesses = self._processes
        mod.nvmlDeviceGetMaxMigDeviceCount = self._mig_count
        mod.nvmlDeviceGetMigDeviceHandleByIndex = self._mig
        mod.nvmlDeviceIsMigDeviceHandle = lambda h: int(self._parent(h) is not None)
        mod.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = self._card_of
        mod.nvmlSystemGetDriverVersion = lambda: self.driver
        mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: self.driver_cuda
        return mod

    def _by_index(self, index: int) -> Device:
        if not 0 <= index < len(self.devices):
            raise NVMLError_InvalidArgument("Invalid Argument")
        return self.devices[index]

    def _by_uuid(self, uuid) -> Device:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for device in self._all():
            if device.uuid == uuid:
                return device
        raise NVMLError_NotFound("Not Found")

    def _memory(self, handle: Device):
        with self.lock:
            used = handle.used_mib * MIB
        total = handle.total_mib * MIB
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def _processes(self, handle: Device) -> list:
        with self.lock:
            shown = {"reported": lambda mib: int(mib * MIB), "zero": lambda mib: 0, "unavailable": lambda mib: None}
            report = shown[handle.process_memory]
            listed = handle.compute_processes().items()
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=report(mib)) for pid, mib in listed]

    def _mig_count(self, handle: Device) -> int:
        if not handle.migs:
            raise NVMLError_NotSupported("Not Supported")
        return 7

    def _parent(self, handle: Device) -> Device | None:
        return next((top for top in self.devices if handle in top.migs), None)

    def _card_of(self, handle: Device) -> Device:
        card = self._parent(handle)
        if card is None:
            raise NVMLError_InvalidArgument("Invalid Argument")
        return card

    def _mig(self, handle: Device, index: int) -> Device:
        if index >= len(handle.migs):
            raise NVMLError_NotFound("Not Found")
        return handle.migs[index]


def v100_16gb(n: int) -> Device:
    """A V100 as NVML reports it (name from nvidia-smi on an SXM2 16 GB card, compute capability 7.0)."""
    return Device(
        uuid=f"GPU-{n:08x}-7777-2222-3333-44445555{n:04x}",
        name="Tesla V100-SXM2-16GB",
        total_mib=16384,
        bus_id=f"00000000:{0x1A + n:02X}:00.0",
        compute_capability=(7, 0),
        other_used_mib=0.3,
    )


def h100(n: int) -> Device:
    return Device(
        uuid=f"GPU-{n:08x}-1111-2222-3333-44445555{n:04x}",
        name="NVIDIA H100 80GB HBM3",
        total_mib=81559,
        bus_id=f"00000000:{0x18 + n:02X}:00.0",
        other_used_mib=1.0,
    )


def cuda_visible(nvml: FakeNvml, visible: str | None) -> list[Device]:
    """The devices CUDA enumerates, read from CUDA_VISIBLE_DEVICES as the CUDA driver reads it: unset,
    every GPU (a card in MIG mode shows its first slice; order as with CUDA_DEVICE_ORDER=PCI_BUS_ID);
    otherwise a comma list of ordinals or UUIDs (`GPU-…`, `MIG-…`; a unique prefix is enough), read up
    to the first entry that names no device or names one twice. An empty list is a host with no GPU."""
    if visible is None:
        return [card.migs[0] if card.migs else card for card in nvml.devices]
    chosen: list[Device] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            found = nvml.devices[int(entry)] if int(entry) < len(nvml.devices) else None
        else:
            matches = [d for d in nvml._all() if entry[:4] in ("GPU-", "MIG-") and d.uuid.startswith(entry)]
            found = matches[0] if len(matches) == 1 else None
        if found is None or found in chosen:
            break
        chosen.append(found)
    return chosen


class FakeCuda:
    """Plays torch.cuda for the trackers: the device CUDA calls 0 is whichever GPU CUDA_VISIBLE_DEVICES
    (read from this process's environment when CUDA initializes) puts first; creating the context and
    allocating show up in NVML as this process's usage. No visible device fails as CUDA does."""

    def __init__(self, nvml: FakeNvml, pid: int, context_mib: float = 500.0):
        self.nvml, self.pid, self.context_mib = nvml, pid, context_mib
        self._device: Device | None = None
        self.reserved = self.allocated = self.reserved_peak = self.allocated_peak = 0.0

    @property
    def device(self) -> Device:
        """CUDA's device 0, chosen the first time anything asks (CUDA initializes lazily)."""
        if self._device is None:
            visible = cuda_visible(self.nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if not visible:
                raise RuntimeError("CUDA error: no CUDA-capable device is detected")
            self._device = visible[0]
        return self._device

    def init(self) -> None:
        self.nvml.use(self.device.uuid, self.pid, self.context_mib)

    def identity(self):
        return self.device.uuid.removeprefix("GPU-").removeprefix("MIG-"), None  # torch's form: no prefix

    def allocate(self, mib: float) -> None:
        self.allocated += mib
        self.reserved += mib
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        self.nvml.use(self.device.uuid, self.pid, self.context_mib + self.reserved)

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def reset_peaks(self) -> None:
        self.reserved_peak, self.allocated_peak = self.reserved, self.allocated

    def reserved_mib(self) -> float:
        return self.reserved

    def name(self) -> str:
        return self.device.name

    def total_mib(self) -> float:
        return self.device.total_mib

    def peaks_mib(self):
        return self.allocated_peak, self.reserved_peak
