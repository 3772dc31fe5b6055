"""The release gate and the fleet view, on reports from real CPU runs changed one thing at a time."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.report.results import load_results

REPO = Path(__file__).resolve().parents[1]

THREE_CELLS = """
models:
  - tiny: qwen2_5_vl
devices: [cpu]
axes:
  resolution: [224x224, 448x448, 672x672]
defaults:
  max_new_tokens: 2
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, suite_cmd):
    """One real CPU run of three cells, saved once as a named baseline too."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "matrix.yaml").write_text(THREE_CELLS)
    args = ["--compat-matrix", "matrix.yaml", "--compat-reports", "reports", "--compat-save-baseline", "first"]
    done = subprocess.run(suite_cmd(folder, *args), cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (folder / "reports" / "baselines" / "first" / "cpu" / "results.json").exists()
    return folder / "reports"


@pytest.fixture
def runs(real_run, tmp_path):
    """(baseline, current) folders, both copies of the real run, and an editor for the current one."""
    base, cur = tmp_path / "base", tmp_path / "cur"
    for target in (base, cur):
        (target / "cpu").mkdir(parents=True)
        shutil.copy(real_run / "cpu" / "results.json", target / "cpu" / "results.json")

    def edit(change):
        path = cur / "cpu" / "results.json"
        data = load_results(path)
        change(data["cells"])
        path.write_text(json.dumps(data))

    return base, cur, edit


def gate(base, cur, capsys, *extra):
    code = main(["gate", "--baseline", str(base), "--current", str(cur), *extra])
    return code, capsys.readouterr().out


def test_unchanged_run_passes(runs, capsys):
    base, cur, _ = runs
    code, out = gate(base, cur, capsys)
    assert code == 0 and "gate: PASS" in out
    assert json.loads((cur / "gate.json").read_text())["passed"] is True
    assert (cur / "gate.md").read_text().startswith("# qwen-compat gate: PASS")


def test_a_pass_turned_fail_is_a_regression(runs, capsys):
    base, cur, edit = runs

    def fail(cells):
        cells[1].update(outcome="failed", category="out-of-memory")

    edit(fail)
    code, out = gate(base, cur, capsys)
    assert code == 1
    assert "passed -> failed" in out and "out-of-memory" in out and "gate: FAIL" in out


def test_memory_up_20_percent_is_a_regression(runs, capsys):
    base, cur, edit = runs
    edit(
        lambda cells: cells[0]["measurements"].update(peak_memory_mib=cells[0]["measurements"]["peak_memory_mib"] * 1.2)
    )
    code, out = gate(base, cur, capsys)
    assert code == 1 and "peak memory up beyond 5%" in out and "+20.0%" in out
    code, _ = gate(base, cur, capsys, "--memory-tolerance", "25%")
    assert code == 0


def test_a_removed_cell_is_a_regression(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells.pop(2))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "cell missing" in out


def test_a_missing_device_is_a_regression(runs, capsys):
    base, cur, _ = runs
    shutil.copytree(base / "cpu", base / "t4")
    code, out = gate(base, cur, capsys)
    assert code == 1 and "device missing" in out


def test_a_changed_failure_category_is_a_regression_and_a_fix_an_improvement(runs, capsys):
    base, cur, edit = runs
    for folder, category in ((base, "kernel-launch"), (cur, "out-of-memory")):
        data = load_results(folder / "cpu" / "results.json")
        data["cells"][0].update(outcome="failed", category=category)
        data["cells"][1].update(outcome="failed", category="numerical") if folder == base else None
        (folder / "cpu" / "results.json").write_text(json.dumps(data))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "failure category changed" in out
    assert "improvement" in out and "failed -> passed" in out


def test_a_pass_turned_skip_is_a_regression_unless_the_baseline_skipped_too(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells[0].update(outcome="skipped", message="flash-attn is not installed on this runner"))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "passed -> skipped" in out and "flash-attn is not installed" in out
    data = load_results(base / "cpu" / "results.json")
    data["cells"][0].update(outcome="skipped")
    (base / "cpu" / "results.json").write_text(json.dumps(data))
    assert gate(base, cur, capsys)[0] == 0


def test_an_unknown_outcome_is_bad_input(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells[1].update(outcome="passed-ish"))
    code = main(["gate", "--baseline", str(base), "--current", str(cur)])
    err = capsys.readouterr().err
    assert code == 2 and "'passed-ish'" in err and "Fix:" in err and len(err.strip().splitlines()) == 1


def _latency(median: float, low: float, high: float) -> dict:
    spread = {"median": median, "min": low, "max": high, "spread": high - low, "n": 5}
    return {"prefill_s": median, "latency": {"prefill_s": spread}}


@pytest.mark.parametrize(
    "current, regression",
    [
        ((1.20, 1.18, 1.25), False),  # +20 %, beyond the 15 % tolerance, but inside the baseline's spread
        ((1.40, 1.38, 1.45), True),  # +40 % and above the slowest baseline repeat
        ((1.10, 1.00, 1.20), False),  # +10 %: inside the tolerance
    ],
)
def test_latency_regresses_beyond_tolerance_and_outside_the_baseline_spread(runs, capsys, current, regression):
    base, cur, edit = runs
    data = load_results(base / "cpu" / "results.json")
    data["cells"][0]["measurements"].update(_latency(1.0, 0.8, 1.3))
    (base / "cpu" / "results.json").write_text(json.dumps(data))
    edit(lambda cells: cells[0]["measurements"].update(_latency(*current)))
    code, out = gate(base, cur, capsys)
    assert (code == 1) == regression
    assert ("latency up beyond 15% and the spread" in out) == regression


def test_one_sample_latency_uses_the_tolerance_alone(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells[2]["measurements"].update(prefill_s=cells[2]["measurements"]["prefill_s"] * 1.5))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "latency up" in out


def test_new_cells_are_listed_and_never_fail(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells.append({**cells[0], "id": cells[0]["id"] + "-new"}))
    code, out = gate(base, cur, capsys)
    assert code == 0 and "new cell" in out


@pytest.mark.parametrize("damage", ["corrupt", "schema", "missing"])
def test_bad_input_exits_2_with_one_paragraph(runs, capsys, damage):
    base, cur, _ = runs
    path = cur / "cpu" / "results.json"
    if damage == "corrupt":
        path.write_text("{not json")
    elif damage == "schema":
        data = load_results(path)
        path.write_text(json.dumps({**data, "schema_version": 99}))
    else:
        shutil.rmtree(cur / "cpu")
    code = main(["gate", "--baseline", str(base), "--current", str(cur)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qwen-compat: ") and "Fix:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_named_baseline_compares_by_name(real_run, capsys, monkeypatch):
    monkeypatch.chdir(real_run.parent)
    code, out = gate("first", real_run, capsys)
    assert code == 0 and "gate: PASS" in out
    assert main(["gate", "--baseline", "nope", "--current", str(real_run)]) == 2
    assert "saved baselines: first" in capsys.readouterr().err


def test_fleet_view_merges_runners(runs, tmp_path, capsys):
    base, cur, _ = runs
    shutil.move(str(cur / "cpu"), str(cur / "a10g"))  # as if a second runner had sent its folder
    assert main(["report", str(base), str(cur), "--out", str(tmp_path / "fleet")]) == 0
    page = (tmp_path / "fleet" / "fleet.html").read_text()
    md = (tmp_path / "fleet" / "fleet.md").read_text()
    assert "<th>a10g</th>" in page and "<th>cpu</th>" in page and "tiny-qwen2-5-vl" in page
    assert "../base/cpu/summary.html" in page and "3 passed" in md


def test_workflow_is_a_valid_github_workflow(tmp_path):
    checker = Path(sys.executable).parent / "check-jsonschema"
    workflow = REPO / ".github" / "workflows" / "nightly.yml"
    ok = subprocess.run(
        [checker, "--builtin-schema", "vendor.github-workflows", workflow], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(workflow.read_text().replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest"))
    bad = subprocess.run(
        [checker, "--builtin-schema", "vendor.github-workflows", broken], capture_output=True, text=True
    )
    assert bad.returncode != 0  # the check is real: a misspelt key fails it


def test_xdist_gives_the_same_results_as_a_serial_run(tmp_path, suite_cmd):
    """`pytest -n 2` on (a slice of) the default matrix: same cells, same outcomes, same token counts."""
    select = ["--compat-matrix", str(REPO / "matrices" / "default.yaml"), "-k", "qwen3-vl-moe and 448x448"]
    results = {}
    for name, extra in (("serial", []), ("xdist", ["-n", "2", "--dist", "loadgroup"])):
        command = suite_cmd(tmp_path, *select, "--compat-reports", name, *extra)
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:]
        cells = load_results(tmp_path / name / "cpu" / "results.json")["cells"]
        results[name] = {(c["id"], c["outcome"], c["measurements"]["visual_tokens"]) for c in cells}
    assert len(results["serial"]) == 16
    assert results["serial"] == results["xdist"]
