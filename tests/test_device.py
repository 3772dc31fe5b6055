"""Host detection and per-process GPU memory through NVML, checked against a stand-in NVML module."""

import sys

import pytest
from fake_nvml import Device, FakeNvml, h100

from harness.devices import host as device
from harness.devices import memory as measurements


@pytest.fixture
def fake_nvml(monkeypatch):
    """A host with four H100s, as NVML sees it."""
    host = FakeNvml([h100(n) for n in range(4)])
    monkeypatch.setitem(sys.modules, "pynvml", host.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return host


def test_auto_detects_the_card_through_nvml(fake_nvml):
    host = device.detect_host()
    assert (host.key, host.compute_capability, host.driver, host.cuda, host.via) == (
        "h100",
        "9.0",
        "580.65.06",
        "13.0",
        "nvml",
    )
    assert round(host.memory_mib) == 81559


@pytest.mark.parametrize(
    "visible, expected",
    [
        ("3,1", [3, 1]),  # physical indices, in CUDA's order
        ("GPU-00000002-1111", [2]),  # a unique UUID prefix is enough for CUDA
        ("GPU-00000001-1111-2222-3333-444455550001,7,2", [1]),  # CUDA stops at the first invalid entry
        ("5", []),  # an index past the count: CUDA sees no GPU at all
        ("", []),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(fake_nvml, visible, expected):
    from harness.devices import nvml

    handles = nvml.visible_handles(fake_nvml.module(), visible)
    assert [fake_nvml.devices.index(h) for h in handles] == expected


def test_a_visible_device_list_naming_no_gpu_makes_the_host_a_cpu(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with pytest.warns(UserWarning, match="names no GPU"):
        assert device.detect_host().key == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device.detect_host().key == "cpu"


def test_a_mig_instance_is_found_by_its_uuid(monkeypatch):
    from harness.devices import nvml

    parent = h100(0)
    parent.name = "NVIDIA A100-SXM4-80GB"
    mig = Device(
        uuid="MIG-5e0d2f3c-aaaa-bbbb-cccc-0123456789ab",
        name="NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        total_mib=9856,
        bus_id=parent.bus_id,
    )
    parent.migs = [mig]
    host = FakeNvml([parent, h100(1)])
    module = host.module()
    assert nvml.visible_handles(module, "MIG-5e0d2f3c") == [mig]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig.uuid)
    assert device.detect_host().name == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"


def test_without_nvml_or_driver_the_host_is_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(device, "_has_nvidia_driver", lambda: False)
    assert device.detect_host().key == "cpu"


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
