"""The fleet view: many runners' per-device results merged into one page, fleet.html and fleet.md.

A column per runner and card (two A10G runners stay two columns, each linking to its own summary
page), a row per model and dtype, each cell with its outcome counts, peak memory and time to first
token; then, per card, peak memory and TTFT against visual tokens (one line per model and dtype, the
card's memory as a line) and a pass-rate heatmap of every row against every column.
"""

from __future__ import annotations

import html
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from harness.report import plots
from harness.report.gate import FAILING
from harness.report.provenance import recorded_runner
from harness.report.results import latest_records, load_results, results_files, write_report

RANK = ["xpassed-strict", "error", "failed", "xpassed", "xfailed", "passed", "skipped"]
PASSED = {"passed", "xpassed"}  # an expected failure (xfailed) is still a failure of the card
COLOURS = {
    "failed": "#f7c5c5",
    "error": "#e3b5f0",
    "xpassed-strict": "#f7c5c5",
    "xpassed": "#fbeaa5",
    "xfailed": "#c5e3f7",
    "passed": "#c8f7c5",
    "skipped": "#eeeeee",
}


@dataclass
class Column:
    """One runner's results for one card: one results.json."""

    device: str
    runner: str
    folder: Path
    environment: dict
    cells: list[dict]
    label: str = ""


@dataclass
class Entry:
    """The cells of one row (model, dtype) in one column."""

    outcomes: Counter = field(default_factory=Counter)
    peaks: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def add(self, record: dict) -> None:
        self.outcomes[record.get("outcome", "?")] += 1
        m = record.get("measurements") or {}
        if m.get("peak_memory_mib") is not None:
            self.peaks.append(m["peak_memory_mib"])
        if m.get("prefill_s") is not None:
            self.ttfts.append(m["prefill_s"])

    def worst(self) -> str:
        return next((o for o in RANK if self.outcomes.get(o)), "skipped")

    def text(self) -> str:
        order = {o: i for i, o in enumerate(RANK)}
        parts = [", ".join(f"{n} {o}" for o, n in sorted(self.outcomes.items(), key=lambda kv: order.get(kv[0], 99)))]
        if self.peaks:
            parts.append(f"peak {max(self.peaks):.0f} MiB")
        if self.ttfts:
            parts.append(f"TTFT {statistics.median(self.ttfts):.3g} s")
        return "; ".join(parts)

    def pass_rate(self) -> tuple[int, int]:
        ran = sum(n for o, n in self.outcomes.items() if o != "skipped")
        return sum(n for o, n in self.outcomes.items() if o in PASSED), ran


def columns(folders: list[Path]) -> list[Column]:
    """A column per results.json found, labelled by card and runner (and folder where those repeat)."""
    found = []
    for folder in folders:
        for path in results_files(folder):
            data = load_results(path)
            env = data.get("environment") or {}
            found.append(
                Column(
                    env.get("device") or path.parent.name,
                    recorded_runner(env),
                    path.parent,
                    env,
                    list(latest_records(data).values()),
                )
            )
    labels = Counter((c.device, c.runner) for c in found)
    for c in found:
        c.label = f"{c.device} · {c.runner}" + (f" · {c.folder}" if labels[(c.device, c.runner)] > 1 else "")
    return sorted(found, key=lambda c: (c.device, c.runner, str(c.folder)))


def row_key(record: dict) -> str:
    return f"{record.get('model')} · {record.get('dtype')}"


def table(cols: list[Column]) -> tuple[list[str], dict[tuple[str, str], Entry]]:
    entries: dict[tuple[str, str], Entry] = defaultdict(Entry)
    for col in cols:
        for record in col.cells:
            entries[(row_key(record), col.label)].add(record)
    return sorted({r for r, _ in entries}), entries


def card_plots(cols: list[Column]) -> list[tuple[str, str, str]]:
    """(card, plot name, PNG) for each card: memory and TTFT against visual tokens."""
    out = []
    for device in sorted({c.device for c in cols}):
        same = [c for c in cols if c.device == device]
        several = len(same) > 1
        labelled = [(plots.series_label(r, col.runner if several else None), r) for col in same for r in col.cells]
        cells = [r for col in same for r in col.cells]
        lines = plots.memory_lines(cells, same[0].environment.get("gpu_memory_mib"))
        memory = plots.against_visual_tokens(
            labelled, "peak_memory_mib", "peak memory (MiB)", f"{device}: peak memory vs visual tokens", lines
        )
        latency = plots.against_visual_tokens(
            labelled, "prefill_s", "time to first token (s)", f"{device}: TTFT vs visual tokens"
        )
        out += [(device, name, png) for name, png in (("memory", memory), ("latency", latency)) if png]
    return out


def write(folders: list[Path], out: Path) -> tuple[Path, Path]:
    cols = columns(folders)
    rows, entries = table(cols)
    out = Path(out)
    link = {c.label: os.path.relpath(c.folder / "summary.html", out) for c in cols}
    esc = html.escape
    md = [
        "# qwen-compat fleet",
        "",
        "| model · dtype | " + " | ".join(c.label for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    body = []
    for r in rows:
        found = [entries.get((r, c.label)) for c in cols]
        md.append(
            f"| {r} | "
            + " | ".join(f"[{e.text()}]({link[c.label]})" if e else "" for e, c in zip(found, cols, strict=True))
            + " |"
        )
        tds = "".join(
            f"<td style='background:{COLOURS.get(e.worst(), '#fff')}' class='{e.worst()}'>"
            f"<a href='{esc(link[c.label])}'>{esc(e.text())}</a></td>"
            if e
            else "<td></td>"
            for e, c in zip(found, cols, strict=True)
        )
        body.append(f"<tr><th>{esc(r)}</th>{tds}</tr>")
    failing = sum(n for e in entries.values() for o, n in e.outcomes.items() if o in FAILING)
    rates = {key: e.pass_rate() for key, e in entries.items()}
    heatmap = plots.pass_rate_heatmap(rows, [c.label for c in cols], rates)
    figures = [("all", "pass-rate", heatmap)] if heatmap else []
    figures += card_plots(cols)
    images = "".join(
        f"<figure><img class='plot' id='plot-{esc(device)}-{name}' alt='{esc(device)} {name} plot' "
        f"src='data:image/png;base64,{png}'></figure>"
        for device, name, png in figures
    )
    header = "".join(f"<th><a href='{esc(link[c.label])}'>{esc(c.label)}</a></th>" for c in cols)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>qwen-compat fleet</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #bbb;padding:6px;vertical-align:top}figure{display:inline-block}"
        f"</style></head><body><h1>qwen-compat fleet</h1><p>{len(cols)} runner and card columns, "
        f"{failing} failing cells</p><table id='fleet'><tr><th>model · dtype</th>{header}</tr>{''.join(body)}</table>"
        f"<div id='plots'>{images}</div></body></html>"
    )
    md += ["", f"{len(cols)} runner and card columns, {failing} failing cells."]
    write_report(out / "fleet.md", "\n".join(md) + "\n")
    write_report(out / "fleet.html", page)
    return out / "fleet.html", out / "fleet.md"
