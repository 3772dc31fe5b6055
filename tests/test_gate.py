"""The release gate and the fleet view, on reports from real CPU runs changed one thing at a time."""

import json
import os
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


def test_unchanged_run_passes_and_the_job_summary_gets_the_table(runs, capsys, monkeypatch, tmp_path):
    base, cur, _ = runs
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    code, out = gate(base, cur, capsys)
    assert code == 0 and "gate: PASS" in out
    assert json.loads((cur / "gate.json").read_text())["passed"] is True
    assert (cur / "gate.md").read_text().startswith("# qwen-compat gate: PASS")
    assert (tmp_path / "summary.md").read_text() == (cur / "gate.md").read_text() + "\n"


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


def test_one_sample_latency_is_noise_unless_a_tolerance_is_given(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells[2]["measurements"].update(prefill_s=cells[2]["measurements"]["prefill_s"] * 3.92))
    code, out = gate(base, cur, capsys)  # +292 % on one CPU sample each: shown, not judged
    assert code == 0 and "note" in out and "not judged: 1 timed runs" in out and "+292.0%" in out
    code, out = gate(base, cur, capsys, "--latency-tolerance", "15%")
    assert code == 1 and "latency up beyond 15% and the spread" in out


def test_measurements_of_a_cell_failing_in_both_runs_are_never_judged(runs, capsys):
    base, cur, edit = runs
    for folder, factor in ((base, 1.0), (cur, 3.0)):
        data = load_results(folder / "cpu" / "results.json")
        m = data["cells"][0]["measurements"]
        data["cells"][0].update(outcome="failed", category="numerical")
        m.update(peak_memory_mib=m["peak_memory_mib"] * factor, **_latency(factor, factor, factor))
        (folder / "cpu" / "results.json").write_text(json.dumps(data))
    code, out = gate(base, cur, capsys, "--latency-tolerance", "1%")
    assert code == 0 and "peak memory" not in out and "latency" not in out


@pytest.mark.parametrize(
    "before, after, what",
    [
        ("passed", "xfailed", "passed -> xfailed"),
        ("skipped", "failed", "skipped -> failed"),
        ("skipped", "error", "skipped -> error"),
    ],
)
def test_an_outcome_that_got_worse_is_a_regression_whatever_its_kind(runs, capsys, before, after, what):
    base, cur, edit = runs
    data = load_results(base / "cpu" / "results.json")
    data["cells"][1].update(outcome=before)
    (base / "cpu" / "results.json").write_text(json.dumps(data))
    edit(lambda cells: cells[1].update(outcome=after, category="out-of-memory"))
    code, out = gate(base, cur, capsys)
    assert code == 1 and what in out and "gate: FAIL" in out


def test_a_peak_that_became_unmeasured_is_a_regression(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells[0]["measurements"].pop("peak_memory_mib"))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "peak memory no longer measured" in out


def test_new_cells_are_listed_and_fail_the_gate_only_when_they_fail(runs, capsys):
    base, cur, edit = runs
    edit(lambda cells: cells.append({**cells[0], "id": cells[0]["id"] + "-new"}))
    code, out = gate(base, cur, capsys)
    assert code == 0 and "new cell" in out
    edit(lambda cells: cells.append({**cells[0], "id": cells[0]["id"] + "-broken", "outcome": "error"}))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "new cell fails" in out and "-broken" in out


def test_a_new_device_with_a_failing_cell_fails_the_gate(runs, capsys):
    base, cur, _ = runs
    shutil.copytree(cur / "cpu", cur / "t4")
    assert gate(base, cur, capsys)[0] == 0  # a new device whose cells pass is news, not a regression
    data = load_results(cur / "t4" / "results.json")
    data["cells"][0].update(outcome="failed", category="kernel-launch")
    (cur / "t4" / "results.json").write_text(json.dumps(data))
    code, out = gate(base, cur, capsys)
    assert code == 1 and "new cell fails" in out and "kernel-launch" in out


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("damage", ["corrupt", "schema", "missing", "binary", "directory", "no-cells"])
def test_bad_input_exits_2_with_one_paragraph(runs, capsys, damage, side):
    base, cur, _ = runs
    folder = cur if side == "current" else base
    path = folder / "cpu" / "results.json"
    if damage == "corrupt":
        path.write_text("{not json")
    elif damage == "schema":
        data = load_results(path)
        path.write_text(json.dumps({**data, "schema_version": 99}))
    elif damage == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    elif damage == "no-cells":
        path.write_text(json.dumps({"schema_version": 1, "environment": {}, "cells": None}))
    else:
        shutil.rmtree(folder / "cpu")
    code = main(["gate", "--baseline", str(base), "--current", str(cur)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qwen-compat: ") and "Fix:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_baseline_cut_short_is_bad_input_and_a_current_run_cut_short_is_said(runs, capsys):
    base, cur, _ = runs
    whole = (base / "cpu" / "results.json").read_text()
    cut = whole[: whole.rindex('"outcome"')]  # killed while writing the last cell
    (base / "cpu" / "results.json").write_text(cut)
    code = main(["gate", "--baseline", str(base), "--current", str(cur)])
    err = capsys.readouterr().err
    assert code == 2 and "cut short" in err and "Fix:" in err and "Traceback" not in err
    (base / "cpu" / "results.json").write_text(whole)
    (cur / "cpu" / "results.json").write_text(cut)
    code, out = gate(base, cur, capsys)
    assert code == 1 and "results file cut short mid-write" in out and "cell missing" in out


def test_named_baseline_is_found_under_the_current_folder_reports_or_a_store(real_run, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not where the run was: the name is found from --current
    code, out = gate("first", real_run, capsys)
    assert code == 0 and "gate: PASS" in out
    assert main(["gate", "--baseline", "nope", "--current", str(real_run)]) == 2
    assert "saved baselines: first" in capsys.readouterr().err
    current = tmp_path / "current"
    shutil.copytree(real_run / "cpu", current / "cpu")
    assert main(["gate", "--baseline", "first", "--current", str(current)]) == 2  # not under this folder
    capsys.readouterr()
    code, _ = gate("first", current, capsys, "--reports", str(real_run))
    assert code == 0
    store = tmp_path / "store"
    shutil.copytree(real_run / "baselines" / "first", store / "release-1.4")
    code, _ = gate("release-1.4", current, capsys, "--store", str(store))
    assert code == 0


def _as_runner(folder: Path, runner: str) -> None:
    """Make a copied run's results say they came from another runner (what RUNNER_NAME gives)."""
    path = folder / "cpu" / "results.json"
    data = load_results(path)
    data["environment"]["provenance"]["runner"] = runner
    path.write_text(json.dumps(data))


def test_fleet_view_keeps_two_runners_of_one_card_apart(runs, tmp_path, capsys, monkeypatch):
    base, cur, edit = runs
    _as_runner(base, "a10g-runner-1")
    _as_runner(cur, "a10g-runner-2")
    edit(lambda cells: cells[1].update(outcome="failed", category="out-of-memory"))
    job_summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(job_summary))
    assert main(["report", str(base), str(cur), "--out", str(tmp_path / "fleet")]) == 0
    page = (tmp_path / "fleet" / "fleet.html").read_text()
    md = (tmp_path / "fleet" / "fleet.md").read_text()
    header = md.splitlines()[2]
    assert "cpu · a10g-runner-1" in header and "cpu · a10g-runner-2" in header  # two columns, not one sum
    row = next(line for line in md.splitlines() if line.startswith("| tiny-qwen2-5-vl · float32"))
    assert "(../base/cpu/summary.html)" in row and "(../cur/cpu/summary.html)" in row  # each to its own page
    assert "3 passed; peak" in row and "1 failed, 2 passed; peak" in row and "TTFT" in row
    assert (
        'id="plot-all-pass-rate"' in page.replace("'", '"') and "plot-cpu-memory" in page and "plot-cpu-latency" in page
    )
    assert job_summary.read_text().startswith("# qwen-compat fleet")


def test_export_merges_runners_as_csv_json_lines_and_markdown(runs, tmp_path, capsys):
    import csv

    base, cur, _ = runs
    _as_runner(cur, "a10g-runner-2")
    assert main(["export", "--format", "csv", str(base), str(cur), "--out", str(tmp_path / "all.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "all.csv").open()))
    assert len(rows) == 6 and {r["runner"] for r in rows} >= {"a10g-runner-2"}
    assert {"id", "model", "device", "dtype", "attention", "resolution", "input", "quantization", "placement"} <= rows[
        0
    ].keys()
    assert float(rows[0]["peak_mib"]) > 0 and float(rows[0]["ttft_s"]) > 0 and rows[0]["outcome"] == "passed"
    capsys.readouterr()
    assert main(["export", "--format", "jsonl", str(base), str(cur / "cpu")]) == 0  # a device folder works too
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(json.loads(line)["environment"]["device"] == "cpu" for line in lines)
    assert main(["export", "--format", "md", str(cur)]) == 0
    assert capsys.readouterr().out.startswith("| runner | id | model |")
    assert main(["export", "--format", "csv", str(tmp_path / "nowhere")]) == 2


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


def test_workflow_publishes_junit_from_a_venv_with_permissions_and_known_runner_labels():
    import yaml

    from harness.matrix.gpus import table
    from harness.report.results import references_dir

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())
    labels = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert set(labels) == set(table()) - {"cpu"}  # every card and family of the GPU table, and nothing else
    assert workflow["permissions"] == {"contents": "read"} and workflow["concurrency"]["cancel-in-progress"] is False
    matrix, gate_job = workflow["jobs"]["matrix"], workflow["jobs"]["gate"]
    assert set(matrix["strategy"]["matrix"]["gpu"]) <= set(labels)
    assert matrix["permissions"]["checks"] == "write"  # what the JUnit check run needs, and nothing more
    steps = {step.get("name") or step["uses"]: step for step in matrix["steps"]}
    junit = next(step for step in matrix["steps"] if step.get("uses", "").startswith("mikepenz/action-junit-report@"))
    assert junit["with"]["report_paths"] == "reports/*/junit.xml" and junit["if"] == "always()"
    commands = [step["run"] for job in (matrix, gate_job) for step in job["steps"] if "run" in step]
    assert all(".venv/bin/" in c for c in commands if "pytest" in c or "qwen-compat " in c)
    assert "python3 -m venv --system-site-packages .venv" in commands[0]  # the runner's own torch stays
    assert "find_spec('torch')" in next(c for c in commands if "pip install -e ." in c)  # the gate's has none
    upload = steps["Upload reports"]["with"]["path"].split()
    internal = references_dir(Path("reports/v100-16gb")).relative_to("reports").parts[0]
    assert upload[0] == "reports/" and f"!reports/{internal}/" in upload  # the float32 references stay home


NO_TORCH = """
import sys


class NoTorch:  # a machine without torch: what pulls it in cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "accelerate", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a torch-free install)", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
"""


def test_gate_fleet_view_and_export_run_without_torch(runs, tmp_path):
    base, cur, edit = runs
    edit(lambda cells: cells[1].update(outcome="failed", category="out-of-memory"))
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    env.pop("GITHUB_STEP_SUMMARY", None)
    tried = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert tried.returncode != 0 and "blocked: a torch-free install" in tried.stderr  # the blocker is real
    for args, code in (
        (["gate", "--baseline", str(base), "--current", str(cur)], 1),
        (["report", str(base), str(cur), "--out", str(tmp_path / "fleet")], 0),
        (["export", "--format", "csv", str(cur)], 0),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "harness.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == code, done.stderr[-3000:]
        assert "blocked" not in done.stderr


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
