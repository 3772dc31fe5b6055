"""`qwen-compat fleet --ray` on a real Ray cluster of this machine (ray.cluster_utils): two CPU nodes run the
cpu device's tiny cells for real; a third, a CPU node started with the resource accelerator_type:A10G, is
where the a10g cells must go (run with --emulated-accelerators, and the records say so: a GPU cell on a
CPU node ends as a harness error, as it does in a plain pytest run there). The head is the CLI in its own
process, as a user runs it; the test process only holds the cluster."""

import os

# Every node, worker and driver on 127.0.0.1 (Ray otherwise binds the machine's outward address). Read by
# ray when it is imported, and by every process the cluster starts: set before the import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from harness.report.results import latest_records, load_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STORE = 100 * 1024**2  # object store per node: the records are small

TWO_MODELS = """
models:
  - tiny: qwen2_vl
    id: m1
  - tiny: qwen2_vl
    id: m2
devices: [cpu, a10g, t4]
axes:
  resolution: [224x224]
defaults:
  max_new_tokens: 2
"""

# One chunk of five cpu cells; the third hangs until its timeout, which holds its node busy on purpose.
FIVE_CELLS_ONE_HANGS = """
models:
  - tiny: qwen2_vl
devices: [cpu]
axes:
  resolution: [224x224]
  extra:
    n: [1, 2, 3, 4, 5]
defaults:
  max_new_tokens: 2
  timeout_s: {timeout}
faults:
  - when: {{n: 3}}
    inject: hang
"""


@pytest.fixture(scope="module")
def cluster():
    """A head that runs nothing (num_cpus 0), two CPU nodes and an A10G-labelled CPU node; shut down after."""
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False},
    )
    try:
        nodes = {
            "cpu-1": c.add_node(num_cpus=1, object_store_memory=STORE),
            "cpu-2": c.add_node(num_cpus=1, object_store_memory=STORE),
            "a10g": c.add_node(num_cpus=1, resources={"accelerator_type:A10G": 1}, object_store_memory=STORE),
        }
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:")
        yield c, nodes
    finally:
        c.shutdown()


@pytest.fixture
def project(tmp_path):
    """A project folder as a user has it (pytest settings, the suite, a matrix); the harness package reaches
    the nodes as a py_module, as an installed qwen-compat does."""
    folder = tmp_path / "project"
    (folder / "matrices").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", folder)
    shutil.copytree(REPO / "suites", folder / "suites")

    def write(text: str) -> Path:
        (folder / "matrices" / "m.yaml").write_text(textwrap.dedent(text))
        return folder

    return write


def fleet(folder: Path, address: str, *args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "harness.cli", "fleet", "matrices/m.yaml", "--ray", address, *args]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def records(path: Path) -> dict[str, dict]:
    return latest_records(load_results(path)) if path.exists() else {}


def node_sessions() -> list[psutil.Process]:
    """pytest sessions the fleet started on nodes (each writes to a temporary qwen-compat-fleet- folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "pytest" in cmdline and any("qwen-compat-fleet-" in part for part in cmdline):
            found.append(proc)
    return found


def test_each_card_and_family_asks_for_the_accelerator_type_ray_gives_it():
    from harness.dispatch.ray import resource

    assert resource("cpu") is None and resource("a10g") == "accelerator_type:A10G"
    assert resource("v100-16gb") == resource("v100-32gb") == resource("v100") == "accelerator_type:V100"
    # Ray labels every A100 A100; the sizes' own names are Ray's, added by hand (ray start --resources)
    assert resource("a100-80gb") == "accelerator_type:A100-80G" and resource("a100") == "accelerator_type:A100"


def test_bad_input_is_one_paragraph_before_any_cluster(project, tmp_path):
    folder = project(TWO_MODELS.replace("[cpu, a10g, t4]", "[cpu, a10x]"))
    head = fleet(folder, "127.0.0.1:1")
    out, _ = head.communicate(timeout=60)
    assert head.returncode == 2 and "unknown device 'a10x'" in out and "did you mean 'a10'" in out, out
    assert "Traceback" not in out

    folder = project(TWO_MODELS)
    head = fleet(folder, "127.0.0.1:1")  # nothing listens on port 1
    out, _ = head.communicate(timeout=60)
    assert head.returncode == 2 and "no Ray cluster answered at 127.0.0.1:1" in out and "ray start --head" in out
    assert "Traceback" not in out

    head = fleet(folder, "127.0.0.1:1", "--compat-device", "a10g")
    out, _ = head.communicate(timeout=60)
    assert head.returncode == 2 and "sets --compat-device on every node itself" in out, out

    no_ray = "import sys; sys.modules['ray'] = None; from harness.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", no_ray, "fleet", "matrices/m.yaml", "--ray", "local"],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "Ray is not installed" in run.stderr and "qwen-compat[ray]" in run.stderr
    assert "Traceback" not in run.stderr

    faults = project(FIVE_CELLS_ONE_HANGS.format(timeout=20))
    head = fleet(faults, "127.0.0.1:1")  # the plugin's own paragraph, said once
    out, _ = head.communicate(timeout=60)
    assert head.returncode == 2 and out.count("Fix:") == 1 and "pass --compat-allow-faults" in out, out


def test_ray_local_runs_the_cpu_cells_in_a_cluster_of_its_own(project):
    """Before the module's cluster starts (no test before this one asks for it): `--ray local` starts Ray in the
    head's process, whose one node runs the cpu cells; no node there has an H100."""
    folder = project(
        TWO_MODELS.replace("[cpu, a10g, t4]", "[cpu, h100]").replace("  - tiny: qwen2_vl\n    id: m2\n", "")
    )
    head = fleet(folder, "local", "--reports", "reports")
    out, _ = head.communicate(timeout=300)
    assert head.returncode == 1, out  # h100's cell was not run
    cpu = records(folder / "reports" / "cpu" / "results.json")
    assert [r["outcome"] for r in cpu.values()] == ["passed"], out
    assert "h100: 1 cells no node in the cluster advertises accelerator_type:H100" in out


def test_cells_run_only_on_nodes_advertising_their_card_and_merge_as_separate_runs_give(cluster, project):
    c, nodes = cluster
    folder = project(TWO_MODELS)
    head = fleet(folder, c.address, "--reports", "reports", "--emulated-accelerators")
    out, _ = head.communicate(timeout=400)
    assert head.returncode == 1, out  # a10g's cells error on a CPU node; t4's are not run
    # t4: said at once, before any cell came back, and not waited on
    assert out.index("t4: 2 cells no node in the cluster advertises accelerator_type:T4") < out.index("cell 1/")
    reports = folder / "reports"
    cpu, a10g, t4 = (records(reports / d / "results.json") for d in ("cpu", "a10g", "t4"))
    ids = {name: n.node_id for name, n in nodes.items()}
    assert {r["node_id"] for r in cpu.values()} == {ids["cpu-1"], ids["cpu-2"]}  # one model per node
    assert all(r["outcome"] == "passed" and r["emulated_accelerator"] is False for r in cpu.values())
    assert {r["node_id"] for r in a10g.values()} == {ids["a10g"]}
    assert all(r["emulated_accelerator"] is True and r["outcome"] == "error" for r in a10g.values())
    assert all("torch sees no CUDA GPU" in r["message"] for r in a10g.values())
    assert len(t4) == 2 and all(r["outcome"] == "skipped" and r["not_run"] for r in t4.values())
    assert {r["message"] for r in t4.values()} == {"no node in the cluster advertises accelerator_type:T4"}
    header = load_results(reports / "a10g" / "results.json")["environment"]["fleet"]
    assert header["accelerator_resource"] == "accelerator_type:A10G"
    assert [n["node_id"] for n in header["nodes"]] == [ids["a10g"]]
    junit = (reports / "cpu" / "junit.xml").read_text()
    # written from the merged results, as every run's junit.xml is: one suite for the card, every node's cells
    assert junit.count("<testsuite ") == 1 and junit.count("<testcase ") == 2
    fleet_md = (reports / "fleet.md").read_text()
    assert "| m1 · float32 |" in fleet_md and "a10g" in fleet_md and "t4" in fleet_md
    for device in ("cpu", "a10g", "t4"):
        assert (reports / device / "summary.html").exists()

    # the same matrix, one plain pytest run per device on this machine
    for device in ("cpu", "a10g"):
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "--compat-matrix", "matrices/m.yaml", "--compat-device", device,
             "-m", device, "--compat-reports", "separate", "-q"],
            cwd=folder, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode in (0, 1), run.stdout[-2000:]
        separate, merged = records(folder / "separate" / device / "results.json"), {"cpu": cpu, "a10g": a10g}[device]

        def essence(r):
            m = r["measurements"]
            return (r["outcome"], r["category"], r["message"], r["output_text"], m.get("visual_tokens"))

        assert {k: essence(r) for k, r in merged.items()} == {k: essence(r) for k, r in separate.items()}


def test_a_node_without_torch_hands_its_chunk_to_another(cluster, project, tmp_path):
    c, nodes = cluster
    blocked = tmp_path / "no-torch"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # as if not installed\n")
    broken = c.add_node(
        num_cpus=1,
        resources={"accelerator_type:A10G": 1},
        object_store_memory=STORE,
        env_vars={"PYTHONPATH": str(blocked)},
    )
    try:
        c.wait_for_nodes()
        folder = project(TWO_MODELS.replace("[cpu, a10g, t4]", "[a10g]"))
        head = fleet(folder, c.address, "--reports", "reports", "--emulated-accelerators")
        out, _ = head.communicate(timeout=300)
    finally:
        c.remove_node(broken)
    assert f"node {broken.node_id[:8]} (127.0.0.1) cannot import torch" in out, out
    a10g = records(folder / "reports" / "a10g" / "results.json")
    assert len(a10g) == 2 and {r["node_id"] for r in a10g.values()} == {nodes["a10g"].node_id}


def test_sigterm_on_the_head_cancels_the_nodes_and_writes_what_came_back(cluster, project):
    c, _ = cluster
    folder = project(FIVE_CELLS_ONE_HANGS.format(timeout=300).replace("n: [1, 2, 3, 4, 5]", "n: [1, 2, 3]"))
    results = folder / "reports" / "cpu" / "results.json"
    head = fleet(folder, c.address, "--reports", "reports", "--compat-allow-faults", start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(records(results)) < 2:
            assert head.poll() is None and time.monotonic() < deadline, head.stdout.read()
            time.sleep(0.3)
        assert node_sessions()  # cell 3 hangs on its node

        second = fleet(folder, c.address, "--reports", "reports", "--compat-allow-faults")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2 and "another qwen-compat run is writing" in out, out

        head.send_signal(signal.SIGTERM)
        out, _ = head.communicate(timeout=90)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
    assert head.returncode == 2 and "interrupted: remote work cancelled" in out, out
    kept = records(results)
    assert sorted(kept) == ["tiny-qwen2-vl-cpu-float32-sdpa-224x224-n=1", "tiny-qwen2-vl-cpu-float32-sdpa-224x224-n=2"]
    assert (folder / "reports" / "cpu" / "summary.md").exists() and (folder / "reports" / "fleet.md").exists()
    deadline = time.monotonic() + 30
    while node_sessions():
        assert time.monotonic() < deadline, "the node's pytest session outlived the cancelled fleet run"
        time.sleep(0.5)


def test_a_node_killed_mid_run_loses_no_finished_cell(cluster, project):
    """Last in the module: it takes one of the two CPU nodes away."""
    c, nodes = cluster
    folder = project(FIVE_CELLS_ONE_HANGS.format(timeout=20))
    results = folder / "reports" / "cpu" / "results.json"
    head = fleet(folder, c.address, "--reports", "reports", "--compat-allow-faults")
    try:
        deadline = time.monotonic() + 240
        while len(records(results)) < 2:  # cells 1 and 2 done; cell 3 hangs on that node
            assert head.poll() is None and time.monotonic() < deadline, head.stdout.read()
            time.sleep(0.2)
        first = {r["node_id"] for r in records(results).values()}
        assert len(first) == 1
        victim = next(name for name, n in nodes.items() if n.node_id in first)
        c.remove_node(nodes[victim], allow_graceful=False)
        out, _ = head.communicate(timeout=400)
    finally:
        if head.poll() is None:
            head.kill()
    assert head.returncode == 1, out  # cell 3 hangs on the second node too: a timeout
    assert "was lost while running them" in out and "2 cells it finished are kept" in out, out
    kept = records(results)
    by_n = {r["definition"]["extra"]["n"]: r for r in kept.values()}
    assert sorted(by_n) == [1, 2, 3, 4, 5] and len(load_results(results)["cells"]) == 5  # each once
    survivor = nodes["cpu-2" if victim == "cpu-1" else "cpu-1"].node_id
    assert [by_n[n]["node_id"] for n in (1, 2)] == [nodes[victim].node_id] * 2
    assert [by_n[n]["node_id"] for n in (3, 4, 5)] == [survivor] * 3
    assert [by_n[n]["outcome"] for n in (1, 2, 4, 5)] == ["passed"] * 4
    assert by_n[3]["outcome"] == "failed" and by_n[3]["category"] == "timeout"
    assert json.loads((folder / "reports" / "cpu" / "run.json").read_text())["cells"] == 5
