"""`qwen-compat doctor`: what this host is, and what a matrix will do here, before anything runs."""

from __future__ import annotations

from collections import Counter

from harness.devices.host import Host
from harness.devices.torch_build import TorchBuild, check
from harness.errors import UserError
from harness.matrix import cells as cells_mod
from harness.matrix import schema as matrix_mod
from harness.matrix.cells import on_host
from harness.report.results import environment
from harness.run.disposition import disposition


def torch_verdict(host: Host, build: TorchBuild | None) -> str | None:
    """None when this torch can run on this host's card; else the paragraph a run would stop with."""
    try:
        check(build, card=host.name, compute_capability=host.compute_capability, driver_cuda=host.cuda)
    except UserError as err:
        return str(err)
    return None


def host_facts(host: Host, build: TorchBuild | None = None) -> dict:
    env = environment(host, None, build and build.to_dict())
    gpu = host.gpu
    problem = torch_verdict(host, build) if host.compute_capability else None
    return {
        "device": host.key,
        "gpu": host.name,
        "compute capability": host.compute_capability or "-",
        "memory": f"{host.memory_mib:.0f} MiB" if host.memory_mib else "-",
        "driver": env["driver"],
        "CUDA": env["cuda"],
        "torch": env["torch"],
        "torch CUDA": env["torch_cuda"] or "none (a CPU build)",
        "torch kernels for": " ".join(env["torch_arch_list"] or []) or "-",
        "torch runs on this card": "-" if not host.compute_capability else "yes" if not problem else f"NO: {problem}",
        "transformers": env["transformers"],
        "native bf16": "yes" if gpu and gpu.native_bf16 else "no" if gpu else "unknown card",
        "flash-attn": env["flash_attn"],
        "vLLM": env["vllm"],
        "detected via": host.via,
    }


def engine_rows() -> list[dict]:
    """The serving engines found here (on PATH or managed), for `launch:` templates."""
    from harness.engines.environments import found_engines

    return [
        {"engine": e.name, "version": e.version or "?", "where": e.where, "python": e.python or "?"}
        for e in found_engines()
    ]


def plan_cells(matrix_path: str, host: Host) -> list[dict]:
    """One row per cell: run / skip / xfail here and why, with the memory plan for cells that run."""
    from harness.plan.memory import predict

    rows = []
    for cell in on_host(cells_mod.expand(matrix_mod.load(matrix_path), matrix_path), host.key):
        expectation = disposition(cell, host.key)
        row = {
            "id": cell.id,
            "here": {"pass": "run", "xfail": "expected to fail", "skip": "skip"}[expectation.outcome],
            "why": expectation.reason,
            "predicted_peak_mib": None,
            "plan": "",
        }
        if expectation.source != "host" and expectation.outcome != "skip":
            prediction = predict(cell)
            row["predicted_peak_mib"], row["plan"] = prediction.predicted_peak_mib, prediction.verdict
            if prediction.verdict == "over":
                row["here"], row["why"] = (
                    "skip (predicted out of memory)",
                    f"predicted {prediction.predicted_peak_mib:.0f} MiB",
                )
        rows.append(row)
    return rows


def render(host: Host, rows: list[dict] | None, build: TorchBuild | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=220)
    facts = Table(title="this host", show_header=False)
    for key, value in host_facts(host, build).items():
        facts.add_row(key, escape(str(value)))
    console.print(facts)
    engines = Table(title="serving engines (launch templates)")
    for column in ("engine", "version", "where", "python"):
        engines.add_column(column, overflow="fold")
    for row in engine_rows():
        engines.add_row(*(escape(row[c]) for c in ("engine", "version", "where", "python")))
    if engines.row_count:
        console.print(engines)
    else:
        console.print("serving engines: none found (`qwen-compat engine install vllm` builds vLLM's CPU build)")
    if rows is None:
        return
    counts = Counter(r["here"] for r in rows)
    console.print("cells here: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    table = Table(title="cells of this host")
    for column in ("cell", "here", "why", "predicted peak MiB", "plan"):
        table.add_column(column, overflow="fold")
    for r in rows:
        if not r["here"].startswith("skip") or r["why"] and not r["why"].startswith("this host is"):
            table.add_row(
                escape(r["id"]),
                r["here"],
                escape(r["why"]),
                f"{r['predicted_peak_mib']:.0f}" if r["predicted_peak_mib"] else "",
                r["plan"],
            )
    console.print(table)
