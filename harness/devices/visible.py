"""Which GPU each pytest-xdist worker drives under `--compat-gpu-per-worker`, from what CUDA_VISIBLE_DEVICES
already holds.

CUDA reads the variable as a list of indices, `GPU-<uuid>` or `MIG-<uuid>` names and stops at the first entry
that names no device (harness/devices/nvml.py reads it the same way); unset, every GPU is visible. A worker's value is
always one entry of the list the job was given — never a GPU outside it — and only an unset variable is
expanded, from NVML: one entry per physical GPU, or per MIG device of a GPU in MIG mode.
"""

from __future__ import annotations

from harness.devices import nvml as nvml_mod
from harness.errors import UserError


def _entries(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",")] if value.strip() else []


def visible(value: str | None, nvml) -> list[str]:
    """The devices CUDA will see, as CUDA_VISIBLE_DEVICES entries; `nvml` is None where NVML is not there (then a
    given list is taken as written, and an unset variable cannot be expanded)."""
    if value is not None:
        entries = _entries(value)
        return entries if nvml is None else entries[: len(nvml_mod.visible_handles(nvml, value))]
    if nvml is None:
        raise UserError(
            "--compat-gpu-per-worker needs to know this host's GPUs, and CUDA_VISIBLE_DEVICES is unset and NVML is not "
            "installed.",
            key="--compat-gpu-per-worker",
            fix="install the nvml extra (`pip install 'qwen-compat[nvml]'`), or set CUDA_VISIBLE_DEVICES to the "
            "GPUs this job may use (indices or GPU-/MIG- UUIDs).",
        )
    out = []
    for index in range(nvml.nvmlDeviceGetCount()):
        migs = nvml_mod.mig_handles(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
        out += [nvml_mod.uuid_of(nvml, mig) for mig in migs] or [str(index)]
    return out


def worker_value(current: str | None, worker_id: str, worker_count: int, nvml) -> str:
    """CUDA_VISIBLE_DEVICES for xdist worker `worker_id` ("gw3") of `worker_count`: its own entry of what the job
    was given. Fewer visible GPUs than workers is a one-paragraph error, never two workers on one GPU."""
    devices = visible(current, nvml)
    if len(devices) < worker_count:
        given = "unset (every GPU of this host)" if current is None else repr(current)
        entries = _entries(current or "")
        ignored = (
            f"; CUDA ignores '{entries[len(devices)]}' and every entry after it, as it names no GPU here"
            if len(devices) < len(entries)
            else ""
        )
        first = (
            f"run with -n {len(devices)} or fewer" if devices else "run on a GPU host, or drop --compat-gpu-per-worker"
        )
        raise UserError(
            f"--compat-gpu-per-worker gives each of the {worker_count} xdist workers its own GPU, and this job sees "
            f"{len(devices)}: CUDA_VISIBLE_DEVICES is {given}{ignored}.",
            key="--compat-gpu-per-worker",
            fix=f"{first}, or give the job more GPUs (through CUDA_VISIBLE_DEVICES or the scheduler).",
        )
    return devices[int(worker_id.removeprefix("gw"))]
