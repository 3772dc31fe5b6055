"""Host detection and per-process GPU memory through NVML, checked against a stand-in NVML module."""

import os
import sys
import types
from types import SimpleNamespace

import pytest

from harness import device, measurements


@pytest.fixture
def fake_nvml(monkeypatch):
    """A pynvml stand-in: one H100 running this process (700 MiB) and another one (5 GiB)."""
    mod = types.ModuleType("pynvml")
    procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=700 * 2**20), SimpleNamespace(pid=1, usedGpuMemory=5 << 30)]
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    mod.nvmlDeviceGetName = lambda handle: b"NVIDIA H100 80GB HBM3"
    mod.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    mod.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(total=81559 * 2**20)
    mod.nvmlSystemGetDriverVersion = lambda: "580.65"
    mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    mod.nvmlDeviceGetComputeRunningProcesses = lambda handle: procs
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod


def test_auto_detects_the_card_through_nvml(fake_nvml, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    host = device.detect_host()
    assert (host.key, host.compute_capability, host.driver, host.cuda, host.via) == (
        "h100",
        "9.0",
        "580.65",
        "13.0",
        "nvml",
    )
    assert round(host.memory_mib) == 81559


def test_cuda_visible_devices_picks_the_nvml_index(fake_nvml, monkeypatch):
    seen = []
    fake_nvml.nvmlDeviceGetHandleByIndex = lambda index: seen.append(index) or f"gpu{index}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    device.detect_host()
    assert seen == [3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device.detect_host().key == "cpu"


def test_without_nvml_or_driver_the_host_is_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(device, "_has_nvidia_driver", lambda: False)
    assert device.detect_host().key == "cpu"


def test_nvml_process_memory_counts_only_this_process(fake_nvml):
    read = measurements._nvml_process_reader(0)
    assert read() == 700.0


def test_sampler_keeps_the_peak_between_reads():
    values = iter([10.0, 50.0, 20.0] + [5.0] * 10_000)
    with measurements._Sampler(lambda: next(values)) as sampler:
        import time

        time.sleep(0.05)
    assert sampler.peak == 50.0


def test_unknown_device_option_suggests_the_key():
    from harness.errors import UserError

    with pytest.raises(UserError) as err:
        device.resolve("h10")
    assert "did you mean 'h100'" in str(err.value)


def test_cpu_peak_memory_is_reset_for_each_cell():
    import numpy as np

    with measurements.MemoryTracker("cpu") as big:
        block = np.ones(200 * 2**20 // 8)
        del block
    with measurements.MemoryTracker("cpu") as small:
        pass
    assert big.result["peak_memory_mib"] - big.result["settled_before_mib"] > 150
    assert small.result["peak_memory_mib"] - small.result["settled_before_mib"] < 50
    assert small.result["peak_memory_source"] == "worker_rss"
