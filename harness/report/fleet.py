"""The fleet view: many runners' per-device results merged into one models x devices page."""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from pathlib import Path

from harness.report.gate import FAILING, load_run
from harness.report.results import write_report

RANK = ["xpassed-strict", "error", "failed", "xpassed", "xfailed", "passed", "skipped"]
COLOURS = {
    "failed": "#f7c5c5",
    "error": "#e3b5f0",
    "xpassed-strict": "#f7c5c5",
    "xpassed": "#fbeaa5",
    "xfailed": "#c5e3f7",
    "passed": "#c8f7c5",
    "skipped": "#eeeeee",
}


def merge(folders: list[Path]) -> tuple[dict[str, dict[str, Counter]], dict[str, Path]]:
    """model -> device -> outcome counts, and device -> the folder that holds its summary."""
    grid: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    where: dict[str, Path] = {}
    for folder in folders:
        for device, cells in load_run(folder).items():
            where[device] = Path(folder) / device
            for record in cells.values():
                grid[record["model"]][device][record["outcome"]] += 1
    return grid, where


def _worst(counts: Counter) -> str:
    return next(o for o in RANK if counts.get(o)) if counts else "skipped"


def _text(counts: Counter) -> str:
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items(), key=lambda kv: RANK.index(kv[0])))


def write(folders: list[Path], out: Path) -> tuple[Path, Path]:
    grid, where = merge(folders)
    devices = sorted(where)
    out.mkdir(parents=True, exist_ok=True)
    link = {d: os.path.relpath(where[d] / "summary.html", out) for d in devices}
    md = ["# qwen-compat fleet", "", "| model | " + " | ".join(devices) + " |", "|---|" + "---|" * len(devices)]
    rows = []
    for model in sorted(grid):
        md.append(
            f"| {model} | "
            + " | ".join(f"[{_text(grid[model][d])}]({link[d]})" if grid[model].get(d) else "" for d in devices)
            + " |"
        )
        tds = []
        for d in devices:
            counts = grid[model].get(d)
            if not counts:
                tds.append("<td></td>")
                continue
            worst = _worst(counts)
            tds.append(
                f"<td style='background:{COLOURS[worst]}' class='{worst}'><a href='{html.escape(link[d])}'>"
                f"{html.escape(_text(counts))}</a></td>"
            )
        rows.append(f"<tr><th>{html.escape(model)}</th>{''.join(tds)}</tr>")
    failing = sum(n for m in grid.values() for c in m.values() for o, n in c.items() if o in FAILING)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qwen-compat fleet</title><style>"
        f"body{{font-family:sans-serif}}table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:6px}}"
        f"</style></head><body><h1>qwen-compat fleet</h1><p>{len(devices)} devices, {failing} failing cells</p>"
        f"<table id='fleet'><tr><th>model</th>{''.join(f'<th>{html.escape(d)}</th>' for d in devices)}</tr>"
        f"{''.join(rows)}</table></body></html>"
    )
    write_report(out / "fleet.md", "\n".join(md) + "\n")
    write_report(out / "fleet.html", page)
    return out / "fleet.html", out / "fleet.md"
