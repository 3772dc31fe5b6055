"""The per-cell shortcuts (benchmarks/test_micro.py measures them) give exactly what the long way gives."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from harness import secrets

FRAGMENTS = [
    "https://",
    "user:pw@",
    "host/x",
    "?token=",
    "&sig=",
    "abc123",
    "hf_",
    "sk-",
    "ghp_",
    "github_pat_",
    "AKIA",
    "Bearer ",
    "A" * 20,
    "0123456789ABCDEF",
    " ",
    "=",
    "@",
    ":",
    "é",
]


def _scrub_text_the_long_way(text: str, found: list[str]) -> str:
    for secret in found:
        text = text.replace(secret, secrets.MASK)
    text = secrets.URL_USERINFO.sub(lambda m: f"{m['scheme']}{secrets.MASK}@", text)
    text = secrets.URL_TOKEN_PARAM.sub(lambda m: f"{m['key']}{secrets.MASK}", text)
    return secrets.TOKEN_SHAPES.sub(secrets.MASK, text)


@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=12).map("".join))
def test_scrub_skips_only_the_patterns_a_text_cannot_match(text):
    assert secrets.scrub_text(text, []) == _scrub_text_the_long_way(text, [])
    assert secrets.scrub_text(text, ["abc123"]) == _scrub_text_the_long_way(text, ["abc123"])


def test_a_cells_fingerprint_from_its_given_definition_is_its_own(tiny_cell):
    cell = tiny_cell()
    assert cell.fingerprint(cell.definition()) == cell.fingerprint()
    assert cell.fingerprint() != dataclasses.replace(cell, prompt="another").fingerprint()


def test_the_reference_key_reads_the_harness_version_once_and_still_tells_versions_apart(tiny_cell, monkeypatch):
    from harness.judge import drift

    cell = tiny_cell()
    key = drift.reference_key(cell, {"source": cell.source})
    assert drift.reference_key(cell, {"source": cell.source}) == key
    monkeypatch.setattr(drift, "_harness_version", lambda: "another")
    assert drift.reference_key(cell, {"source": cell.source}) != key


def test_the_worker_exits_with_status_0_without_the_interpreters_teardown(tiny_cell, tmp_path):
    """It leaves by exec (its folder's removal) after releasing its model: the run's end does not wait on torch's
    teardown."""
    from harness.run.runner import Runner

    runner = Runner(tmp_path)
    assert runner.run(tiny_cell(max_new_tokens=1)).ok
    worker = runner._proc
    runner.close()
    assert worker.returncode == 0


def test_a_videos_plan_from_its_measured_tokens_equals_the_plan_that_runs_the_processor_again(tiny_cell):
    """After a video cell, the plan takes the worker's token count instead of processing the frames once more."""
    from harness.models import checkpoints
    from harness.plan import memory as plan
    from harness.run import inference

    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        processor, model = inference.load(
            str(checkpoints.tiny_checkpoint(family)), dtype="float32", attn_implementation="eager", device="cpu"
        )
        for resolution, max_pixels in (("448x448", None), ("1024x1024", 200704)):
            cell = tiny_cell(family, input="video", resolution=resolution, max_pixels=max_pixels)
            spec = inference.CellInput(kind="video", width=cell.width, height=cell.height, max_pixels=max_pixels)
            measured = inference.prepare(processor, model, spec).visual_tokens
            assert plan.predict(cell, visual_tokens=measured) == plan.predict(cell), (family, resolution)


def test_the_plot_imports_run_on_a_lowest_priority_thread_and_leave_a_failure_to_the_end(monkeypatch):
    """Started when a run begins, they take only idle CPU from the cells; a broken plotting stack raises where the
    summary draws its plots (the main thread), not as a stray thread traceback mid-run."""
    import os
    import sys
    import threading

    from harness.report import plots

    calls, unhandled = [], []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import raises ImportError
    plots.import_in_background()
    for thread in threading.enumerate():
        if thread.name == "qwen-compat-plot-imports":
            thread.join(timeout=30)
    assert unhandled == []
    if sys.platform.startswith("linux"):
        assert len(calls) == 1 and calls[0][0] == os.PRIO_PROCESS and calls[0][2] == 19
        assert calls[0][1] != os.getpid()  # the thread's own id: the process keeps its priority


def _comparable(result) -> tuple:
    """What a verdict is made of, without the timings and memory figures that vary from run to run."""
    text = (result.generation or {}).get("text")
    return (result.ok, result.error_type, result.error_message, result.signal_name, result.worker_started, text)


def test_cells_sent_ahead_give_what_cells_sent_one_at_a_time_give(tiny_cell, tmp_path):
    """Sent ahead, each cell gets the same result, through a sticky CUDA error (a fresh worker next), a crash,
    another family's load, and a cell sent ahead that is then not run (its reply is dropped)."""
    from harness.run.runner import Runner

    def cell(n: int, **fields):
        return dataclasses.replace(tiny_cell(**fields), id=f"cell-{n}")

    cells = [
        cell(1, max_new_tokens=2),
        cell(2, fault={"raise": "CUDA error: an illegal memory access was encountered"}),
        cell(3, max_new_tokens=2),
        cell(4, fault="segfault"),
        cell(5, max_new_tokens=2),
        dataclasses.replace(tiny_cell("qwen3_vl", max_new_tokens=2), id="cell-6"),
    ]
    one_at_a_time = Runner(tmp_path / "a")
    try:
        expected = [_comparable(one_at_a_time.run(c)) for c in cells]
    finally:
        one_at_a_time.close()
    ahead = Runner(tmp_path / "b")
    try:
        got = []
        for this, following in zip(cells, [*cells[1:], None], strict=True):
            got.append(_comparable(ahead.run(this)))
            if following is not None:
                ahead.send_ahead(following)
        assert got == expected
        ahead.send_ahead(cells[0])  # sent ahead, then not run: the run goes on with another cell
        assert _comparable(ahead.run(cells[2])) == expected[2][:4] + (False, expected[2][5])
    finally:
        ahead.close()
    assert [r[0] for r in expected] == [True, False, True, False, True, True]


def test_the_run_sends_the_next_cell_before_reporting_one_and_none_after_a_failure_under_x(
    suite, matrix_file, monkeypatch
):
    from test_reports import SIX_CELLS

    from harness.run.runner import Runner

    sent, waiting = [], []
    send, run = Runner._send, Runner.run

    def send_and_keep(self, message):
        sent.append(message.get("cell", {}).get("id"))
        send(self, message)

    def run_and_see(self, cell):
        waiting.append(self._ahead is not None and self._ahead[0].id == cell.id)
        return run(self, cell)

    monkeypatch.setattr(Runner, "_send", send_and_keep)
    monkeypatch.setattr(Runner, "run", run_and_see)
    path = matrix_file(SIX_CELLS)
    result = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert waiting == [False, True, True, True, True, True]  # each cell after the first was sent ahead
    assert len(sent) == 6 + 1  # one request per cell, and the worker's exit

    sent.clear()
    failing = matrix_file(SIX_CELLS + 'faults:\n  - when: {n: 3}\n    inject: {raise: "boom"}\n', "failing.yaml")
    result = suite.runpytest(
        "--compat-matrix",
        str(failing),
        "--compat-allow-faults",
        "--compat-reports",
        "again",
        "-x",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=2, failed=1)
    assert len(sent) == 3 + 1  # the cells up to the failure, nothing after it, and the exit
