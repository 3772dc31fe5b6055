"""The release gate: did anything get worse between a baseline run and the current one?

Both sides are reports folders holding `<device>/results.json`. Regressions (exit 1): a cell that
passed now fails, errors, is skipped or fails as the matrix expects (xfailed); a cell that was skipped
now fails; a changed failure category; a new cell (or a cell of a new device) that fails; peak memory
up beyond its tolerance, or no longer measured; latency up beyond its tolerance and the baseline's
spread; a baseline cell or device missing now. Measurements are compared only where both runs ran
the cell to the end (passed), never between failures. Latency is judged only where both sides timed
at least LATENCY_REPEATS repeats, or when a tolerance is given explicitly: single samples on a shared
machine are noise, shown as notes. Improvements and new cells are listed only. Bad input (a missing,
corrupt, binary or cut-short baseline) exits 2 with one paragraph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import UserError
from harness.report.results import latest_records, read_results, results_files, write_report

PASSING = {"passed", "xfailed"}
FAILING = {"failed", "error", "xpassed-strict"}
RAN = {"passed", "xpassed"}  # run to the end: their measurements are comparable
OUTCOMES = PASSING | FAILING | {"skipped", "xpassed"}
LATENCY_METRIC = "prefill_s"  # time to first token, vision encoder included
LATENCY_TOLERANCE = 0.15  # when latency is judged (enough repeats) and no tolerance was given
LATENCY_REPEATS = 3  # timed repeats each side needs before latency can regress without an explicit tolerance


@dataclass
class Change:
    device: str
    cell: str
    kind: str  # regression | improvement | new | note
    what: str
    baseline: str = ""
    current: str = ""


def parse_percent(text: str, option: str) -> float:
    """A tolerance: a finite, non-negative percentage (a negative one would call every unchanged cell a
    regression, a NaN none)."""
    try:
        value = float(str(text).strip().rstrip("%")) / 100
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise UserError(
            f"'{text}' is not a tolerance (a finite percentage of 0 or more).",
            key=option,
            fix=f"write it as e.g. {option} 5%.",
        )
    return value


def load_run(folder: Path, side: str = "current", notes: list[Change] | None = None) -> dict[str, dict[str, dict]]:
    """device -> cell id -> record, from every `<device>/results.json` under `folder`. A file cut short
    mid-write (a killed run) is bad input as a baseline, which must be whole; as the current run its
    complete cells are read, and `notes` says so."""
    out = {}
    for path in results_files(folder):
        data, cut = read_results(path)
        if cut and side == "baseline":
            raise UserError(
                f"this baseline was cut short mid-write (a killed run or a full disk): only "
                f"{len(data['cells'])} complete cells could be read, and the gate would take the rest for new cells.",
                file=str(path),
                key="--baseline",
                fix="restore the baseline from the run's artifacts, or save a new one from a whole run "
                "(pytest --compat-save-baseline NAME).",
            )
        if cut and notes is not None:
            notes.append(
                Change(
                    path.parent.name,
                    "*",
                    "note",
                    "results file cut short mid-write",
                    "",
                    f"{len(data['cells'])} complete cells read",
                )
            )
        out[path.parent.name] = latest_records(data)
    return out


def _peak(record: dict) -> float | None:
    return (record.get("measurements") or {}).get("peak_memory_mib")


def _latency(record: dict) -> float | None:
    return (record.get("measurements") or {}).get(LATENCY_METRIC)


def _latency_spread(record: dict) -> dict:
    return ((record.get("measurements") or {}).get("latency") or {}).get(LATENCY_METRIC) or {}


def _latency_max(record: dict) -> float | None:
    """The slowest of the baseline's timed repeats (its single sample when it ran once)."""
    return _latency_spread(record).get("max", _latency(record))


def _timed_runs(record: dict) -> int:
    return _latency_spread(record).get("n", 1)


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


def _first_line(record: dict) -> str:
    return (record.get("message") or "").split("\n")[0][:200]


def _outcome_change(device: str, cell_id: str, base: dict, cur: dict) -> Change | None:
    b, c = base["outcome"], cur["outcome"]
    failed_now = f"{c} [{cur.get('category')}]"
    if b in RAN and c == "xfailed":
        return Change(
            device, cell_id, "regression", f"{b} -> xfailed (fails now, as the matrix expects)", b, failed_now
        )
    if b in PASSING | RAN and c in FAILING:
        return Change(device, cell_id, "regression", f"{b} -> {c}", b, failed_now)
    if b in PASSING | RAN and c == "skipped":
        return Change(device, cell_id, "regression", f"{b} -> skipped", b, f"skipped: {_first_line(cur)}")
    if b == "skipped" and c in FAILING:
        return Change(device, cell_id, "regression", "skipped -> " + c, "skipped", failed_now)
    if b in FAILING and c in FAILING and base.get("category") != cur.get("category"):
        return Change(
            device,
            cell_id,
            "regression",
            "failure category changed",
            str(base.get("category")),
            str(cur.get("category")),
        )
    if (b in FAILING and c in PASSING | RAN) or (b == "xfailed" and c in RAN):
        return Change(device, cell_id, "improvement", f"{b} -> {c}", f"{b} [{base.get('category')}]", c)
    if b != c:
        return Change(device, cell_id, "note", f"{b} -> {c}", b, c)
    return None


def _memory_changes(device: str, cell_id: str, base: dict, cur: dict, tolerance: float) -> list[Change]:
    if _peak(base) is not None and _peak(cur) is None:
        return [
            Change(
                device, cell_id, "regression", "peak memory no longer measured", f"{_peak(base):.4g} MiB", "unmeasured"
            )
        ]
    rise = _rise(_peak(base), _peak(cur))
    if rise is None:
        return []
    text = (f"{_peak(base):.4g} MiB", f"{_peak(cur):.4g} MiB ({rise:+.1%})")
    if rise > tolerance:
        return [Change(device, cell_id, "regression", f"peak memory up beyond {tolerance:.0%}", *text)]
    if rise < -tolerance:
        return [Change(device, cell_id, "improvement", "peak memory down", *text)]
    return []


def _latency_changes(device: str, cell_id: str, base: dict, cur: dict, tolerance: float | None) -> list[Change]:
    """Latency regresses only when its median rises beyond the tolerance AND above the slowest of the
    baseline's repeats; without enough repeats (and no explicit tolerance) it is only a note."""
    rise = _rise(_latency(base), _latency(cur))
    if rise is None:
        return []
    runs = min(_timed_runs(base), _timed_runs(cur))
    judged = tolerance is not None or runs >= LATENCY_REPEATS
    tolerance = LATENCY_TOLERANCE if tolerance is None else tolerance
    said = (
        "" if judged else f" (not judged: {runs} timed runs; needs repeats >= {LATENCY_REPEATS} or --latency-tolerance)"
    )
    text = (f"{_latency(base):.4g} s (max {_latency_max(base):.4g})", f"{_latency(cur):.4g} s ({rise:+.1%})")
    if rise > tolerance and _latency(cur) > _latency_max(base):
        what = f"latency up beyond {tolerance:.0%} and the spread{said}"
        return [Change(device, cell_id, "regression" if judged else "note", what, *text)]
    if rise < -tolerance:
        return [Change(device, cell_id, "improvement" if judged else "note", f"latency down{said}", *text)]
    return []


def compare_cell(
    device: str, cell_id: str, base: dict, cur: dict, memory_tol: float, latency_tol: float | None = None
) -> list[Change]:
    """The changes of one cell: its outcome, then (where both runs ran it to the end) its measurements."""
    _check_outcome(base, device, cell_id, "baseline")
    _check_outcome(cur, device, cell_id, "current")
    out = [ch for ch in [_outcome_change(device, cell_id, base, cur)] if ch]
    if base["outcome"] in RAN and cur["outcome"] in RAN:
        out += _memory_changes(device, cell_id, base, cur, memory_tol)
        out += _latency_changes(device, cell_id, base, cur, latency_tol)
    return out


def _new_cell(device: str, cell_id: str, record: dict) -> Change:
    _check_outcome(record, device, cell_id, "current")
    if record["outcome"] in FAILING:
        return Change(
            device, cell_id, "regression", "new cell fails", "", f"{record['outcome']} [{record.get('category')}]"
        )
    return Change(device, cell_id, "new", "new cell", "", record["outcome"])


def compare(
    baseline: Path,
    current: Path,
    memory_tol: float = 0.05,
    latency_tol: float | None = None,
    unchecked_fails: bool = False,
) -> list[Change]:
    """Every change between the two runs; `latency_tol` None: latency judged only with enough repeats;
    `unchecked_fails`: a pass whose drift or agreement had no twin to compare with is a regression."""
    changes: list[Change] = []
    base_run, cur_run = load_run(baseline, "baseline"), load_run(current, "current", changes)
    for device, cells in cur_run.items():
        for cell_id, record in cells.items():
            if record.get("outcome") == "passed" and record.get("unchecked"):
                kind = "regression" if unchecked_fails else "note"
                changes.append(Change(device, cell_id, kind, "passed unchecked", "", "; ".join(record["unchecked"])))
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
        changes += [
            _new_cell(device, cell_id, cur_cells[cell_id]) for cell_id in sorted(cur_cells.keys() - base_cells.keys())
        ]
    for device in sorted(cur_run.keys() - base_run.keys()):
        changes.append(Change(device, "*", "new", "new device", "", f"{len(cur_run[device])} cells"))
        failing = (_new_cell(device, cell_id, record) for cell_id, record in cur_run[device].items())
        changes += [ch for ch in failing if ch.kind == "regression"]
    order = {"regression": 0, "improvement": 1, "new": 2, "note": 3}
    return sorted(changes, key=lambda ch: (order[ch.kind], ch.device, ch.cell))


def regressions(changes: list[Change]) -> int:
    return sum(ch.kind == "regression" for ch in changes)


def markdown(changes: list[Change]) -> str:
    found = regressions(changes)
    lines = [
        f"# qwen-compat gate: {'FAIL' if found else 'PASS'} ({found} regressions)",
        "",
        "| kind | device | cell | what | baseline | current |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        "| " + " | ".join(_cell_text(v) for v in (ch.kind, ch.device, ch.cell, ch.what, ch.baseline, ch.current)) + " |"
        for ch in changes
    ]
    return "\n".join(lines) + "\n"


def _cell_text(value: str) -> str:
    """A Markdown table cell: one line, no column break."""
    return str(value).replace("|", "/").replace("\n", " ")


def write(changes: list[Change], out: Path) -> None:
    found = regressions(changes)
    write_report(
        out / "gate.json",
        json.dumps(
            {"passed": found == 0, "regressions": found, "changes": [asdict(ch) for ch in changes]},
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
    found = regressions(changes)
    console.print(f"gate: {'FAIL' if found else 'PASS'}: {found} regressions, {len(changes)} changes")
