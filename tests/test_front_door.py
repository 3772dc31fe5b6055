"""The first run on a lab card, as a new user meets it: selectors by card family, nothing-ran is not a pass,
a torch with kernels for the card, options as ini keys and variables, verdicts that a suite cannot override."""

import json
import sys
from pathlib import Path

import pytest
from fake_nvml import FakeNvml, v100_16gb

from harness.cli import main
from harness.run.runner import Runner

REPO = Path(__file__).resolve().parents[1]

FLEET = """
models: [{tiny: qwen2_vl}]
devices: [v100, v100-16gb, v100-32gb, a100, cpu]
axes: {dtype: [float16]}
"""


@pytest.fixture
def v100_host(monkeypatch):
    """A V100 16 GB host as NVML reports it, its driver at CUDA 12.2 (R535)."""
    nvml = FakeNvml([v100_16gb(0)], driver="535.183.01", driver_cuda=12020)
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_s="def test_cell(cell_run):\n    cell_run.check()\n")
    return pytester


def _ids(result) -> list[str]:
    return [line for line in result.stdout.lines if "::test_cell[" in line]


def test_a_family_key_selects_every_size_and_this_host_selects_this_cards_cells(suite, v100_host):
    suite.makefile(".yaml", m=FLEET)
    for selector in ("v100", "this_host", "v100-16gb"):
        result = suite.runpytest("--compat-matrix", "m.yaml", "-m", selector, "--collect-only", "-q")
        ids = _ids(result)
        assert len(ids) == 2, (selector, result.stdout.str())
        assert any("-v100-float16-" in i for i in ids) and any("-v100-16gb-float16-" in i for i in ids)
        assert not any("v100-32gb" in i or "a100" in i or "-cpu-" in i for i in ids)
        assert "3 deselected" in result.stdout.str()  # v100-32gb, a100 and cpu: not this card, not skips


def test_a_v100_under_a_torch_without_sm70_stops_before_any_cell_in_one_paragraph(suite, v100_host, monkeypatch):
    """This machine's torch (2.14.1+cu130: sm_75 and newer) has no kernel for a V100."""
    suite.makefile(".yaml", m=FLEET)
    spawned = []
    monkeypatch.setattr(Runner, "_spawn", lambda self: spawned.append(1))
    result = suite.runpytest("--compat-matrix", "m.yaml", "-m", "this_host", "--compat-reports", "r")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + err
    assert "sm_70" in err and "Tesla V100-SXM2-16GB" in err and "download.pytorch.org/whl/cu126" in err
    assert "Traceback" not in err and not spawned and not (suite.path / "r").exists()


def test_the_torch_build_check_follows_cuda_compatibility_rules():
    from harness.devices.torch_build import TorchBuild

    cu130 = TorchBuild("2.14.1+cu130", "13.0", ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))
    assert not cu130.runs_on("7.0") and cu130.runs_on("7.5") and cu130.runs_on("8.9") and cu130.runs_on("9.0")
    assert TorchBuild("x", "12.6", ("sm_80", "compute_80")).runs_on("9.0")  # PTX is compiled for newer cards
    assert not TorchBuild("x", "12.6", ("sm_80",)).runs_on("9.0")  # a cubin runs on its own major only


def test_results_record_the_full_torch_build():
    from harness.devices.host import cpu_host
    from harness.devices.torch_build import installed
    from harness.report.results import environment

    env = environment(cpu_host(), None, installed().to_dict())
    assert env["torch"] == "2.14.1+cu130" and env["torch_cuda"] == "13.0"


def test_options_are_also_ini_keys_and_environment_variables(suite, monkeypatch):
    suite.makefile(".yaml", m="models: [{tiny: qwen2_vl}]\ndevices: [cpu]\n")
    suite.makeini("[pytest]\ncompat_matrix = m.yaml\n")
    result = suite.runpytest("--collect-only", "-q")
    ids = _ids(result)
    assert len(ids) == 1 and "qwen2-vl" in ids[0], result.stdout.str()
    suite.makefile(".yaml", other="models: [{tiny: qwen3_vl}]\ndevices: [cpu]\naxes: {dtype: [float32]}\n")
    monkeypatch.setenv("QWEN_COMPAT_MATRIX", "other.yaml")  # the variable wins over the ini key
    ids = _ids(suite.runpytest("--collect-only", "-q"))
    assert len(ids) == 1 and "qwen3-vl" in ids[0], ids


def test_a_suite_in_another_project_without_a_matrix_is_one_paragraph(suite):
    result = suite.runpytest()
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "no matrix says which cells there are" in out and "QWEN_COMPAT_MATRIX" in out and "Traceback" not in out


def test_a_suite_that_never_calls_check_cannot_record_a_failed_verdict_as_passed(pytester):
    """ba93f90 recorded `outcome: passed, category: over-budget` for this suite, and the gate saw a pass."""
    pytester.makepyfile(test_s="def test_cell(cell_run):\n    assert cell_run.verdict\n")
    pytester.makefile(
        ".yaml", m="models: [{tiny: qwen2_vl}]\ndevices: [cpu]\naxes: {dtype: [float32]}\nbudgets: {default: 1MiB}\n"
    )
    result = pytester.runpytest("--compat-matrix", "m.yaml", "--compat-reports", "r")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    from harness.report.results import load_results

    (cell,) = load_results(pytester.path / "r" / "cpu" / "results.json")["cells"]
    assert (cell["outcome"], cell["category"]) == ("failed", "over-budget")
    assert "without calling cell_run.check()" in result.stdout.str()


def test_resume_with_nothing_new_says_so_and_exits_by_the_recorded_outcomes(pytester):
    pytester.makepyfile(test_s="def test_cell(cell_run):\n    cell_run.check()\n")
    pytester.makefile(".yaml", m="models: [{tiny: qwen2_vl}]\ndevices: [cpu]\naxes: {dtype: [float32]}\n")
    args = ("--compat-matrix", "m.yaml", "--compat-reports", "r")
    assert pytester.runpytest(*args).ret == 0
    again = pytester.runpytest(*args, "--compat-resume")
    out = again.stdout.str() + again.stderr.str()
    assert again.ret == 0 and "nothing new to run: all 1 selected cells are recorded" in out and "1 passed" in out


def test_the_cli_passes_everything_after_run_to_pytest_and_has_a_version(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(pytest, "main", lambda args: seen.append(args) or 0)
    assert main(["run", "-m", "v100", "-k", "float16", "--compat-resume"]) == 0
    assert seen == [["-m", "v100", "-k", "float16", "--compat-resume"]]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("qwen-compat 0.")


def test_plan_resolves_this_host_with_device_auto(capsys):
    matrix = REPO / "matrices" / "default.yaml"
    assert main(["plan", str(matrix), "--device", "auto", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all("-cpu-" in row["id"] for row in rows)


def test_doctor_says_a_torch_without_the_cards_kernels_and_exits_non_zero(v100_host, capsys):
    """On the faked V100 16 GB host, this machine's torch (2.14.1+cu130, sm_75 and newer) cannot run."""
    assert main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert "2.14.1+cu130" in captured.out and "sm_75" in captured.out and "NO:" in captured.out
    assert "download.pytorch.org/whl/cu126" in captured.err and "Traceback" not in captured.err
