"""Issue 21's wrong verdicts, each with the run a user would make: drift kept under xdist, an unchecked check
said as such (and failing the gate when asked), the clock of a cell, a path pytest takes for a test path."""

import pytest

from harness.cli import main
from harness.report.results import load_results

TWINS = """
models: [{tiny: qwen2_vl}]
devices: [cpu]
axes: {dtype: [float32, bfloat16]}
defaults: {max_new_tokens: 4}
"""


def _cells(path) -> dict:
    return {c["id"]: c for c in load_results(path)["cells"]}


def test_drift_is_measured_under_xdist_where_the_controller_used_to_delete_the_references(suite, matrix_file):
    """ba93f90: with -n 2 the controller deleted the float32 references its workers had just written, and the
    bfloat16 twin passed with 'drift not measured'."""
    result = suite.runpytest_subprocess(
        "--compat-matrix", str(matrix_file(TWINS)), "--compat-reports", "r", "-n", "2", "--dist", "loadgroup"
    )
    assert result.ret == 0, result.stdout.str()[-2000:]
    cells = _cells(suite.path / "r" / "cpu" / "results.json")
    twin = cells["tiny-qwen2-vl-cpu-bfloat16-sdpa-448x448"]
    assert twin["measurements"]["drift"] == "measured" and not twin["unchecked"]


def test_a_pass_with_its_twin_absent_says_unchecked_and_the_gate_can_fail_it(suite, matrix_file):
    args = ("--compat-matrix", str(matrix_file(TWINS)), "--compat-reports", "r")
    result = suite.runpytest(*args, "-m", "bfloat16")
    assert result.ret == 0
    cell = _cells(suite.path / "r" / "cpu" / "results.json")["tiny-qwen2-vl-cpu-bfloat16-sdpa-448x448"]
    assert cell["outcome"] == "passed" and cell["unchecked"] == ["drift: not measured — no float32 twin in this run"]
    summary = (suite.path / "r" / "cpu" / "summary.md").read_text()
    assert "1 passed with a check unchecked" in summary and "unchecked: drift" in summary
    assert "unchecked=drift" in (suite.path / "r" / "cpu" / "junit.xml").read_text()
    import shutil

    baseline = suite.path / "base"
    shutil.copytree(suite.path / "r", baseline)  # the same run as its own baseline: nothing changed but unchecked
    gate = ["gate", "--baseline", str(baseline), "--current", str(suite.path / "r"), "--out", str(suite.path)]
    assert main(gate) == 0  # a note by default
    assert main([*gate, "--unchecked-fails"]) == 1


@pytest.mark.parametrize("option", ["--compat-matrix", "--compat-reports"])
def test_an_absolute_path_pytest_takes_for_a_test_path_is_one_paragraph(pytester, option, tmp_path):
    """ba93f90: `--compat-matrix /abs/m.yaml` collected the project's own tests/ (398 items, not 204), and
    `--compat-reports /abs/existing` lost the default matrix: pytest reads the value before the plugin."""
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ntestpaths = ["suites"]\n')
    value = tmp_path / ("m.yaml" if option == "--compat-matrix" else "reports")
    value.mkdir() if option == "--compat-reports" else value.write_text("models: [{tiny: qwen2_vl}]\ndevices: [cpu]\n")
    result = pytester.runpytest_subprocess(option, str(value), "--collect-only", "-q")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + err
    assert f"{option}={value}" in err and "Traceback" not in err
    ok = pytester.runpytest_subprocess(f"{option}={value}", "--collect-only", "-q")
    assert "tests/" not in ok.stdout.str() and "Traceback" not in ok.stderr.str()


def test_a_setting_whose_name_looks_secret_does_not_eat_the_harness_keys(monkeypatch):
    """Ray 2.60 sets RAY_AUTH_MODE=token: scrubbing 'token' everywhere turned new_token_ids into new_***_ids,
    and every cell's verdict failed on a missing key."""
    from harness.secrets import scrub

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("MY_API_KEY", "k3y-Value-1234567")
    out = scrub({"new_token_ids": [1], "text": "token k3y-Value-1234567", "hf_abcdefghijklmnopqrstuvwxyz": 1})
    assert out == {"new_token_ids": [1], "text": "token ***", "***": 1}


@pytest.mark.parametrize(
    "defaults, key",
    [
        ("{drift_max_abs_diff: .nan}", "drift_max_abs_diff"),
        ("{drift_max_abs_diff: -1}", "drift_max_abs_diff"),
        ("{timeout_s: 1e400}", "timeout_s"),
        ("{load_timeout_s: 1e9}", "load_timeout_s"),
    ],
)
def test_bounds_a_check_cannot_use_are_matrix_errors(tmp_path, defaults, key):
    from harness.errors import UserError
    from harness.matrix.schema import load

    path = tmp_path / "m.yaml"
    path.write_text(f"models: [{{tiny: qwen2_vl}}]\ndevices: [cpu]\ndefaults: {defaults}\n")
    with pytest.raises(UserError, match=key):
        load(path)


@pytest.mark.parametrize("tolerance", ["-5%", "nan", "inf%"])
def test_a_tolerance_that_is_negative_or_not_a_number_is_bad_input(tolerance, tmp_path, capsys):
    gate = ["gate", "--baseline", str(tmp_path), "--current", str(tmp_path), f"--memory-tolerance={tolerance}"]
    assert main(gate) == 2
    assert "not a tolerance" in capsys.readouterr().err


def test_a_cuda_visible_devices_naming_no_gpu_is_refused_not_a_green_cpu_run(pytester, monkeypatch):
    """ba93f90 warned and ran the GPU runner's matrix as the CPU: green, having tested no GPU."""
    import sys

    from fake_nvml import FakeNvml, h100

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([h100(0), h100(1)]).module())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    pytester.makefile(".yaml", m="models: [{tiny: qwen2_vl}]\ndevices: [cpu, h100]\n")
    result = pytester.runpytest("--compat-matrix", "m.yaml", "--collect-only", "-q")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "CUDA_VISIBLE_DEVICES='7' names no GPU" in err, err
    assert pytester.runpytest("--compat-matrix", "m.yaml", "--compat-device", "cpu", "--collect-only", "-q").ret == 0


def test_resume_in_another_environment_is_refused(suite, matrix_file, monkeypatch):
    args = ("--compat-matrix", str(matrix_file(TWINS)), "--compat-reports", "r", "-m", "float32")
    assert suite.runpytest(*args).ret == 0
    from harness.report import results

    real = results.environment
    monkeypatch.setattr(results, "environment", lambda *a, **k: {**real(*a, **k), "transformers": "9.9.9"})
    monkeypatch.setattr("harness.plugin.session.environment", results.environment)
    again = suite.runpytest(*args, "--compat-resume")
    err = again.stderr.str()
    assert again.ret == pytest.ExitCode.USAGE_ERROR and "transformers" in err and "9.9.9" in err, err


def test_smoke_with_an_endpoint_that_is_not_a_url_is_one_paragraph(capsys):
    assert main(["smoke", "--endpoint", "notaurl"]) == 2
    err = capsys.readouterr().err
    assert "'notaurl' is not a server's URL" in err and "Traceback" not in err
