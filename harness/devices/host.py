"""Where cells run: identify the host's accelerator without importing torch in the pytest process.

NVML first (no CUDA context is created), then torch in a short-lived subprocess as a fallback,
and `cpu` when there is no GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.devices import nvml as nvml_mod
from harness.errors import UserError
from harness.matrix.gpus import Gpu, match_nvml_name, split_mig_name, table


@dataclass
class Host:
    key: str  # a GPU table key, "cpu", or "unknown"
    name: str
    compute_capability: str | None = None
    memory_mib: float | None = None
    driver: str | None = None
    cuda: str | None = None
    via: str = "none"
    emulated_on: str | None = None  # set when --compat-emulate applies another card's rules here
    mig: str | None = (
        None  # the MIG profile ("1g.10gb") when the device is a slice of the card; memory_mib is the slice's
    )

    @property
    def gpu(self) -> Gpu | None:
        return table().get(self.key)


def _nvml_host() -> Host | None:
    """The first GPU CUDA will see, found through NVML the way CUDA reads CUDA_VISIBLE_DEVICES
    (indices, GPU-/MIG- UUIDs); the CPU when that variable names no GPU of this host."""
    pynvml = nvml_mod.load()
    if pynvml is None:
        return None
    try:
        visible = nvml_mod.visible_handles(pynvml)
        if not visible:
            spec = os.environ.get("CUDA_VISIBLE_DEVICES")
            warnings.warn(
                f"qwen-compat: CUDA_VISIBLE_DEVICES={spec!r} names no GPU of this host (NVML sees "
                f"{pynvml.nvmlDeviceGetCount()}); CUDA will see none, so this host runs as the CPU.",
                stacklevel=2,
            )
            return Host(key="cpu", name="cpu", via=f"CUDA_VISIBLE_DEVICES={spec!r} names no GPU")
        handle = visible[0]
        card = nvml_mod.mig_parent(pynvml, handle) or handle  # a MIG device's facts but its memory are its card's
        name = _device_name(
            nvml_mod.text(pynvml.nvmlDeviceGetName(handle)), nvml_mod.text(pynvml.nvmlDeviceGetName(card))
        )
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(card)
        memory = nvml_mod.total_mib(pynvml, handle)
        driver = nvml_mod.text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return _host_from(name, f"{major}.{minor}", memory, driver, f"{cuda // 1000}.{cuda % 1000 // 10}", "nvml")
    finally:
        pynvml.nvmlShutdown()


def _device_name(own: str, card: str) -> str:
    """CUDA's form of a device's name, "<card> MIG <profile>" for a MIG device, whichever form NVML gave (some
    drivers name a MIG device "MIG 1g.10gb" alone)."""
    _, profile = split_mig_name(own)
    if profile is None or own == card:
        return own
    return f"{split_mig_name(card)[0]} MIG {profile}"


_TORCH_PROBE = (
    "import json, torch\n"
    "if torch.cuda.is_available():\n"
    "    p = torch.cuda.get_device_properties(0)\n"
    "    print(json.dumps([p.name, f'{p.major}.{p.minor}', p.total_memory / 2**20, torch.version.cuda]))\n"
    "else:\n    print('null')\n"
)


def _torch_host() -> Host | None:
    """Ask torch in a child process, so this process never initialises CUDA."""
    try:
        out = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120)
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:
        return None
    if not found:
        return None
    name, cc, memory, cuda = found
    return _host_from(name, cc, memory, None, cuda, "torch")


def _host_from(name, cc, memory_mib, driver, cuda, via) -> Host:
    gpu = match_nvml_name(name)
    card, mig = split_mig_name(name)
    if gpu is None:
        slice_of = f" (a MIG {mig} slice)" if mig else ""
        pattern = re.escape(card).replace("\\ ", " ")  # the whole name, matched as a regular expression
        whole = (round(memory_mib / 1024), f"{memory_mib:.0f}")
        sold, physical = ("<the card's>", "<the whole card's, with MIG off>") if mig else whole
        warnings.warn(
            f"qwen-compat: this GPU is not in the GPU table: NVML name '{name}'{slice_of}, compute capability {cc}, "
            f"{memory_mib:.0f} MiB. Cells for known cards are skipped here. To add it, add one row to "
            f"harness/data/gpus.yaml:\n<key>:\n  name: {card}\n  nvml_names: ['{pattern}']\n"
            f'  compute_capability: "{cc}"\n  memory_gb: {sold}\n'
            f"  physical_mib: {physical}\n  physical_mib_source: <an nvidia-smi printout>\n"
            f"  native_bf16: {str(float(cc) >= 8.0).lower()}\n  flash_attn_2: {str(float(cc) >= 8.0).lower()}\n"
            f"  source: <datasheet url>",
            stacklevel=2,
        )
    return Host(
        key=gpu.key if gpu else "unknown",
        name=name,
        compute_capability=cc,
        memory_mib=memory_mib,
        driver=driver,
        cuda=cuda,
        via=via,
        mig=mig,
    )


def _has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def detect_host() -> Host:
    """The host's first visible GPU (honouring CUDA_VISIBLE_DEVICES), or the CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return cpu_host()
    host = _nvml_host() or (_torch_host() if _has_nvidia_driver() else None)
    return host or cpu_host()


def cpu_host() -> Host:
    return Host(key="cpu", name="cpu", via="no GPU found")


def resolve(value: str, option: str = "--compat-device") -> Host:
    """The host for a device option: `auto` detects, a table key is taken as given."""
    if value == "auto":
        return detect_host()
    if value not in table():
        from difflib import get_close_matches

        close = get_close_matches(value, table(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"{option} '{value}' is not in the GPU table.",
            key=option,
            fix=f"{hint}use 'auto' or one of {', '.join(table())}.",
        )
    gpu = table()[value]
    return Host(
        key=gpu.key, name=gpu.name, compute_capability=gpu.compute_capability, memory_mib=gpu.memory_mib, via=option
    )
