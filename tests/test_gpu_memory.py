"""GPU peak memory with a stand-in NVML that behaves as NVML does: on bare metal, in a container
(host pids), with CUDA_VISIBLE_DEVICES remapping, on MIG. The peak is measured with its method
named, or None with the reason, which turns a budget check into an error: never 0, never a pass."""

import os

import pytest
from fake_nvml import Device, FakeCuda, FakeNvml, h100

from harness.devices.memory import GpuMemory, MemoryTracker
from harness.judge.result import WorkerResult
from harness.judge.verdict import judge

PID = os.getpid()


@pytest.fixture(autouse=True)
def every_gpu_visible(monkeypatch):
    """As on a host where nobody set CUDA_VISIBLE_DEVICES; a test that remaps sets it itself."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def measure(
    host: FakeNvml,
    cell_mib: float = 3000.0,
    before_cell=None,
    before_attach=None,
    in_cell=None,
):
    """A worker on the GPU CUDA_VISIBLE_DEVICES makes CUDA's device 0: start, create its context,
    run one cell that reserves `cell_mib`; returns the tracker's result. The callbacks are what
    other processes do meanwhile."""
    memory = GpuMemory(host.module(), pid=PID)
    cuda = FakeCuda(host, PID)
    if before_attach:
        before_attach()
    memory.attach(cuda)
    if before_cell:
        before_cell()
    with MemoryTracker("cuda", memory, cuda) as tracker:
        if in_cell:
            in_cell()
        cuda.allocate(cell_mib)
    return tracker.result


def test_bare_metal_reads_this_process_from_nvml():
    host = FakeNvml([h100(n) for n in range(2)])
    result = measure(host)
    assert result["peak_memory_source"] == "nvml_process"
    assert result["peak_memory_mib"] == 3500.0  # the CUDA context (500) is what the allocator cannot see


@pytest.mark.parametrize("visible", ["3", "3,0", "GPU-00000003", "GPU-00000003-1111-2222-3333-444455550003"])
def test_remapped_gpu_is_measured_on_the_gpu_torch_uses(monkeypatch, visible):
    """CUDA_VISIBLE_DEVICES=3: torch's device 0 is NVML's index 3 (NVML ignores the variable), so
    reading NVML's index 0 would read an idle card; the worker measures the card it computes on."""
    host = FakeNvml([h100(n) for n in range(4)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    result = measure(host)
    assert result["peak_memory_source"] == "nvml_process" and result["peak_memory_mib"] == 3500.0
    assert host.devices[3].processes == {PID: 3500.0} and not host.devices[0].processes


def test_a_visible_devices_list_naming_no_gpu_fails_as_cuda_does(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # a 4-GPU host
    with pytest.raises(RuntimeError, match="no CUDA-capable device"):
        measure(FakeNvml([h100(n) for n in range(4)]))


def test_in_a_container_alone_on_the_gpu_the_device_delta_measures():
    host = FakeNvml([h100(0)], host_pid_offset=734_211)  # NVML shows the host's pid for this worker
    host.devices[0].other_used_mib = 420.0  # what the device used before the worker started
    result = measure(host)
    assert result["peak_memory_source"] == "nvml_device_delta"
    assert result["peak_memory_mib"] == 3500.0


def test_in_a_container_beside_another_process_the_allocator_plus_context_measures():
    host = FakeNvml([h100(0)], host_pid_offset=734_211)

    def neighbour_starts():
        host.use(host.devices[0].uuid, 99, 12_000)

    result = measure(host, before_cell=neighbour_starts)
    assert result["peak_memory_source"] == "torch_reserved_plus_context"
    assert result["peak_memory_mib"] == 3500.0 and result["cuda_context_mib"] == 500.0


NEIGHBOUR = 99  # another process on the card, in another container: its pid is nobody this worker knows


def test_a_process_that_leaves_after_the_worker_started_is_not_taken_for_its_before(tiny_cell):
    """The audit's case: 3,600 MiB used (torch reserved 3,100) was recorded as 1,552 MiB and passed 3 GiB."""
    host = FakeNvml([h100(0)], host_pid_offset=734_211)
    host.use(host.devices[0].uuid, NEIGHBOUR, 2048)  # there when the worker starts and creates its context
    result = measure(host, cell_mib=3100, before_cell=lambda: host.leave(host.devices[0].uuid, NEIGHBOUR))
    assert result["peak_memory_mib"] >= 3100 and result["peak_memory_source"] == "torch_reserved"
    assert "another process computed on the device" in result["peak_memory_note"]
    worker = WorkerResult(ok=True, generation={"new_token_ids": [1, 2], "text": "ab"}, measurements=result)
    assert judge(tiny_cell(budget="3GiB"), worker).category == "over-budget"


def test_before_is_read_when_the_context_is_created_not_when_the_worker_started():
    host = FakeNvml([h100(0)], host_pid_offset=734_211)
    host.use(host.devices[0].uuid, NEIGHBOUR, 2048)  # the previous worker, still releasing its card
    result = measure(host, cell_mib=3100, before_attach=lambda: host.leave(host.devices[0].uuid, NEIGHBOUR))
    assert result["peak_memory_source"] == "nvml_device_delta" and result["peak_memory_mib"] == 3600.0


def _with_unlisted_memory():
    """An H100 seen from a container, holding 2,048 MiB that no listed process holds (MPS, vGPU, the
    driver), and what frees it."""
    host = FakeNvml([h100(0)], host_pid_offset=734_211)
    host.devices[0].other_used_mib = 2049.0

    def unlisted_memory_freed():
        host.devices[0].other_used_mib = 1.0

    return host, unlisted_memory_freed


def test_before_is_re_checked_at_each_cell():
    """Memory no listed process holds that is freed between cells is not the cell's."""
    host, unlisted_memory_freed = _with_unlisted_memory()
    result = measure(host, cell_mib=3100, before_cell=unlisted_memory_freed)
    assert result["peak_memory_source"] == "nvml_device_delta" and result["peak_memory_mib"] == 3600.0


def test_a_device_figure_below_the_allocators_reserved_peak_is_not_believed():
    host, unlisted_memory_freed = _with_unlisted_memory()
    result = measure(host, cell_mib=3100, in_cell=unlisted_memory_freed)  # freed as the cell runs
    assert result["nvml_device_delta_peak_mib"] < 3100
    assert result["peak_memory_source"] == "torch_reserved_plus_context" and result["peak_memory_mib"] == 3600.0
    assert "below the allocator's own reserved peak of 3100 MiB" in result["peak_memory_note"]


def test_a_driver_reporting_zero_per_process_is_not_taken_at_its_word():
    host = FakeNvml([h100(0)])
    host.devices[0].process_memory = "zero"  # Project-HAMi/HAMi-core#112: "mem: 0"
    result = measure(host)
    assert result["peak_memory_source"] == "nvml_device_delta" and result["peak_memory_mib"] == 3500.0


def test_a_mig_instance_is_measured_on_the_instance(monkeypatch):
    parent = h100(0)
    mig = Device(uuid="MIG-5e0d2f3c-aaaa-bbbb-cccc-0123456789ab", name="MIG 1g.10gb", total_mib=9856, bus_id="x")
    mig.process_memory = "unavailable"  # the process is listed on the instance, its usage None
    parent.migs = [mig]
    host = FakeNvml([parent])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig.uuid)
    result = measure(host, cell_mib=2000)
    assert result["peak_memory_source"] == "nvml_device_delta" and result["peak_memory_mib"] == 2500.0


def test_without_nvml_the_allocator_peak_is_labelled_as_lacking_the_context():
    cuda = FakeCuda(FakeNvml([h100(0)]), PID)
    memory = GpuMemory(nvml=False, pid=PID)
    memory.attach(cuda)
    with MemoryTracker("cuda", memory, cuda) as tracker:
        cuda.allocate(3000)
    assert tracker.result["peak_memory_source"] == "torch_reserved" and tracker.result["peak_memory_mib"] == 3000
    assert "context is not included" in tracker.result["peak_memory_note"]


def test_a_peak_nothing_measured_is_none_and_a_budget_on_it_is_an_error(tiny_cell):
    host = FakeNvml([h100(0)], host_pid_offset=734_211)
    memory = GpuMemory(host.module(), pid=PID)
    cuda = FakeCuda(host, PID, context_mib=0)
    with MemoryTracker("cuda", memory, cuda) as tracker:
        pass  # nothing attached, nothing allocated: every method reads 0
    result = tracker.result
    assert result["peak_memory_mib"] is None and "0 MiB" in result["peak_memory_unmeasured"]
    worker = WorkerResult(
        ok=True, generation={"new_token_ids": [1, 2], "text": "ab", "nonfinite_steps": []}, measurements=result
    )
    verdict = judge(tiny_cell(budget="14GiB"), worker)
    assert verdict.outcome == "error" and verdict.category == "harness"
    assert "not measured" in verdict.message and "0 MiB" in verdict.message


@pytest.mark.parametrize("offset", [0, 734_211])
def test_the_peak_is_never_zero(monkeypatch, offset):
    host = FakeNvml([h100(n) for n in range(2)], host_pid_offset=offset)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    result = measure(host, cell_mib=1)
    assert result["peak_memory_mib"] and result["peak_memory_mib"] > 0
