"""Matrix files: schema, expansion into cells, markers, and one-paragraph errors for bad input."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness.errors import UserError
from harness.matrix import cells
from harness.matrix import schema as matrix

REPO = Path(__file__).resolve().parents[1]
MATRICES = sorted((REPO / "matrices").glob("*.yaml"))

GOOD = """
models:
  - tiny: qwen2_vl
devices: [cpu]
axes:
  dtype: [float32, bfloat16]
  resolution: [448x448]
"""


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: p.name)
def test_shipped_matrices_validate_against_the_exported_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), matrix.schema())
    assert cells.expand(matrix.load(path), str(path))


def test_schema_command_prints_json_schema(capsys):
    from harness.cli import main

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "qwen-compat matrix" and "models" in schema["properties"]


def test_ids_are_readable_and_deterministic():
    m = matrix.load(REPO / "matrices" / "nightly.yaml")
    first = [c.id for c in cells.expand(m, "nightly.yaml")]
    assert first == [c.id for c in cells.expand(m, "nightly.yaml")]
    assert "qwen2-vl-7b-v100-float16-sdpa-1024x1024" in first
    assert len(first) == len(set(first))
    assert all(re.fullmatch(r"[a-z0-9.=_-]+", i) for i in first)


def test_pixel_budget_accepts_qwen_style_products():
    m = matrix.Matrix.model_validate(yaml.safe_load(GOOD + "  pixel_budget: [{max_pixels: 800*28*28}]\n"))
    assert m.axes.pixel_budget[0].max_pixels == 800 * 28 * 28


def test_selectors_written_as_the_axes_are_match_the_cells():
    text = GOOD + "  pixel_budget: [null, {max_pixels: 800*28*28}]\n"
    text += "expect:\n  - when: {max_pixels: 800*28*28}\n    outcome: skip\n    reason: budgeted\n"
    text += 'exclude:\n  - when: {max_pixels: ["256 * 28 * 28"]}\n'
    m = matrix.Matrix.model_validate(yaml.safe_load(text))
    expanded = cells.expand(m, "m.yaml")
    budgeted = [c for c in expanded if c.max_pixels == 800 * 28 * 28]
    assert budgeted and all(c.expectation.outcome == "skip" for c in budgeted)
    assert all(c.expectation.outcome == "pass" for c in expanded if c.max_pixels is None)


def test_a_section_overrides_the_defaults_it_names():
    text = GOOD + "defaults: {max_new_tokens: 4, repeats: 3}\n"
    text += "sections:\n  - models: [{tiny: qwen3_vl}]\n    defaults: {repeats: 5, load_timeout_s: 60}\n"
    expanded = cells.expand(matrix.Matrix.model_validate(yaml.safe_load(text)), "m.yaml")
    top = next(c for c in expanded if c.family == "qwen2_vl")
    section = next(c for c in expanded if c.family == "qwen3_vl")
    assert (top.repeats, top.max_new_tokens, top.load_timeout_s) == (3, 4, 1800)
    assert (section.repeats, section.max_new_tokens, section.load_timeout_s) == (5, 4, 60)


def test_exclude_and_expect_rules_apply():
    text = (
        GOOD
        + """
exclude:
  - when: {dtype: bfloat16}
expect:
  - when: {family: qwen2_vl}
    outcome: xfail
    category: numerical
    reason: known
"""
    )
    m = matrix.Matrix.model_validate(yaml.safe_load(text))
    out = cells.expand(m, "m.yaml")
    assert [c.dtype for c in out] == ["float32"]
    assert out[0].expectation.outcome == "xfail" and out[0].expectation.categories == ["numerical"]


def test_run_order_groups_cells_that_share_a_model():
    m = matrix.load(REPO / "matrices" / "default.yaml")
    ordered = cells.run_order([c for c in cells.expand(m, "d") if c.device == "cpu"])
    groups = [c.group for c in ordered]
    changes = sum(1 for a, b in zip(groups, groups[1:], strict=False) if a != b)
    assert changes == len(set(groups)) - 1  # each group is contiguous: one load per group
    assert ordered[0].dtype == "float32"


# --- bad input: one paragraph naming file, line, key and fix; never a traceback ---------------------

BAD = {
    "malformed": ("models:\n  - tiny: qwen2_vl\n devices: [cpu]\n", ["not valid YAML", "line 3"]),
    "unknown-key": (GOOD + "axis: {}\n", ["unknown key 'axis'", "did you mean 'axes'", "line 8"]),
    "unknown-nested-key": (GOOD.replace("dtype:", "dtypes:"), ["unknown key 'dtypes'", "did you mean 'dtype'"]),
    "wrong-type": (GOOD + "defaults:\n  max_new_tokens: many\n", ["defaults.max_new_tokens", "line 9", "'many'"]),
    "unknown-device": (GOOD.replace("[cpu]", "[V100]"), ["unknown device 'V100'", "did you mean 'v100'", "line 4"]),
    "unknown-family": (GOOD.replace("qwen2_vl", "qwen9_vl"), ["unknown tiny family 'qwen9_vl'", "line 3"]),
    "unknown-model": (
        GOOD.replace("tiny: qwen2_vl", "arch: Qwen2-VL-7B-Instruk"),
        ["unknown architecture 'Qwen2-VL-7B-Instruk'", "did you mean 'Qwen2-VL-7B-Instruct'"],
    ),
    "selector-no-axis": (
        GOOD + "expect:\n  - when: {dtpye: float32}\n    outcome: skip\n",
        ["names no axis: 'dtpye'", "did you mean 'dtype'", "line 9"],
    ),
    "zero-cells": (GOOD + "exclude:\n  - when: {model: tiny-qwen2-vl}\n", ["zero cells", "key 'exclude'"]),
    "faults-without-flag": (
        GOOD + "faults:\n  - when: {dtype: float32}\n    inject: hang\n",
        ["--compat-allow-faults"],
    ),
    "resolution-0x0-quoted": (
        GOOD.replace("[448x448]", '["0x0"]'),
        ["both sides must be at least 1", "line 7", "axes.resolution"],
    ),
    "resolution-0x0-unquoted": (GOOD.replace("[448x448]", "[0x0]"), ["a resolution is WIDTHxHEIGHT", "hexadecimal"]),
    "resolution-aspect-ratio": (GOOD.replace("[448x448]", "[20000x28]"), ["aspect ratio over 200"]),
    "resolution-too-large": (
        GOOD.replace("[448x448]", "[100000x100000]"),
        ["larger than the harness builds", "at most 16384 pixels a side", "line 7", "axes.resolution", "max_pixels"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_matrix_is_one_paragraph(pytester, matrix_file, case):
    text, expected = BAD[case]
    path = matrix_file(text)
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    result = pytester.runpytest("--compat-matrix", str(path), "--collect-only", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "Traceback" not in output
    for needle in expected:
        assert needle in output, output
    assert str(path) in output and "Fix:" in output


def test_an_unknown_gpu_warns_with_the_row_to_add():
    from harness.devices import host as device

    with pytest.warns(UserWarning) as caught:
        host = device._host_from("NVIDIA B200", "10.0", 183_359, "580.1", "13.0", "nvml")
    text = str(caught[0].message)
    assert host.key == "unknown"
    assert "NVIDIA B200" in text and "10.0" in text and "nvml_names: ['NVIDIA B200']" in text and "gpus.yaml" in text


def test_a_known_gpu_is_found_by_its_nvml_name():
    from harness.devices import host as device

    assert device._host_from("Tesla V100-SXM2-32GB", "7.0", 32_510, "535", "12.2", "nvml").key == "v100-32gb"
    assert device._host_from("Tesla V100-SXM2-16GB", "7.0", 16_160, "535", "12.2", "nvml").key == "v100-16gb"
    assert device._host_from("NVIDIA GeForce RTX 4090 D", "8.9", 24_564, "550", "12.4", "nvml").key == "rtx4090"
    assert device._host_from("NVIDIA A10G", "8.6", 23_028, "550", "12.4", "nvml").key == "a10g"


def test_missing_matrix_file_names_the_option(tmp_path):
    with pytest.raises(UserError) as err:
        matrix.load(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value) and "--compat-matrix" in str(err.value)


def test_hub_model_without_a_recognisable_family_asks_for_one(tmp_path):
    m = matrix.Matrix.model_validate(yaml.safe_load("models:\n  - hub: someone/mystery-model\n"))
    with pytest.raises(UserError) as err:
        cells.expand(m, "m.yaml")
    assert "add `family:`" in str(err.value)


# --- markers and devices -----------------------------------------------------------------------


def test_dash_m_v100_collects_only_v100_cells(pytester):
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    result = pytester.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "nightly.yaml"),
        "--compat-device",
        "v100",
        "-m",
        "v100",
        "--collect-only",
        "-q",
        "--strict-markers",
    )
    ids = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert ids and all("-v100-" in line for line in ids)
    assert not any("-v100-16gb-" in line or "-t4-" in line for line in ids)


def test_a_selection_of_another_cards_cells_fails_instead_of_passing_having_run_nothing(pytester):
    """On this machine (no GPU), --device auto finds the CPU: `-m v100` deselects every cell (none is
    reported as a skip) and the run exits non-zero with one paragraph naming both cards and the marker."""
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    result = pytester.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "nightly.yaml"),
        "--compat-device",
        "auto",
        "-m",
        "v100 and float16",
        "-k",
        "sdpa",
        "-rs",
        "--compat-reports",
        str(pytester.path / "r"),
    )
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "nothing to run on this host. It is cpu" in out and "target v100 (" in out and "-m this_host" in out
    assert "skipped" not in out and "Traceback" not in out
    assert not (pytester.path / "r").exists()


def test_all_markers_are_registered(pytester):
    pytester.makepyfile(test_s="def test_cell(cell):\n    pass\n")
    result = pytester.runpytest(
        "--compat-matrix",
        str(REPO / "matrices" / "default.yaml"),
        "--compat-device",
        "cpu",
        "--collect-only",
        "-q",
        "--strict-markers",
        "-m",
        "qwen3_vl_moe and bfloat16 and cpu",
    )
    assert result.ret == 0
    assert all("tiny-qwen3-vl-moe-cpu-bfloat16" in line for line in result.stdout.lines if "::" in line)
