"""`qwen-compat fleet MATRIX --ray ADDRESS`: the whole fleet matrix on one Ray cluster, in one command."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from harness.dispatch.reports import FleetReports
from harness.dispatch.work import collect
from harness.errors import UserError

RAY_MISSING = (
    "`qwen-compat fleet` schedules the matrix on a Ray cluster, and Ray is not installed in this Python.",
    "pip install 'qwen-compat[ray]' here and on every node (the nodes also need the project's own "
    "dependencies: pip install 'qwen-compat[torch,ray]', or keep a GPU node's own torch).",
)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A cancelled job (SIGTERM) stops as Ctrl-C does: remote work cancelled, what came back written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    """0: every cell ran and none failed; 1: a cell failed, was not run, or the gate found a regression;
    2: interrupted (what came back is written) or bad input."""
    project = Path.cwd().resolve()
    baseline = _gate_inputs(args) if args.baseline else None  # bad input is said before the run, not after
    work = collect(args.matrix, project, args.pytest_args)
    if not work.cells:
        raise UserError(
            "the pytest arguments select no cell of this matrix.",
            file=args.matrix,
            fix="loosen -k / -m, or check them with `pytest --collect-only --compat-matrix MATRIX ...`.",
        )
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING[0], key="--ray", fix=RAY_MISSING[1]) from None
    from harness.dispatch import ray as cluster

    reports = FleetReports(Path(args.reports), work)
    reports.lock()  # before the cluster: a second run on the folder is refused at once
    interrupted = False
    try:
        cluster.connect(args.ray, project)
        try:
            pools = cluster.pools(work.cells, cluster.alive_nodes())
            for device, cells in work.cells.items():
                reports.headers[device] = {
                    "ray_address": args.ray,
                    "accelerator_resource": cluster.resource(device),
                    "nodes": [{"node_id": n.id, "node_ip": n.ip, "gpus": n.gpus} for n in pools[device]],
                }
                nodes = ", ".join(n.label for n in pools[device])
                where = f"in {len(work.chunks[device])} chunks on {nodes}" if nodes else cluster.no_node_reason(device)
                print(f"{device}: {len(cells)} cells {where}", flush=True)
            scheduler = cluster.Scheduler(work, pools, reports, allow_emulated=args.emulated_accelerators)
            with sigterm_as_interrupt():
                try:
                    scheduler.run()
                except KeyboardInterrupt:
                    interrupted = True
                    reports.note("interrupted: remote work cancelled; writing what came back")
        finally:
            ray.shutdown()
        reports.finish(interrupted)
    finally:
        reports.release()
    for line in reports.final_lines():
        print(line)
    if interrupted:
        return 2
    regressions = _gate(baseline, Path(args.reports)) if baseline else 0
    return 1 if reports.failing() or sum(reports.not_run_count.values()) or regressions else 0


def _gate_inputs(args) -> tuple[Path, float, float]:
    from harness.report import baselines, gate

    return (
        baselines.resolve(args.baseline, [Path(args.reports), baselines.DEFAULT_REPORTS]),
        gate.parse_percent(args.memory_tolerance, "--memory-tolerance"),
        None if args.latency_tolerance is None else gate.parse_percent(args.latency_tolerance, "--latency-tolerance"),
    )


def _gate(baseline: tuple[Path, float, float], current: Path) -> int:
    """The release gate over the merged folder, as `qwen-compat gate` runs it; the number of regressions."""
    from harness.report import gate

    changes = gate.compare(baseline[0], current, baseline[1], baseline[2])
    gate.print_table(changes)
    gate.write(changes, current)
    return sum(ch.kind == "regression" for ch in changes)
