"""The release gate: did anything get worse between a baseline run and the current one?

Both sides are reports folders holding `<device>/results.json`. Regressions (exit 1): a cell that
passed now fails or errors, a changed failure category, peak memory or latency up beyond its
tolerance, a baseline cell or device missing now. Improvements and new cells are listed only.
Bad input exits 2 with one paragraph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import UserError
from harness.report.results import latest_records, load_results, write_report

PASSING = {"passed", "xfailed"}
FAILING = {"failed", "error", "xpassed-strict"}
OUTCOMES = PASSING | FAILING | {"skipped", "xpassed"}
LATENCY_METRIC = "prefill_s"  # time to first token, vision encoder included


@dataclass
class Change:
    device: str
    cell: str
    kind: str  # regression | improvement | new | note
    what: str
    baseline: str = ""
    current: str = ""


def parse_percent(text: str, option: str) -> float:
    try:
        return float(str(text).strip().rstrip("%")) / 100
    except ValueError:
        raise UserError(f"'{text}' is not a percentage.", key=option, fix=f"write it as e.g. {option} 5%.") from None


def load_run(folder: Path) -> dict[str, dict[str, dict]]:
    """device -> cell id -> record, from every `<device>/results.json` under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "reports folder not found.",
            file=str(folder),
            fix="pass a folder holding <device>/results.json (e.g. reports/), or a saved baseline name.",
        )
    files = sorted(folder.glob("*/results.json"))
    if not files:
        raise UserError(
            "no <device>/results.json in this folder.",
            file=str(folder),
            fix="run the matrix first (pytest --compat-reports DIR), or point at the folder it wrote.",
        )
    return {f.parent.name: latest_records(load_results(f)) for f in files}


def _peak(record: dict) -> float | None:
    return (record.get("measurements") or {}).get("peak_memory_mib")


def _latency(record: dict) -> float | None:
    return (record.get("measurements") or {}).get(LATENCY_METRIC)


def _latency_max(record: dict) -> float | None:
    """The slowest of the baseline's timed repeats (its single sample when it ran once)."""
    m = record.get("measurements") or {}
    return ((m.get("latency") or {}).get(LATENCY_METRIC) or {}).get("max", m.get(LATENCY_METRIC))


def _rise(base: float | None, cur: float | None) -> float | None:
    if base is None or cur is None or base <= 0:
        return None
    return (cur - base) / base


def _check_outcome(record: dict, device: str, cell_id: str, side: str) -> None:
    if record.get("outcome") not in OUTCOMES:
        raise UserError(
            f"cell '{cell_id}' on {device} has outcome {record.get('outcome')!r}, which the gate does not know.",
            key=f"{side}: cells[].outcome",
            fix=f"outcomes are {', '.join(sorted(OUTCOMES))}; re-run the matrix with this qwen-compat version "
            "or repair the results file.",
        )


def compare_cell(
    device: str, cell_id: str, base: dict, cur: dict, memory_tol: float, latency_tol: float
) -> list[Change]:
    """The changes of one cell. Latency regresses only when its median rises beyond the tolerance AND
    above the slowest of the baseline's repeats: a shared GPU's noise is not a regression."""
    _check_outcome(base, device, cell_id, "baseline")
    _check_outcome(cur, device, cell_id, "current")
    out: list[Change] = []
    b, c = base["outcome"], cur["outcome"]
    if b in PASSING and c in FAILING:
        out.append(Change(device, cell_id, "regression", f"{b} -> {c}", b, f"{c} [{cur.get('category')}]"))
    elif b in PASSING and c == "skipped":
        reason = (cur.get("message") or "").split("\n")[0][:200]
        out.append(Change(device, cell_id, "regression", f"{b} -> skipped", b, f"skipped: {reason}"))
    elif b in FAILING and c in FAILING and base.get("category") != cur.get("category"):
        out.append(
            Change(
                device,
                cell_id,
                "regression",
                "failure category changed",
                str(base.get("category")),
                str(cur.get("category")),
            )
        )
    elif b in FAILING and c in PASSING:
        out.append(Change(device, cell_id, "improvement", f"{b} -> {c}", f"{b} [{base.get('category')}]", c))
    elif b != c:
        out.append(Change(device, cell_id, "note", f"{b} -> {c}", b, c))
    rise = _rise(_peak(base), _peak(cur))
    if rise is not None:
        text = (f"{_peak(base):.4g} MiB", f"{_peak(cur):.4g} MiB ({rise:+.1%})")
        if rise > memory_tol:
            out.append(Change(device, cell_id, "regression", f"peak memory up beyond {memory_tol:.0%}", *text))
        elif rise < -memory_tol:
            out.append(Change(device, cell_id, "improvement", "peak memory down", *text))
    rise = _rise(_latency(base), _latency(cur))
    if rise is not None:
        text = (f"{_latency(base):.4g} s (max {_latency_max(base):.4g})", f"{_latency(cur):.4g} s ({rise:+.1%})")
        if rise > latency_tol and _latency(cur) > _latency_max(base):
            out.append(
                Change(device, cell_id, "regression", f"latency up beyond {latency_tol:.0%} and the spread", *text)
            )
        elif rise < -latency_tol:
            out.append(Change(device, cell_id, "improvement", "latency down", *text))
    return out


def compare(baseline: Path, current: Path, memory_tol: float = 0.05, latency_tol: float = 0.15) -> list[Change]:
    base_run, cur_run = load_run(baseline), load_run(current)
    changes: list[Change] = []
    for device, base_cells in base_run.items():
        if device not in cur_run:
            changes.append(Change(device, "*", "regression", "device missing", f"{len(base_cells)} cells", "absent"))
            continue
        cur_cells = cur_run[device]
        for cell_id, base in base_cells.items():
            if cell_id not in cur_cells:
                changes.append(Change(device, cell_id, "regression", "cell missing", base["outcome"], "absent"))
            else:
                changes.extend(compare_cell(device, cell_id, base, cur_cells[cell_id], memory_tol, latency_tol))
        for cell_id in cur_cells.keys() - base_cells.keys():
            _check_outcome(cur_cells[cell_id], device, cell_id, "current")
            changes.append(Change(device, cell_id, "new", "new cell", "", cur_cells[cell_id]["outcome"]))
    for device in cur_run.keys() - base_run.keys():
        changes.append(Change(device, "*", "new", "new device", "", f"{len(cur_run[device])} cells"))
    order = {"regression": 0, "improvement": 1, "new": 2, "note": 3}
    return sorted(changes, key=lambda ch: (order[ch.kind], ch.device, ch.cell))


def markdown(changes: list[Change]) -> str:
    regressions = sum(ch.kind == "regression" for ch in changes)
    lines = [
        f"# qwen-compat gate: {'FAIL' if regressions else 'PASS'} ({regressions} regressions)",
        "",
        "| kind | device | cell | what | baseline | current |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {ch.kind} | {ch.device} | {ch.cell} | {ch.what} | {ch.baseline} | {ch.current} |" for ch in changes]
    return "\n".join(lines) + "\n"


def write(changes: list[Change], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    regressions = sum(ch.kind == "regression" for ch in changes)
    write_report(
        out / "gate.json",
        json.dumps(
            {"passed": regressions == 0, "regressions": regressions, "changes": [asdict(ch) for ch in changes]},
            indent=1,
        ),
    )
    write_report(out / "gate.md", markdown(changes))


def print_table(changes: list[Change]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    styles = {"regression": "bold red", "improvement": "green", "new": "cyan", "note": "yellow"}
    table = Table(title="qwen-compat gate")
    for column in ("kind", "device", "cell", "what", "baseline", "current"):
        table.add_column(column, overflow="fold", no_wrap=column != "cell")
    for ch in changes:
        table.add_row(
            f"[{styles[ch.kind]}]{ch.kind}[/]", *map(escape, (ch.device, ch.cell, ch.what, ch.baseline, ch.current))
        )
    console = Console(width=250)
    console.print(table)
    regressions = sum(ch.kind == "regression" for ch in changes)
    console.print(f"gate: {'FAIL' if regressions else 'PASS'}: {regressions} regressions, {len(changes)} changes")
