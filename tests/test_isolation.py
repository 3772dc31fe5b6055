"""Isolated workers: a segfault, a hang and a sticky CUDA error each end one cell, never the run."""

import json

FIVE_CELLS = """
models:
  - tiny: qwen2_vl
devices: [cpu]
axes:
  resolution: [224x224]
  extra:
    case: [1, 2, 3, 4, 5]
defaults:
  max_new_tokens: 2
  timeout_s: 10
faults:
  - when: {case: 2}
    inject: segfault
  - when: {case: 3}
    inject: hang
  - when: {case: 4}
    inject: {raise: "CUDA error: too many resources requested for launch"}
"""


def test_faults_end_one_cell_each_and_the_model_is_not_reloaded_per_cell(suite, matrix_file):
    path = matrix_file(FIVE_CELLS)
    result = suite.runpytest(
        "--compat-matrix", str(path), "--compat-allow-faults", "--compat-reports", "reports", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2, failed=3)
    data = json.loads((suite.path / "reports" / "cpu" / "results.json").read_text())
    by_case = {c["id"].rsplit("case=", 1)[1]: c for c in data["cells"]}
    assert sorted(by_case) == ["1", "2", "3", "4", "5"]
    assert by_case["1"]["outcome"] == by_case["5"]["outcome"] == "passed"
    expected = {"2": "crash", "3": "timeout", "4": "kernel-launch"}
    for case, category in expected.items():
        cell = by_case[case]
        assert cell["outcome"] == "failed" and cell["category"] == category, cell
        assert cell["remedy"]
    assert by_case["2"]["exit"]["signal"] == "SIGSEGV"
    assert "Segmentation fault" in by_case["2"]["stderr_tail"]
    run = json.loads((suite.path / "reports" / "cpu" / "run.json").read_text())
    assert 1 <= run["model_loads"] < 5
    assert "model loads: " in result.stdout.str()


def test_faults_are_refused_without_the_flag(suite, matrix_file):
    result = suite.runpytest("--compat-matrix", str(matrix_file(FIVE_CELLS)), "--collect-only")
    assert result.ret != 0
    assert "--compat-allow-faults" in result.stdout.str() + result.stderr.str()


def test_a_worker_that_cannot_import_torch_says_what_to_install(tmp_path):
    import pytest

    from harness.matrix.cells import expand
    from harness.matrix.schema import Matrix
    from harness.run.runner import Runner

    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    cell = expand(Matrix.model_validate({"models": [{"tiny": "qwen2_vl"}]}), "m.yaml")[0]
    runner = Runner(tmp_path / "refs", env={"PYTHONPATH": str(shadow)})
    for _ in range(2):  # the second cell gets the same answer at once, without another start
        with pytest.raises(RuntimeError) as err:
            runner.run(cell)
        assert "missing-package" in str(err.value) and "pip install -e '.[torch]'" in str(err.value)
    assert runner.starts == 1
    runner.close()


ABORT_AND_OOM = """
models:
  - tiny: qwen3_vl
devices: [cpu]
axes:
  resolution: [224x224]
  extra:
    case: [abort, oom, after]
defaults:
  max_new_tokens: 2
faults:
  - when: {case: abort}
    inject: abort
  - when: {case: oom}
    inject: oom
"""


def test_abort_is_a_crash_and_an_allocation_failure_is_out_of_memory(suite, matrix_file):
    result = suite.runpytest(
        "--compat-matrix", str(matrix_file(ABORT_AND_OOM)), "--compat-allow-faults", "--compat-reports", "reports"
    )
    result.assert_outcomes(passed=1, failed=2)
    cells = {
        c["id"].rsplit("=", 1)[1]: c
        for c in json.loads((suite.path / "reports" / "cpu" / "results.json").read_text())["cells"]
    }
    assert cells["abort"]["category"] == "crash" and cells["abort"]["exit"]["signal"] == "SIGABRT"
    assert cells["oom"]["category"] == "out-of-memory" and "lower max_pixels" in cells["oom"]["remedy"].lower()
    assert cells["after"]["outcome"] == "passed"


def test_the_pytest_process_never_imports_torch(suite, matrix_file):
    """Cells run in the worker; collection, verdicts and reports stay torch-free (no CUDA context)."""
    suite.makeconftest(
        "import sys\n"
        "def pytest_sessionfinish(session):\n"
        "    open('torch-imported.txt', 'w').write(str('torch' in sys.modules))\n"
    )
    path = matrix_file("models: [{tiny: qwen2_vl}]\naxes: {resolution: [224x224]}\ndefaults: {max_new_tokens: 2}\n")
    result = suite.runpytest_subprocess("--compat-matrix", str(path), "--compat-reports", "reports")
    result.assert_outcomes(passed=1)
    assert (suite.path / "torch-imported.txt").read_text() == "False"


def test_two_replies_arriving_together_are_both_read(tmp_path, tiny_cell):
    """A fast cell's reply can arrive in the same read as the "loaded" event; it must not wait out
    the cell's timeout in a buffer that select() cannot see."""
    import sys
    import time

    from harness.run.runner import Runner

    fake_worker = (
        "import json, sys\n"
        "print(json.dumps({'event': 'ready'}), flush=True)\n"
        "sys.stdin.readline()\n"
        "reply = {'ok': True, 'generation': {'new_token_ids': [1, 2]}, 'measurements': {}}\n"
        "sys.stdout.write(json.dumps({'event': 'loaded'}) + '\\n' + json.dumps(reply) + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
    )
    runner = Runner(tmp_path)
    runner.command = [sys.executable, "-c", fake_worker]
    start = time.monotonic()
    result = runner.run(tiny_cell(timeout_s=20))
    assert result.ok and result.model_loaded and not result.timed_out
    assert time.monotonic() - start < 10
    runner.close()


SLOW_LOADER = """
import json, sys, time
out = sys.stdout
def emit(m):
    out.write(json.dumps(m) + "\\n"); out.flush()
emit({"event": "ready", "pid": 0})
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "exit":
        break
    time.sleep(1.5)  # the set-up before a load, as the real worker has it: imports, the memory plan
    emit({"event": "loading"})
    time.sleep(1.5)  # a model load longer than the cell's inference timeout
    emit({"event": "loaded"})
    emit({"event": "cell"})
    emit({"ok": True, "generation": {"new_token_ids": [1, 2], "text": "ab", "nonfinite_steps": []},
          "measurements": {"peak_memory_mib": 10.0, "peak_memory_source": "worker_rss"}})
"""


def test_loading_has_its_own_limit_and_the_cell_timeout_covers_inference_only(tmp_path, tiny_cell):
    import sys

    from harness.judge.verdict import judge
    from harness.run.runner import Runner

    script = tmp_path / "slow_loader.py"
    script.write_text(SLOW_LOADER)
    runner = Runner(tmp_path / "refs")
    runner.command = [sys.executable, str(script)]
    try:
        loaded = runner.run(tiny_cell(timeout_s=1.0, load_timeout_s=30))
        assert loaded.ok and loaded.model_loaded  # 3 s of set-up and loading are not charged to the 1 s timeout
        timed_out = runner.run(tiny_cell(timeout_s=30, load_timeout_s=0.5))
    finally:
        runner.close()
    assert timed_out.timed_out and timed_out.load_timed_out
    assert "load_timeout_s of 0.5 s" in timed_out.error_message
    verdict = judge(tiny_cell(), timed_out)
    assert verdict.category == "timeout" and verdict.matched == "load-timeout" and "load_timeout_s" in verdict.remedy


def _offloaded_hang(tiny_cell, timeout_s: float):
    """A cell whose weights are partly on disk (offloaded into the worker's temporary folder) and which then hangs
    (its timeout also covers the planning before the load: it must not run out before the folder exists)."""
    return tiny_cell(placement={"max_memory": {"cpu": "0.4MiB"}}, fault="hang", timeout_s=timeout_s, max_new_tokens=2)


def test_a_worker_killed_at_its_timeout_leaves_no_offload_or_temporary_folder(tmp_path, tiny_cell, monkeypatch):
    import tempfile

    from harness.run.runner import Runner

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    runner = Runner(tmp_path / "refs")
    try:
        result = runner.run(_offloaded_hang(tiny_cell, timeout_s=30))
    finally:
        runner.close()
    assert result.timed_out
    assert not list(scratch.rglob("qwen-compat-offload-*")) and not list(scratch.glob("qwen-compat-worker-*"))


def test_a_worker_whose_parent_is_killed_removes_its_temporary_folder(tmp_path, tiny_cell):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cell = _offloaded_hang(tiny_cell, timeout_s=600)  # killed long before
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from harness.matrix.cells import Cell\n"
            "from harness.run.runner import Runner\n"
            f"Runner({str(tmp_path / 'refs')!r}).run(Cell.from_dict(json.loads(sys.argv[1])))\n",
            json.dumps(cell.to_dict()),
        ],
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    deadline = time.monotonic() + 120
    while not list(scratch.rglob("qwen-compat-offload-*")):  # the worker has loaded, offloading to its folder
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60  # its own allowance: the load above may have used most of the first
    while list(scratch.iterdir()):  # the orphaned worker notices within a second and removes its folder, whole
        assert time.monotonic() < deadline, list(scratch.rglob("*"))
        time.sleep(0.2)


ORPHAN_STILL_WRITING = """
import itertools, os, sys
from harness.run.worker import _exit_with_parent

_exit_with_parent()
print("watching", flush=True)
for i in itertools.count():  # as a model still offloading: files keep appearing in the folder
    folder = os.path.join(os.environ["TMPDIR"], f"offload-{i % 20}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"weight-{i}"), "wb") as f:
        f.write(bytes(4096))
"""


def test_an_orphaned_worker_still_writing_into_its_folder_leaves_none_of_it(tmp_path):
    """The removal must not race the worker's own writes (it did: a file written behind rmtree kept the folder)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from harness.run.worker import WORKER_TMP_PREFIX

    own = tmp_path / f"{WORKER_TMP_PREFIX}orphan"
    own.mkdir()
    parent = subprocess.Popen(  # stands for the runner: starts the writer, then is killed
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', sys.argv[1]])\ntime.sleep(600)\n",
            ORPHAN_STILL_WRITING,
        ],
        env={**os.environ, "TMPDIR": str(own)},
        cwd=os.getcwd(),
    )
    deadline = time.monotonic() + 60
    while not list(own.rglob("weight-*")):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)  # writing at full speed
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while own.exists():
        assert time.monotonic() < deadline, sorted(str(p.relative_to(own)) for p in own.rglob("*"))[:5]
        time.sleep(0.1)


def test_a_worker_removes_its_folder_however_its_input_ends(tmp_path):
    """A parent killed mid-cell ends the worker's stdin (or breaks its pipe) before the worker is reparented: the
    worker's own end, not only its watch on the parent, must take the folder."""
    import os
    import subprocess
    import sys

    from harness.run.worker import WORKER_TMP_PREFIX

    own = tmp_path / f"{WORKER_TMP_PREFIX}ends"
    own.mkdir()
    (own / "qwen-compat-offload-x").mkdir()
    (own / "qwen-compat-offload-x" / "weight").write_bytes(bytes(16))
    worker = subprocess.Popen(
        [sys.executable, "-m", "harness.run.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(own)},
    )
    assert b'"ready"' in worker.stdout.readline()
    worker.stdin.close()  # no "exit": as the pipe of a parent that was killed
    assert worker.wait(timeout=60) == 0 and not own.exists()
    worker.stdout.close()
