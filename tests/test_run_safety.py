"""Reports survive what a CI runner does to them: informational invocations, concurrent runs, a full
disk, SIGTERM, resume after a torn write or a changed matrix, colliding ids, planted secrets."""

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest
from test_reports import SIX_CELLS

from harness.report.results import load_results

REPO = Path(__file__).resolve().parents[1]

CELLS = SIX_CELLS  # six tiny Qwen3-VL cells at 224x224, two new tokens each


def _earlier_run(folder: Path) -> Path:
    results = folder / "reports" / "cpu" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"schema_version": 1, "environment": {}, "cells": [\n{"id": "kept", "outcome": "passed"}\n]}\n')
    return results


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--markers"], ["--fixtures"], ["-k", "no-such-cell"], ["--collect-only"]],
    ids=["help", "markers", "fixtures", "empty-k", "collect-only"],
)
def test_nothing_but_a_real_run_touches_reports_or_starts_a_worker(suite, matrix_file, monkeypatch, args):
    """Informational runs start nothing; a run that selection empties (`-k` matching no cell) has started
    its worker during collection, and stops it before sending it anything."""
    from harness.run.runner import Runner

    results = _earlier_run(suite.path)
    before = results.read_bytes()
    spawned, sent = [], []
    spawn, send = Runner._spawn, Runner._send

    def spawn_and_keep(self):
        spawn(self)
        spawned.append((self._proc, Path(self._tmp)))

    def send_and_keep(self, message):
        sent.append(message["op"])
        send(self, message)

    monkeypatch.setattr(Runner, "_spawn", spawn_and_keep)
    monkeypatch.setattr(Runner, "_send", send_and_keep)
    suite.runpytest("--compat-matrix", str(matrix_file(CELLS)), "--compat-reports", "reports", *args)
    assert results.read_bytes() == before
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.json"]
    assert len(spawned) == (1 if args[0] == "-k" else 0) and sent == []
    assert all(proc.poll() is not None and not tmp.exists() for proc, tmp in spawned)


def test_the_worker_imports_while_pytest_collects(suite, matrix_file):
    """The worker starts at configure time: by the end of collection it exists, importing torch."""
    suite.makeconftest(
        """
import psutil, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    workers = [p for p in psutil.Process().children() if "harness.run.worker" in " ".join(p.cmdline())]
    print("workers at the end of collection:", len(workers))
"""
    )
    result = suite.runpytest("--compat-matrix", str(matrix_file(CELLS)), "--compat-reports", "reports", "-s")
    result.stdout.fnmatch_lines(["*workers at the end of collection: 1*"])
    assert result.ret == 0


def test_a_second_run_on_a_folder_in_use_is_refused_and_nothing_is_lost(suite, matrix_file, suite_cmd, wait_for_cells):
    path = matrix_file(CELLS + "faults:\n  - when: {n: 3}\n    inject: hang\n  \n")
    slow = path.read_text().replace("inject: hang", "inject: {raise: 'boom'}")
    (suite.path / "slow.yaml").write_text(slow.replace("max_new_tokens: 2", "max_new_tokens: 2\n  timeout_s: 5"))
    results = suite.path / "reports" / "cpu" / "results.json"
    first = subprocess.Popen(
        suite_cmd(
            suite.path,
            "--compat-reports",
            "reports",
            "--compat-matrix",
            str(path),
            "--compat-allow-faults",
            "-o",
            "faulthandler_timeout=0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=suite.path,
        text=True,
    )
    try:
        wait_for_cells(results, 2)
        second = subprocess.run(
            suite_cmd(suite.path, "--compat-reports", "reports", "--compat-matrix", str(path), "--compat-allow-faults"),
            cwd=suite.path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == pytest.ExitCode.USAGE_ERROR
        said = second.stdout + second.stderr
        assert f"pid {first.pid}" in said and "--compat-reports" in said and "Traceback" not in said
        assert len(load_results(results)["cells"]) >= 2  # the first run's cells are all still there
    finally:
        first.send_signal(signal.SIGTERM)  # cell 3 hangs: end the first run as CI would
        first.wait(timeout=120)
    cells = load_results(results)["cells"]
    assert [c["id"].rsplit("=", 1)[1] for c in cells][:2] == ["1", "2"]


def test_sigterm_writes_junit_summaries_and_run_json_and_leaves_no_worker(
    suite, matrix_file, suite_cmd, wait_for_cells
):
    path = matrix_file(CELLS + "faults:\n  - when: {n: 3}\n    inject: hang\n")
    folder = suite.path / "reports" / "cpu"
    proc = subprocess.Popen(
        suite_cmd(suite.path, "--compat-reports", "reports", "--compat-matrix", str(path), "--compat-allow-faults"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=suite.path,
        text=True,
    )
    wait_for_cells(folder / "results.json", 2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers  # the worker is running cell 3 (which hangs)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    junit = ET.parse(folder / "junit.xml").getroot()
    assert len(junit.findall(".//testcase")) >= 2
    assert json.loads((folder / "run.json").read_text())["interrupted"] is True
    assert (folder / "summary.md").exists() and (folder / "summary.html").exists()
    assert "INTERNALERROR" not in output


def test_resume_repairs_a_torn_last_line_and_says_so(suite, matrix_file):
    path = matrix_file(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2, 3]"))
    assert suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports").ret == 0
    results = suite.path / "reports" / "cpu" / "results.json"
    text = results.read_text()
    results.write_text(text[: text.rindex('"outcome"')])  # killed mid-write of the third cell, closing gone
    with pytest.raises(json.JSONDecodeError):
        json.loads(results.read_text())
    resumed = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "--compat-resume")
    assert resumed.ret == 0
    assert "repaired" in resumed.stdout.str()
    cells = json.loads(results.read_text())["cells"]  # valid JSON again, for good
    assert sorted(c["id"].rsplit("=", 1)[1] for c in cells) == ["1", "2", "3"]


def test_resume_skips_a_record_without_id(suite, matrix_file):
    path = matrix_file(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2]"))
    assert suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports").ret == 0
    results = suite.path / "reports" / "cpu" / "results.json"
    data = json.loads(results.read_text())
    del data["cells"][1]["id"]
    results.write_text(json.dumps(data))
    resumed = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "--compat-resume")
    assert resumed.ret == 0 and "INTERNALERROR" not in resumed.stdout.str()
    resumed.assert_outcomes(passed=1, skipped=1)


def test_resume_refuses_cells_whose_definition_changed(suite, matrix_file):
    path = matrix_file(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2]"))
    assert suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports").ret == 0
    path.write_text(path.read_text().replace("max_new_tokens: 2", "max_new_tokens: 3"))
    resumed = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "--compat-resume")
    said = resumed.stdout.str() + resumed.stderr.str()
    assert resumed.ret == pytest.ExitCode.USAGE_ERROR
    assert "2 recorded cells changed" in said and "max_new_tokens" in said and "Fix:" in said


def test_the_lock_lives_with_the_reports_so_a_run_with_another_temporary_directory_is_refused(tmp_path):
    """As a second container or host sharing the reports folder would be: nothing but the folder is shared."""
    from harness.report.lock import RunLock

    lock = RunLock(tmp_path / "reports" / "cpu")
    lock.acquire()
    try:
        assert (tmp_path / "reports" / ".qwen-compat" / "locks" / "cpu.lock").is_file()  # not in what CI uploads
        other_tmp = tmp_path / "other-tmp"
        other_tmp.mkdir()
        second = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom harness.report.lock import RunLock\nRunLock(sys.argv[1]).acquire()",
                str(tmp_path / "reports" / "cpu"),
            ],
            env={**os.environ, "TMPDIR": str(other_tmp)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and f"pid {os.getpid()}" in second.stderr and "UserError" in second.stderr
        assert RunLock(tmp_path / "reports" / "a10g").acquire() is None  # another device's folder is free
    finally:
        lock.release()
    assert not (tmp_path / "reports" / ".qwen-compat" / "locks" / "cpu.lock").exists()


def test_a_lock_left_by_a_dead_run_is_taken_only_where_its_death_can_be_seen(tmp_path):
    import json

    from harness.errors import UserError
    from harness.report import lock as lock_mod

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "reports" / ".qwen-compat" / "locks" / "cpu.lock"
    path.parent.mkdir(parents=True)
    left = {"pid": dead.pid, **lock_mod._machine(), "started": 1.0}
    path.write_text(json.dumps(left))  # a run on this host killed by SIGKILL
    taken = lock_mod.RunLock(tmp_path / "reports" / "cpu")
    taken.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    taken.release()
    path.write_text(json.dumps({**left, "host": "runner-7"}))  # another host's: nothing here can check it
    with pytest.raises(UserError) as err:
        lock_mod.RunLock(tmp_path / "reports" / "cpu").acquire()
    assert "runner-7" in str(err.value) and str(path) in str(err.value) and "Fix:" in str(err.value)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode == 0


def test_a_full_disk_stops_the_run_with_one_paragraph_and_leaves_valid_files(suite, matrix_file, suite_cmd, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "40k"):
        pytest.skip("mounting a tiny tmpfs needs root with CAP_SYS_ADMIN (CI has it)")
    try:
        path = matrix_file(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]"))
        done = subprocess.run(
            suite_cmd(suite.path, "--compat-reports", str(disk), "--compat-matrix", str(path)),
            cwd=suite.path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        said = done.stdout + done.stderr
        assert done.returncode != 0 and "INTERNALERROR" not in said and "Traceback" not in said
        assert "could not write" in said and "No space left on device" in said and "Fix:" in said
        data = json.loads((disk / "cpu" / "results.json").read_text())  # valid JSON, whatever was cut
        assert data["cells"] and all(c["outcome"] == "passed" for c in data["cells"])  # nothing against a model
        assert len(data["cells"]) < 12  # the run stopped
        for written in (disk / "cpu").glob("*.json"):
            json.loads(written.read_text())
        lines = (disk / "cpu" / "results.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [c["id"] for c in data["cells"]][: len(lines)]
        assert not list((disk / "cpu").glob(".*.partial"))
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.fixture
def full_disk():
    """A folder on a 40 KiB tmpfs, already full: every write there fails with ENOSPC, as on a full disk. Mounted
    outside pytest's temporary folders, which another pytest run may move away while it is mounted."""
    disk = Path(tempfile.mkdtemp(prefix="qwen-compat-full-disk-"))
    if not _mount_tmpfs(disk, "40k"):
        disk.rmdir()
        pytest.skip("mounting a tiny tmpfs needs root with CAP_SYS_ADMIN (CI has it)")
    try:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            f.write(b"x" * 2**20)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)])
        disk.rmdir()


def test_a_reference_that_does_not_fit_on_the_disk_leaves_no_truncated_file(full_disk, tiny_cell):
    import torch

    from harness.errors import ReportWriteError
    from harness.judge import agreement
    from harness.judge.drift import drift

    cell = tiny_cell(dtype="float32")
    with pytest.raises(ReportWriteError, match="No space left on device"):
        drift(cell, torch.ones(151_936), full_disk, "key")  # a vocabulary's logits: 600 KB
    with pytest.raises(ReportWriteError, match="No space left on device"):
        agreement.save(cell, "a cat " * 20_000, full_disk)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no 0-byte reference, no partial file


def test_a_full_disk_in_the_worker_is_the_harness_s_error_not_the_model_s(full_disk, tiny_cell):
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge
    from harness.run.worker import failure_reply

    cell = tiny_cell()
    try:
        (full_disk / "offloaded.safetensors").write_bytes(b"w" * 2**20)  # what an offload or a cache writes
    except OSError as exc:
        raised = exc
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")  # safetensors
    for reply in (failure_reply(cell, raised), failure_reply(cell, wrapped)):
        verdict = judge(cell, WorkerResult(**reply))
        assert (verdict.outcome, verdict.category) == ("error", "harness"), verdict
        assert "disk is full" in verdict.message and "Fix:" in verdict.message and "not the model" in verdict.remedy


def test_a_picture_the_harness_cannot_build_is_the_harness_s_error(tiny_cell):
    """The image builder's MemoryError (here under a 1 GiB address-space limit) is not the model's failure."""
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, pickle, sys\n"
            "from harness.matrix import inputs\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
            "try:\n"
            "    with inputs.built_by_the_harness('the 16384x16384 images of this cell'):\n"
            "        inputs.pictures('images', 16384, 16384, 4)\n"
            "except Exception as exc:\n"
            "    sys.stdout.buffer.write(pickle.dumps((type(exc).__name__, str(exc))))\n",
        ],
        capture_output=True,
        timeout=120,
    )
    kind, message = pickle.loads(built.stdout)
    assert kind == "HarnessFault" and "MemoryError" in message and "could not build the 16384x16384" in message
    verdict = judge(tiny_cell(), WorkerResult(ok=False, error_type=kind, error_message=message))
    assert (verdict.outcome, verdict.category) == ("error", "harness")


def test_colliding_model_ids_are_a_matrix_error_and_non_ascii_names_get_an_id():
    from harness.errors import UserError
    from harness.matrix import cells
    from harness.matrix import schema as matrix

    m = matrix.Matrix.model_validate(
        {"models": [{"hub": "my-org/Qwen2-VL-7B-Instruct"}, {"hub": "other/Qwen2-VL-7B-Instruct"}]}
    )
    with pytest.raises(UserError) as err:
        cells.expand(m, "m.yaml")
    text = str(err.value)
    assert "my-org/Qwen2-VL-7B-Instruct" in text and "other/Qwen2-VL-7B-Instruct" in text and "`id:`" in text
    assert "models[1].id" in text
    same = matrix.Matrix.model_validate(
        {
            "models": [{"path": "/a/checkpoint-final", "family": "qwen2_vl"}],
            "sections": [{"models": [{"path": "/b/checkpoint-final", "family": "qwen2_vl"}]}],
        }
    )
    with pytest.raises(UserError, match="sections\\[0\\].models\\[0\\].id"):
        cells.expand(same, "m.yaml")
    named = matrix.Matrix.model_validate({"models": [{"path": "/models/模型", "family": "qwen2_vl"}]})
    ids = {c.model for c in cells.expand(named, "m.yaml")}
    assert ids == {c.model for c in cells.expand(named, "m.yaml")} and all(i.startswith("path-") for i in ids)


PLANTED_ENV = {
    "HF_TOKEN": "hf_plantedTokenValue0123456789",
    "OPENAI_API_KEY": "planted-api-key-value-42",
    "DB_PASSWORD": "planted-db-password",
    "GITLAB_PAT": "planted-pat-value-777",
    "SERVICE_JWT": "planted.jwt.value",
    "AZURE_CREDENTIAL": "planted-credential-9",
    "BASIC_AUTH": "planted-auth-value",
    "SENTRY_DSN": "planted-dsn-value-5",
    "MIRROR_URL": "https://mirroruser:plantedmirrorpw@mirror.example/simple",
}
PLANTED_TEXT = [
    "hf_plantedInUrl9876543210abcdef",  # URL userinfo
    "plantedqueryparam",  # ?token=
    "sk-plantedOpenAIShapeABCDEFGHIJ",
    "ghp_plantedGitHubShape0123456789",
    "github_pat_planted_GitHubFineGrained01",
    "AKIAPLANTED123456789",
    "plantedBearerValueXYZ",
]


def test_every_planted_secret_is_absent_from_every_written_file(suite, matrix_file, monkeypatch, tmp_path):
    from harness.cli import main

    for name, value in PLANTED_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (
        "upload failed: sk-plantedOpenAIShapeABCDEFGHIJ ghp_plantedGitHubShape0123456789 "
        "github_pat_planted_GitHubFineGrained01 AKIAPLANTED123456789 Authorization: Bearer plantedBearerValueXYZ "
        f"{' '.join(PLANTED_ENV.values())}"
    )
    text = f"""
    models:
      - tiny: qwen2_vl
      - hub: "https://user:hf_plantedInUrl9876543210abcdef@huggingface.co/Qwen/Qwen2-VL-2B-Instruct?token=plantedqueryparam"
    axes: {{resolution: [224x224], extra: {{n: [1, 2]}}}}
    defaults: {{max_new_tokens: 2}}
    faults:
      - when: {{n: 2, model: tiny-qwen2-vl}}
        inject: {{raise: "{message}"}}
    """
    result = suite.runpytest(
        "--compat-matrix", str(matrix_file(text)), "--compat-allow-faults", "--compat-reports", "reports"
    )
    assert (suite.path / "reports" / "cpu" / "results.json").exists()
    assert main(["gate", "--baseline", str(suite.path / "reports"), "--current", str(suite.path / "reports")]) == 0
    assert main(["report", str(suite.path / "reports"), "--out", str(suite.path / "fleet")]) == 0
    written = [
        p
        for p in suite.path.rglob("*")
        if p.is_file() and p.suffix in {".json", ".jsonl", ".csv", ".xml", ".md", ".html"}
    ]
    assert {p.name for p in written} >= {
        "results.json",
        "results.jsonl",
        "results.csv",
        "junit.xml",
        "summary.md",
        "summary.html",
        "run.json",
        "gate.json",
        "gate.md",
        "fleet.md",
        "fleet.html",
    }
    planted = [*PLANTED_ENV.values(), *PLANTED_TEXT, "plantedmirrorpw"]
    for p in written:
        content = p.read_text(errors="replace")
        leaked = [secret for secret in planted if secret in content]
        assert not leaked, (p, leaked)
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize("name", ["a/b", "..", ".", ".hidden"])
def test_a_bad_baseline_name_fails_at_start_up(suite, matrix_file, monkeypatch, name):
    from harness.run.runner import Runner

    spawned = []
    monkeypatch.setattr(Runner, "_spawn", lambda self: spawned.append(1))
    result = suite.runpytest(
        "--compat-matrix", str(matrix_file(CELLS)), "--compat-reports", "reports", "--compat-save-baseline", name
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not spawned
    assert "--compat-save-baseline" in result.stderr.str() and "Traceback" not in result.stderr.str()


def test_every_option_has_the_plugins_prefix_and_strict_markers_pass(suite, matrix_file):
    from harness import plugin

    class Group:
        def __init__(self):
            self.names = []

        def addoption(self, *names, **kwargs):
            self.names += names

    class Parser:
        group = Group()

        def getgroup(self, *args):
            return self.group

        def addini(self, name, *args, **kwargs):
            assert name.startswith("compat_")

    parser = Parser()
    plugin.pytest_addoption(parser)
    assert parser.group.names and all(n.startswith("--compat-") for n in parser.group.names)
    result = suite.runpytest(
        "--compat-matrix", str(matrix_file(CELLS)), "--strict-markers", "-m", "cpu and qwen3_vl", "--collect-only"
    )
    assert result.ret == 0


def test_measurements_reach_junit_under_the_default_family_with_warnings_as_errors(suite, matrix_file):
    path = matrix_file(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1]"))
    # pytest's own assert-rewrite notice (harness already imported by this in-process test run) is not the subject
    ignore = ("-W", "ignore::pytest.PytestAssertRewriteWarning")
    result = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "-W", "error", *ignore)
    assert result.ret == 0
    case = ET.parse(suite.path / "reports" / "cpu" / "junit.xml").getroot().find(".//testcase")
    lines = dict(line.split("=", 1) for line in case.find("system-out").text.splitlines())
    assert float(lines["peak_memory_mib"]) > 0 and lines["peak_memory_source"] == "worker_rss"
    assert case.find("properties") is None  # test-case properties break Jenkins' schema: opt-in only
    opted = suite.runpytest(
        "--compat-matrix",
        str(path),
        "--compat-reports",
        "opted",
        "-W",
        "error",
        *ignore,
        "--junitxml",
        "pytest.xml",
        "-o",
        "compat_junit_properties=true",
    )
    assert opted.ret == 0
    for junit in (suite.path / "opted" / "cpu" / "junit.xml", suite.path / "pytest.xml"):
        properties = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
        assert float(properties["peak_memory_mib"]) > 0 and properties["peak_memory_source"] == "worker_rss"
        assert "None" not in junit.read_text()


def test_ci_fails_when_pytest_collects_no_tests(tmp_path):
    """.ci/run with stand-ins for python3.11, pip and pytest: pytest's exit 5 must fail CI."""
    ci = tmp_path / "repo" / ".ci"
    ci.mkdir(parents=True)
    (ci / "run").write_text((REPO / ".ci" / "run").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv = tmp_path / "repo" / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool, code in ((bin_dir / "python3.11", 0), (bin_dir / "chromium", 0), (venv / "pip", 0), (venv / "pytest", 5)):
        tool.write_text(f"#!/bin/sh\nexit {code}\n")
        tool.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ci / "run")],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 5 and "no tests" in done.stdout


def test_progress_counts_cells_and_tells_elapsed_time_and_eta():
    from types import SimpleNamespace

    from harness.report.progress import Progress

    now = [0.0]
    lines = []
    planned = [SimpleNamespace(group=g) for g in ("a", "a", "b", "b")]
    progress = Progress(lines.append, color=False, planned=planned, clock=lambda: now[0])
    for i, loaded in enumerate([True, False]):
        now[0] += 12.0 if loaded else 2.0
        progress.cell_done(
            {
                "id": f"c{i}",
                "outcome": "passed",
                "model_loaded": loaded,
                "duration_s": now[0] - sum([12.0, 2.0][:i]),
                "measurements": {"load_s": 10.0 if loaded else 0.0},
            }
        )
    assert lines[0].startswith("qwen-compat cell 1/4") and "0m12s elapsed" in lines[0]
    # two cells left at 2 s of inference each, plus one load (group b) at 10 s
    assert "cell 2/4" in lines[1] and "0m14s elapsed, ETA 0m14s" in lines[1]
    assert "\x1b[" not in lines[1]  # plain text without a terminal
    assert progress.final_line(14.0) == "qwen-compat: 2 cells in 0m14s: 2 passed"


def test_resume_runs_an_errored_cell_whose_input_was_fixed(suite, matrix_file, tmp_path):
    broken = CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1]").replace(
        "max_new_tokens: 2", f"max_new_tokens: 2\n  image: {tmp_path / 'missing.png'}"
    )
    path = matrix_file(broken)
    suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports").assert_outcomes(errors=1)
    path.write_text(CELLS.replace("[1, 2, 3, 4, 5, 6]", "[1]"))  # the input fixed: the definition changed
    resumed = suite.runpytest("--compat-matrix", str(path), "--compat-reports", "reports", "--compat-resume")
    resumed.assert_outcomes(passed=1)
