"""Reports: JUnit + results.json per device, written per finished cell, resumable, free of secrets."""

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
    props = {p.get("name") for p in junit.iter("property")}
    assert {"peak_memory_mib", "visual_tokens", "peak_memory_source"} <= props
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


def test_no_secret_reaches_the_reports(suite, matrix_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret123")
    monkeypatch.setenv("MY_API_KEY", "secret123")
    path = matrix_file(
        SIX_CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2]")
        + "faults:\n  - when: {n: 2}\n    inject: {raise: 'auth failed for token secret123'}\n"
    )
    result = suite.runpytest("--compat-matrix", str(path), "--compat-allow-faults", "--compat-reports", "reports")
    result.assert_outcomes(passed=1, failed=1)
    written = [p for p in (suite.path / "reports").rglob("*") if p.is_file()]
    assert any(p.name == "results.json" for p in written)
    for p in written:
        assert b"secret123" not in p.read_bytes(), p


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


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install chromium); .ci/run installs it")
def test_summary_html_renders_grid_and_plots_in_chromium(tmp_path):
    from harness.report.summary import write_summaries

    reports = tmp_path / "cpu"
    reports.mkdir()
    records = []
    for i, (outcome, tokens) in enumerate([("passed", 256), ("passed", 1369), ("failed", 2809)]):
        records.append(
            {
                "id": f"tiny-qwen2-vl-cpu-float32-sdpa-{i}",
                "model": "tiny-qwen2-vl",
                "family": "qwen2_vl",
                "device": "cpu",
                "dtype": "float32",
                "attn_implementation": "sdpa",
                "resolution": f"{448 + i}x448",
                "input": "image",
                "min_pixels": None,
                "max_pixels": None,
                "outcome": outcome,
                "category": "out-of-memory" if outcome == "failed" else None,
                "remedy": "lower max_pixels" if outcome == "failed" else "",
                "measurements": {
                    "peak_memory_mib": 800.0 + tokens,
                    "peak_memory_source": "worker_rss",
                    "visual_tokens": tokens,
                    "prefill_s": tokens / 1e4,
                },
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
        "matrix_file": "m.yaml",
    }
    (reports / "results.json").write_text(json.dumps({"schema_version": 1, "environment": env, "cells": records}))
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
    assert "out-of-memory" in dom and "lower max_pixels" in dom
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
