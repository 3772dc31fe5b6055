"""Reports: JUnit, results.json/.jsonl/.csv per device, written per finished cell, resumable, free of secrets."""

import csv
import json
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.models.families import FAMILIES
from harness.plan import visual_tokens
from harness.report.results import load_results

REPO = Path(__file__).resolve().parents[1]
JENKINS_XSD = Path(__file__).parent / "data" / "junit-10.xsd"  # its source URL is in its first comment


def jenkins_schema_errors(path: Path) -> list[str]:
    """Where a JUnit file breaks the schema Jenkins' xunit plugin validates against."""
    import xmlschema

    return [f"{e.path}: {e.reason}" for e in xmlschema.XMLSchema(JENKINS_XSD).iter_errors(str(path))]


def system_out(case) -> dict[str, str]:
    """A JUnit test case's `key=value` lines."""
    return dict(line.split("=", 1) for line in case.find("system-out").text.splitlines())


def test_default_matrix_cells_report_memory_and_visual_tokens(suite):
    """README command (1), narrowed to one family and one dtype/attention group to keep it quick."""
    result = suite.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "default.yaml"),
        "--compat-reports",
        "reports",
        "-k",
        "tiny-qwen2-vl-cpu-float32-sdpa",
    )
    result.assert_outcomes(passed=8)
    reports = suite.path / "reports" / "cpu"
    cells = load_results(reports / "results.json")["cells"]
    junit = ET.parse(reports / "junit.xml").getroot()
    assert len(cells) == len(junit.findall(".//testcase")) == 8
    assert jenkins_schema_errors(reports / "junit.xml") == []
    outputs = [system_out(case) for case in junit.iter("testcase")]
    assert all({"peak_memory_mib", "visual_tokens", "peak_memory_source"} <= out.keys() for out in outputs)
    assert "None" not in (reports / "junit.xml").read_text()
    lines = (reports / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [c["id"] for c in cells]  # true JSON Lines
    assert json.loads(lines[0])["environment"]["provenance"]["started_utc"].endswith("+00:00")
    rows = list(csv.DictReader((reports / "results.csv").open()))
    assert [r["id"] for r in rows] == [c["id"] for c in cells] and float(rows[0]["peak_mib"]) > 0
    # the run's own files stay outside the folder a CI uploads
    assert sorted(p.name for p in reports.iterdir() if p.name.startswith(".")) == []
    assert list((suite.path / "reports" / ".qwen-compat" / "references" / "cpu").iterdir())
    fam = FAMILIES["qwen2_vl"]
    for cell in cells:
        m = cell["measurements"]
        assert cell["outcome"] == "passed" and m["peak_memory_mib"] > 0 and m["peak_memory_source"] == "worker_rss"
        if cell["input"] == "image":
            w, h = map(int, cell["resolution"].split("x"))
            assert m["visual_tokens"] == visual_tokens.image_tokens(
                h, w, fam.factor, cell["min_pixels"] or fam.min_pixels, cell["max_pixels"] or fam.max_pixels
            )
    for kind in ("image", "video"):
        by_res = {
            c["resolution"]: c["measurements"]["visual_tokens"]
            for c in cells
            if c["input"] == kind and c["max_pixels"] is None
        }
        assert by_res["1024x1024"] > by_res["448x448"], kind
    for name in ("summary.md", "summary.html", "run.json"):
        assert (reports / name).exists()


SIX_CELLS = """
models:
  - tiny: qwen3_vl
devices: [cpu]
axes:
  resolution: [224x224]
  extra:
    n: [1, 2, 3, 4, 5, 6]
defaults:
  max_new_tokens: 2
"""


def test_sigkill_keeps_finished_cells_and_resume_finishes(suite, matrix_file, suite_cmd, wait_for_cells):
    path = matrix_file(SIX_CELLS + "faults:\n  - when: {n: 4}\n    inject: hang\n")
    results = suite.path / "reports" / "cpu" / "results.json"
    proc = subprocess.Popen(
        suite_cmd(suite.path, "--compat-reports", "reports", "--compat-matrix", str(path), "--compat-allow-faults"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=suite.path,
    )
    wait_for_cells(results, 3)  # cell 4 hangs, so the run is surely mid-way once 3 are written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = load_results(results)["cells"]
    assert [c["id"].rsplit("=", 1)[1] for c in kept] == ["1", "2", "3"]
    assert all(c["outcome"] == "passed" for c in kept)

    path.write_text(SIX_CELLS)  # the hang is gone; the rest of the run can finish
    done = subprocess.run(
        suite_cmd(suite.path, "--compat-reports", "reports", "--compat-matrix", str(path), "--compat-resume"),
        cwd=suite.path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    cells = load_results(results)["cells"]
    assert [c["id"].rsplit("=", 1)[1] for c in cells] == ["1", "2", "3", "4", "5", "6"]
    assert cells[:3] == kept  # finished cells were not run again
    assert "3 skipped" in done.stdout and "already done" not in json.dumps(cells)


def test_no_secret_reaches_the_reports_nor_the_job_summary(suite, matrix_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret123")
    monkeypatch.setenv("MY_API_KEY", "secret123")
    job_summary = suite.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(job_summary))
    path = matrix_file(
        SIX_CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2]")
        + "faults:\n  - when: {n: 2}\n    inject: {raise: 'auth failed for token secret123'}\n"
    )
    result = suite.runpytest("--compat-matrix", str(path), "--compat-allow-faults", "--compat-reports", "reports")
    result.assert_outcomes(passed=1, failed=1)
    written = [p for p in (suite.path / "reports").rglob("*") if p.is_file()] + [job_summary]
    assert {"results.json", "results.jsonl", "results.csv", "junit.xml"} <= {p.name for p in written}
    for p in written:
        assert b"secret123" not in p.read_bytes(), p
    said = job_summary.read_text()  # the run's counts and its failing cell, message and remedy
    assert said.startswith("## qwen-compat: cpu") and "passed 1" in said and "failed 1" in said
    failing = next(line for line in said.splitlines() if line.startswith("| tiny-qwen3-vl"))
    assert "n=2" in failing and "auth failed for token ***" in failing


OVERFLOW = """
models:
  - tiny: qwen2_vl
    variant: fp16-overflow
devices: [cpu]
axes:
  dtype: [float32, float16]
  resolution: [224x224]
defaults:
  max_new_tokens: 4
"""


def test_fp16_overflow_ends_as_numerical_in_float16_and_passes_in_float32(suite, matrix_file):
    result = suite.runpytest("--compat-matrix", str(matrix_file(OVERFLOW)), "--compat-reports", "reports")
    result.assert_outcomes(passed=1, failed=1)
    cells = {c["dtype"]: c for c in load_results(suite.path / "reports" / "cpu" / "results.json")["cells"]}
    assert cells["float32"]["outcome"] == "passed"
    assert cells["float16"]["outcome"] == "failed" and cells["float16"]["category"] == "numerical"
    assert "NaN or inf" in cells["float16"]["message"] or "drift" in cells["float16"]["message"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def synthetic_results(folder: Path, outcomes=("passed", "passed", "failed")) -> Path:
    """A device folder with a results.json of cells of the given outcomes, as a run writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, outcome in enumerate(outcomes):
        tokens = [256, 1369, 2809, 4096, 64, 100, 144][i % 7]
        failing = outcome in ("failed", "error", "xfailed", "xpassed-strict")
        records.append(
            {
                "id": f"tiny-qwen2-vl-cpu-float32-sdpa-{i}",
                "test": f"suites/test_inference.py::test_cell[tiny-qwen2-vl-cpu-float32-sdpa-{i}]",
                "model": "tiny-qwen2-vl" if i % 2 == 0 else "tiny-qwen3-vl",
                "family": "qwen2_vl" if i % 2 == 0 else "qwen3_vl",
                "device": "cpu",
                "dtype": "float32",
                "attn_implementation": "sdpa",
                "resolution": f"{448 + i}x448",
                "input": "image",
                "min_pixels": None,
                "max_pixels": None,
                "backend": "transformers",
                "placement": "single",
                "outcome": outcome,
                "category": "out-of-memory" if failing else None,
                "message": "CUDA out of memory. Tried to allocate 2.00 GiB\x1b[0m" if failing else "",
                "remedy": "lower max_pixels" if failing else "",
                "duration_s": 1.25 + i,
                "stderr_tail": "Traceback (most recent call last):\n  torch.OutOfMemoryError" if failing else "",
                "measurements": {
                    "peak_memory_mib": 800.0 + tokens,
                    "peak_memory_source": "worker_rss",
                    "visual_tokens": tokens,
                    "prefill_s": tokens / 1e4,
                    "latency": {"prefill_s": {"median": tokens / 1e4, "n": 3}},
                },
                "prediction": {"predicted_peak_mib": 900.0 + tokens, "budget_mib": 4096.0},
            }
        )
    env = {
        "device": "cpu",
        "gpu_name": "cpu",
        "torch": "x",
        "transformers": "y",
        "flash_attn": "absent",
        "vllm": "absent",
        "python": "3.11",
        "host": "runner-host",
        "matrix_file": "m.yaml",
        "provenance": {
            "started_utc": "2026-12-01T02:00:00+00:00",
            "git_commit": "0123456789abcdef0123",
            "git_dirty": True,
            "ci_run_url": "https://github.com/o/r/actions/runs/1",
            "runner": "gpu-runner-1",
            "image": None,
            "image_digest": None,
        },
    }
    path = folder / "results.json"
    path.write_text(json.dumps({"schema_version": 1, "environment": env, "cells": records}))
    return path


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install chromium); .ci/run installs it")
def test_summary_html_renders_grid_and_plots_in_chromium(tmp_path):
    from harness.report.summary import write_summaries

    reports = tmp_path / "cpu"
    synthetic_results(reports)
    write_summaries(reports)
    dom = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            (reports / "summary.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('class="cell passed"') == 2 and dom.count('class="cell failed"') == 1
    assert "out-of-memory" in dom and "lower max_pixels" in dom and "CUDA out of memory" in dom
    origin = dom[dom.index('id="origin"') :]
    assert origin.index("2026-12-01T02:00:00") < origin.index("commit 0123456789ab (dirty)") < origin.index("host")
    assert 'href="#tail-0"' in dom and "torch.OutOfMemoryError" in dom  # the failing cell links to its stderr
    assert 'id="plot-memory"' in dom and 'id="plot-latency"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (reports / "summary.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000  # a rendered page with images, not a blank one


def test_a_results_file_cut_mid_line_keeps_its_whole_lines(tmp_path):
    from harness.report.results import ResultsFile

    results = ResultsFile(tmp_path / "results.json")
    results.start({"device": "cpu"}, resume=False)
    for i in range(3):
        results.append({"id": f"c{i}", "outcome": "passed"})
    assert [c["id"] for c in load_results(results.path)["cells"]] == ["c0", "c1", "c2"]
    text = results.path.read_text()
    results.path.write_text(text[: text.index('"c2"') + 6])  # killed while writing the third line
    assert [c["id"] for c in load_results(results.path)["cells"]] == ["c0", "c1"]


def test_summary_states_how_well_the_plan_predicted():
    from harness.report.summary import plan_accuracy

    cells = [
        {"measurements": {"peak_memory_mib": 1000.0}, "prediction": {"predicted_peak_mib": 1100.0}},
        {"measurements": {"peak_memory_mib": 1000.0}, "prediction": {"predicted_peak_mib": 950.0}},
        {"measurements": {}, "prediction": None},
    ]
    assert plan_accuracy(cells) == "memory plan vs measured: mean |error| 7.5%, worst +10.0% over 2 cells"


def test_collect_only_keeps_the_reports_of_an_earlier_run(suite, matrix_file):
    earlier = suite.path / "reports" / "cpu" / "results.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"schema_version": 1, "environment": {}, "cells": [\n{"id": "kept"}\n]}\n')
    result = suite.runpytest(
        "--compat-matrix", str(matrix_file(SIX_CELLS)), "--compat-reports", "reports", "--collect-only"
    )
    assert result.ret == 0
    assert load_results(earlier)["cells"] == [{"id": "kept"}]


def test_junit_of_every_outcome_validates_against_jenkins_schema_and_properties_are_opt_in(tmp_path):
    from harness.report.junit import JUnitOptions, junit_xml

    outcomes = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "xpassed-strict")
    data = load_results(synthetic_results(tmp_path / "cpu", outcomes))
    path = tmp_path / "junit.xml"
    path.write_text(junit_xml(data))
    assert jenkins_schema_errors(path) == []
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite.get("name") == "qwen-compat cpu on gpu-runner-1"  # the device and the runner
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "7",
        "2",
        "1",
        "2",
    )
    cases = suite.findall("testcase")
    assert cases[0].get("classname") == "suites.test_inference" and cases[0].get("name").startswith("test_cell[")
    assert [c.tag for c in cases[1] if c.tag != "system-out"] == ["failure"]
    assert "lower max_pixels" in cases[1].find("failure").text and "\\x1b" in cases[1].find("failure").text
    assert system_out(cases[0])["peak_memory_mib"] == "1056.0" and "category" not in system_out(cases[0])
    assert "None" not in path.read_text()

    named = JUnitOptions(suite_name="nightly", prefix="gpu", properties=True)
    path.write_text(junit_xml(data, named))
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite.get("name") == "nightly" and suite.find("testcase").get("classname") == "gpu.suites.test_inference"
    errors = jenkins_schema_errors(path)  # the check is real: test-case properties break the schema
    assert len(errors) == len(outcomes) and all("properties" in e for e in errors)


def test_junitxml_gets_its_own_file_and_no_temporary_path_is_printed(suite, matrix_file):
    path = matrix_file(SIX_CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2]"))
    result = suite.runpytest(
        "--compat-matrix",
        str(path),
        "--compat-reports",
        "reports",
        "--junitxml",
        "ci/junit.xml",
        "-o",
        "junit_suite_name=nightly",
        "--junit-prefix",
        "cards",
    )
    result.assert_outcomes(passed=2)
    ours = suite.path / "reports" / "cpu" / "junit.xml"
    assert jenkins_schema_errors(ours) == [] and jenkins_schema_errors(suite.path / "ci" / "junit.xml") == []
    suite_element = ET.parse(ours).getroot().find("testsuite")
    assert suite_element.get("name") == "nightly" and len(suite_element.findall("testcase")) == 2
    assert all(c.get("classname").startswith("cards.") for c in suite_element.iter("testcase"))
    printed = [
        line.split("generated xml file: ")[1].rstrip(" -") for line in result.outlines if "generated xml" in line
    ]
    assert printed and all(Path(p).exists() for p in printed)  # every path pytest names is still there
    alone = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "again")
    assert not [line for line in alone.outlines if "generated xml file" in line]
    assert (suite.path / "again" / "cpu" / "junit.xml").exists()


def test_json_lines_survive_a_torn_line_and_a_resumed_run_cuts_it(tmp_path):
    from harness.report.results import ResultsFile, read_json_lines

    results = ResultsFile(tmp_path / "cpu" / "results.json")
    results.start({"device": "cpu"}, resume=False)
    for i in range(3):
        results.append({"id": f"c{i}", "outcome": "passed"})
    lines = results.lines.path
    assert [r["id"] for r in read_json_lines(lines)] == ["c0", "c1", "c2"]
    assert all(r["environment"] == {"device": "cpu"} for r in read_json_lines(lines))
    lines.write_bytes(lines.read_bytes() + b'{"id": "c3", "outc')  # killed mid-line
    assert [r["id"] for r in read_json_lines(lines)] == ["c0", "c1", "c2"]
    resumed = ResultsFile(results.path)
    resumed.start({"device": "cpu", "resumed": True}, resume=True)
    resumed.append({"id": "c3", "outcome": "passed"})
    text = lines.read_text()
    assert [json.loads(line)["id"] for line in text.splitlines()] == ["c0", "c1", "c2", "c3"]
    assert json.loads(text.splitlines()[-1])["environment"]["resumed"] is True


def test_provenance_names_commit_dirty_tree_ci_run_runner_and_image(tmp_path):
    from harness.report.provenance import provenance

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "m.yaml").write_text("models: []\n")
    subprocess.run([*git, "add", "m.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    ci = {
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "org/repo",
        "GITHUB_RUN_ID": "42",
        "GITHUB_RUN_ATTEMPT": "2",
        "RUNNER_NAME": "a10g-runner-2",
        "QWEN_COMPAT_IMAGE": "ghcr.io/org/qwen-compat:2026.12",
        "QWEN_COMPAT_IMAGE_DIGEST": "sha256:abc",
    }
    found = provenance(tmp_path, ci)
    assert found["git_commit"] == head and found["git_dirty"] is False
    assert found["ci_run_url"] == "https://github.com/org/repo/actions/runs/42/attempts/2"
    assert (found["runner"], found["image"], found["image_digest"]) == (ci["RUNNER_NAME"], *list(ci.values())[-2:])
    assert found["started_utc"].endswith("+00:00")
    (tmp_path / "m.yaml").write_text("models: [changed]\n")
    assert provenance(tmp_path, {})["git_dirty"] is True
    elsewhere = provenance(tmp_path / "none", {"GITHUB_SHA": "f" * 40})  # no git tree: what CI says it built
    assert elsewhere["git_commit"] == "f" * 40 and elsewhere["ci_run_url"] is None
