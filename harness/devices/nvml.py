"""NVML as the harness reads it: which physical GPU a CUDA device is, and what is used on it.

NVML indexes physical GPUs and ignores `CUDA_VISIBLE_DEVICES`, while CUDA (and torch) index the
visible ones (gpuopenanalytics/pynvml#28); inside a container NVML reports host pids, not the
container's (NVIDIA/nvidia-docker#1483: the driver has no pid-namespace support). So a device is
matched by UUID (or PCI bus id), never by index, and a process's own usage is one method among
several (see measurements.py).
"""

from __future__ import annotations

import os


def load():
    """The initialised pynvml module, or None where NVML (package or driver) is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None


def text(value) -> str:
    """NVML strings are bytes in older pynvml releases and str in newer ones."""
    return value.decode() if isinstance(value, bytes) else value


def mig_handles(nvml, handle) -> list:
    """The MIG devices of a physical GPU in MIG mode; [] for any other GPU."""
    try:
        slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except Exception:  # NVMLError_NotSupported: no MIG on this card
        slots = 0
    found = []
    for slot in range(slots):
        try:
            found.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
        except Exception:  # NVMLError_NotFound: an empty slot
            continue
    return found


def mig_parent(nvml, handle):
    """The physical GPU of a MIG device; None for a whole GPU (or an NVML without MIG)."""
    try:
        if nvml.nvmlDeviceIsMigDeviceHandle(handle):
            return nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    except Exception:  # NVMLError_NotSupported, FunctionNotFound on old drivers
        pass
    return None


def all_handles(nvml) -> list:
    """Every physical GPU, and every MIG device on a GPU in MIG mode."""
    handles = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        handles += [handle, *mig_handles(nvml, handle)]
    return handles


def _by_uuid_prefix(nvml, prefix: str):
    """CUDA accepts any unique prefix of a UUID in CUDA_VISIBLE_DEVICES; NVML wants it whole."""
    matches = [h for h in all_handles(nvml) if text(nvml.nvmlDeviceGetUUID(h)).startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def visible_handles(nvml, spec: str | None = None) -> list:
    """NVML handles of the GPUs CUDA makes visible, in CUDA's order, for a CUDA_VISIBLE_DEVICES value.

    As CUDA reads it: unset means every GPU; entries are indices, `GPU-<uuid>` (a unique prefix is
    enough) or `MIG-<uuid>`; the list ends at the first entry that names no device, so `5` on a
    two-GPU host makes no GPU visible.
    """
    spec = os.environ.get("CUDA_VISIBLE_DEVICES") if spec is None else spec
    count = nvml.nvmlDeviceGetCount()
    if spec is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit():
            handle = nvml.nvmlDeviceGetHandleByIndex(int(entry)) if int(entry) < count else None
        elif entry.startswith(("GPU-", "MIG-")):
            handle = _by_uuid_prefix(nvml, entry)
        else:
            handle = None
        if handle is None:
            break
        handles.append(handle)
    return handles


def _named(nvml, uuid: str | None, pci_bus_id: str | None):
    if uuid:
        bare = uuid.removeprefix("GPU-").removeprefix("MIG-")
        for candidate in (f"GPU-{bare}", f"MIG-{bare}"):
            try:
                return nvml.nvmlDeviceGetHandleByUUID(candidate)
            except Exception:  # NVMLError_NotFound
                continue
    if pci_bus_id:
        for handle in all_handles(nvml):
            try:
                if text(nvml.nvmlDeviceGetPciInfo(handle).busId).lower().endswith(pci_bus_id.lower()):
                    return handle
            except Exception:
                continue
    return None


def handle_for(nvml, uuid: str | None, pci_bus_id: str | None = None):
    """The NVML handle of the device torch knows by this UUID (torch's form has no `GPU-`/`MIG-`
    prefix) or, failing that, by its PCI bus id; None when neither names a device.

    On a GPU in MIG mode CUDA computes on one of its MIG devices, while some CUDA versions give the
    GPU's own UUID (and the PCI bus id is the GPU's): the MIG device is then the one of that GPU that
    CUDA_VISIBLE_DEVICES names, or its only one; None where that is not one device.
    """
    handle = _named(nvml, uuid, pci_bus_id)
    migs = mig_handles(nvml, handle) if handle is not None else []
    if not migs:
        return handle
    ids = {uuid_of(nvml, m) for m in migs}
    chosen = [h for h in visible_handles(nvml) if uuid_of(nvml, h) in ids] or migs
    return chosen[0] if len(chosen) == 1 else None


def used_mib(nvml, handle) -> float:
    return nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def total_mib(nvml, handle) -> float:
    """The device's memory: a MIG device's is its slice's, not its card's."""
    return nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20


def uuid_of(nvml, handle) -> str:
    return text(nvml.nvmlDeviceGetUUID(handle))


def quiet_used_mib(nvml, handle) -> float | None:
    """The device's used memory where no process computes on it now, else None: a process there may leave,
    and what it held, counted as "before", would make a later delta too small by that much."""
    try:
        if nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            return None
    except Exception:  # NVMLError_NotSupported: nobody can say who computes there
        return None
    return used_mib(nvml, handle)
