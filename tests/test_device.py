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


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "h100"),  # a slice is matched by its card's name
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "a100-80gb"),
        ("Tesla T4", "t4"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA GH200 480GB", None),  # 96 GB, not an H200
        ("NVIDIA H100 NVL", None),  # 94 GB, not the H100 80GB row
        ("NVIDIA L40", None),  # not an L4, not an L40S
    ],
)
def test_a_card_is_matched_by_its_whole_name(name, key):
    from harness.matrix.gpus import match_nvml_name

    found = match_nvml_name(name)
    assert (found.key if found else None) == key


def test_an_unknown_card_is_a_warning_with_its_nvml_facts_not_a_guess(monkeypatch):
    gh200 = Device(uuid="GPU-9", name="NVIDIA GH200 480GB", total_mib=97871, bus_id="0009:01:00.0")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([gh200]).module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.warns(UserWarning, match="not in the GPU table: NVML name 'NVIDIA GH200 480GB'.*97871 MiB"):
        host = device.detect_host()
    assert host.key == "unknown" and host.memory_mib == 97871


def a100_in_mig_mode(slice_name: str = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"):
    card = h100(0)
    card.name, card.total_mib, card.compute_capability = "NVIDIA A100-SXM4-80GB", 81920, (8, 0)
    one_g = Device(uuid="MIG-5e0d2f3c-aaaa-bbbb-cccc-0123456789ab", name=slice_name, total_mib=9728, bus_id="")
    three_g = Device(uuid="MIG-77770000-aaaa-bbbb-cccc-0123456789ab", name="MIG 3g.40gb", total_mib=40192, bus_id="")
    card.migs = [one_g, three_g]
    return FakeNvml([card]), one_g


@pytest.mark.parametrize("slice_name", ["NVIDIA A100-SXM4-80GB MIG 1g.10gb", "MIG 1g.10gb"])  # NVML gives either
def test_a_mig_slice_is_its_cards_model_with_the_slices_memory(monkeypatch, slice_name):
    host, one_g = a100_in_mig_mode(slice_name)
    monkeypatch.setitem(sys.modules, "pynvml", host.module())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", one_g.uuid)
    found = device.detect_host()
    assert (found.key, found.mig, found.memory_mib, found.compute_capability) == ("a100-80gb", "1g.10gb", 9728, "8.0")
    assert found.name == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"


def test_a_percentage_budget_on_a_mig_slice_is_of_the_slice(monkeypatch, tiny_cell):
    """The audit's case: 90 % of a 1g.10gb slice of an A100-80GB was 73,728 MiB, on a 9,728 MiB device."""
    from fake_nvml import FakeCuda

    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    host, one_g = a100_in_mig_mode()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", one_g.uuid)
    memory = measurements.GpuMemory(host.module(), pid=1)
    cuda = FakeCuda(host, pid=1)
    cuda.identity = lambda: (host.devices[0].uuid.removeprefix("GPU-"), None)  # some CUDA versions: the card's UUID
    memory.attach(cuda)
    assert memory.device_memory_mib(cuda) == 9728
    worker = WorkerResult(
        ok=True,
        generation={"new_token_ids": [1, 2], "text": "ab"},
        measurements={"peak_memory_mib": 9000.0, "peak_memory_source": "nvml_device_delta", "device_memory_mib": 9728},
    )
    verdict = judge(tiny_cell(device="a100-80gb", budget="90%"), worker)
    assert verdict.category == "over-budget" and "budget of 8755 MiB" in verdict.message
