"""The failure catalog classifies every recorded example; `qwen-compat explain` prints it."""

import json

import pytest

from harness.cli import main
from harness.failures import catalog, classify, is_sticky
from harness.matrix import CATEGORIES

ENTRIES = catalog()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_explain_classifies_every_catalog_example(entry, capsys):
    assert main(["explain", entry["example"], "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["matched"] == entry["id"]
    assert found["category"] == entry["category"] in CATEGORIES
    assert found["cause"] and found["remedy"]


def test_unknown_text_is_other_and_keeps_its_first_line(capsys):
    assert main(["explain", "\n  Something odd happened in layer 3\nmore detail\n"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "category: other"
    assert any("Something odd happened in layer 3" in line for line in lines)


def test_explain_reads_a_log_file(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("loading...\nRuntimeError: CUDA error: too many resources requested for launch\n")
    assert main(["explain", str(log)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("category: kernel-launch\n") and "remedy:" in out


def test_specific_entries_win_over_generic_ones():
    text = "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0\ndevice-side assert triggered"
    assert classify(text).category == "numerical"


def test_sticky_errors_are_recognised():
    assert is_sticky("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert not is_sticky("ValueError: Image features and image tokens do not match")
