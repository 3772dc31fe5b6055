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
