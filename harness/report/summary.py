"""The page a person reads: summary.md and a self-contained summary.html per device, and what else a
run derives from its results.json: junit.xml, results.csv and the CI job summary.

The page opens with when, from which commit and where the run ran; then a grid of the matrix (rows:
model / device / dtype / attention; columns: resolution / input / budget) coloured by outcome, with
category, message and remedy on failing cells and a link to their worker's stderr tail or server log;
and two plots embedded as PNG: peak memory and time to first token against visual tokens, one line per
model, dtype and attention, with the card's memory and the cells' budgets as lines.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from harness.report import plots
from harness.report.ci import append_step_summary
from harness.report.exports import device_csv
from harness.report.junit import JUnitOptions, junit_xml
from harness.report.provenance import recorded_runner
from harness.report.results import latest_records, load_results, write_report

COLOURS = {
    "passed": "#c8f7c5",
    "failed": "#f7c5c5",
    "error": "#e3b5f0",
    "skipped": "#eeeeee",
    "xfailed": "#c5e3f7",
    "xpassed": "#fbeaa5",
    "xpassed-strict": "#f7c5c5",
}


def _row_key(c: dict) -> str:
    return f"{c['model']} · {c['device']} · {c['dtype']} · {c['attn_implementation']}"


def _col_key(c: dict) -> str:
    budget = "".join(f" {k.split('_')[0]}={c[k]}" for k in ("min_pixels", "max_pixels") if c.get(k))
    return f"{c['resolution']} {c['input']}{budget}"


def grid(cells: list[dict]) -> tuple[list[str], list[str], dict]:
    rows, cols, table = [], [], defaultdict(dict)
    for c in cells:
        r, k = _row_key(c), _col_key(c)
        if r not in rows:
            rows.append(r)
        if k not in cols:
            cols.append(k)
        table[r][k] = c
    return rows, cols, table


def counts(cells: list[dict]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for c in cells:
        out[c["outcome"]] += 1
    return dict(out)


def _relative_error(c: dict) -> float | None:
    """(predicted - measured) / measured peak memory of a cell, when both are known."""
    m = c.get("measurements") or {}
    predicted = (c.get("prediction") or {}).get("predicted_peak_mib")
    if predicted and m.get("peak_memory_mib"):
        return (predicted - m["peak_memory_mib"]) / m["peak_memory_mib"]
    return None


def _prediction_error(c: dict) -> str:
    error = _relative_error(c)
    return "" if error is None else f"{error:+.0%}"


def plan_accuracy(cells: list[dict]) -> str:
    """One line on how well the memory plan predicted this run's peaks."""
    errors = [e for e in map(_relative_error, cells) if e is not None]
    if not errors:
        return ""
    mean_abs = sum(abs(e) for e in errors) / len(errors)
    worst = max(errors, key=abs)
    return f"memory plan vs measured: mean |error| {mean_abs:.1%}, worst {worst:+.1%} over {len(errors)} cells"


def _slowdown(c: dict) -> str:
    factors = c.get("slowdown_vs_single") or {}
    return ", ".join(
        f"{label} ×{factors[key]:g}" for key, label in (("ttft", "TTFT"), ("decode", "decode")) if key in factors
    )


def _placement(c: dict) -> str:
    """Where a non-single cell's modules landed, its peak per device and its cost against `single`."""
    m = c.get("measurements") or {}
    if not m.get("device_map_summary"):
        return ""
    peaks = ", ".join(f"{device} {mib:.0f}" for device, mib in (m.get("peaks_mib") or {}).items())
    parts = [m["device_map_summary"], f"peak MiB {peaks}" if peaks else "", _slowdown(c)]
    return "; ".join(p for p in parts if p).replace("|", "/")


FAILING = ("failed", "error", "xfailed", "xpassed-strict")
SERVER_LOG = re.compile(r"\blog (\S+\.log)\b")


def origin(env: dict) -> str:
    """When, from which commit, where: the line a reader needs first."""
    p = env.get("provenance") or {}
    commit = p.get("git_commit")
    parts = [
        f"started {p['started_utc']}" if p.get("started_utc") else "",
        f"commit {commit[:12]}{' (dirty)' if p.get('git_dirty') else ''}" if commit else "commit unknown",
        f"host {env.get('host')}" if env.get("host") else "",
        f"runner {p['runner']}" if p.get("runner") and p.get("runner") != env.get("host") else "",
        f"image {p['image']}" if p.get("image") else "",
        f"digest {p['image_digest']}" if p.get("image_digest") else "",
    ]
    return " · ".join(part for part in parts if part)


def versions(env: dict) -> str:
    return (
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, flash-attn {env.get('flash_attn')}, "
        f"vLLM {env.get('vllm')}, Python {env.get('python')}; matrix `{env.get('matrix_file')}`"
        + (f"; emulated on {env['emulated_on']}" if env.get("emulated_on") else "")
    )


def _first_line(text: str | None, limit: int = 300) -> str:
    return (text or "").strip().split("\n")[0][:limit]


def _md(text) -> str:
    return str(text or "").replace("|", "/").replace("\n", " ")


def _counts_text(cells: list[dict]) -> str:
    said = ", ".join(f"{k} {v}" for k, v in sorted(counts(cells).items()))
    unchecked = sum(1 for c in cells if c.get("unchecked") and c.get("outcome") == "passed")
    return said + (f" ({unchecked} passed with a check unchecked: no twin in the run)" if unchecked else "")


def markdown(data: dict, stats: dict) -> str:
    cells = list(latest_records(data).values())
    env = data["environment"]
    lines = [
        f"# qwen-compat: {env.get('device')} ({env.get('gpu_name')})",
        "",
        origin(env),
        "",
        versions(env),
        "",
        "Outcomes: "
        + _counts_text(cells)
        + (f"; model loads: {stats['model_loads']}, worker starts: {stats['worker_starts']}" if stats else ""),
        "",
        plan_accuracy(cells),
        "",
        "| cell | outcome | category | peak MiB (source) | predicted MiB (error) | visual tokens | TTFT s "
        "| placement: map, vs single | message | remedy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m = c.get("measurements") or {}
        peak = f"{m['peak_memory_mib']:.0f} ({m['peak_memory_source']})" if m.get("peak_memory_mib") else ""
        predicted = (c.get("prediction") or {}).get("predicted_peak_mib")
        plan = f"{predicted:.0f} ({_prediction_error(c)})" if predicted else ""
        message = _first_line(c.get("message")) if c.get("outcome") in (*FAILING, "skipped") else ""
        if c.get("unchecked"):
            message = (message + " " if message else "") + "unchecked: " + "; ".join(c["unchecked"])
        lines.append(
            f"| {c['id']} | {c.get('outcome')} | {c.get('category') or ''} | {peak} | {plan} | "
            f"{m.get('visual_tokens', '')} | {m.get('prefill_s', '')} | {_placement(c)} | "
            f"{_md(message)} | {_md(c.get('remedy'))} |"
        )
    return "\n".join(lines) + "\n"


def step_markdown(data: dict, stats: dict, limit: int = 100) -> str:
    """The run as a CI job summary: where it ran, its counts, and its failing cells with message and remedy."""
    cells = list(latest_records(data).values())
    env = data["environment"]
    failing = [c for c in cells if c.get("outcome") in FAILING and c.get("outcome") != "xfailed"]
    lines = [
        f"## qwen-compat: {env.get('device')} ({env.get('gpu_name')}) on {recorded_runner(env)}",
        "",
        origin(env),
        "",
        f"**{len(cells)} cells**: {_counts_text(cells)}"
        + ("; the run was interrupted" if (stats or {}).get("interrupted") else ""),
        "",
    ]
    if failing:
        lines += ["| failing cell | outcome | category | message | remedy |", "|---|---|---|---|---|"]
        lines += [
            f"| {_md(c['id'])} | {c.get('outcome')} | {c.get('category') or ''} | {_md(_first_line(c.get('message')))} "
            f"| {_md(c.get('remedy'))} |"
            for c in failing[:limit]
        ]
        if len(failing) > limit:
            lines.append(f"\n{len(failing) - limit} more failing cells: see summary.md in the reports artifact.")
    return "\n".join(lines) + "\n"


def _server_log(c: dict, reports_dir: Path) -> str | None:
    """A link (relative to the page) to the server log a failing served cell's message names, if it exists."""
    found = SERVER_LOG.search(c.get("message") or "")
    if not found or not Path(found[1]).is_file():
        return None
    return os.path.relpath(Path(found[1]).resolve(), Path(reports_dir).resolve())


def _failure_detail(c: dict, tail_id: str | None, log: str | None) -> str:
    esc = html.escape
    links = []
    if tail_id:
        links.append(f"<a href='#{tail_id}'>worker stderr (tail)</a>")
    if log:
        links.append(f"<a href='{esc(log)}'>server log</a>")
    return (
        f"<div class='cat'>{esc(c.get('category') or '')}</div>"
        f"<div class='message'>{esc(_first_line(c.get('message')))}</div>"
        f"<div class='remedy'>{esc(c.get('remedy') or '')}</div>"
        + (f"<div class='links'>{' · '.join(links)}</div>" if links else "")
    )


def _plots(cells: list[dict], env: dict) -> list[tuple[str | None, str]]:
    labelled = [(plots.series_label(c), c) for c in cells]
    lines = plots.memory_lines(cells, env.get("gpu_memory_mib"))
    return [
        (
            plots.against_visual_tokens(
                labelled, "peak_memory_mib", "peak memory (MiB)", "Peak memory vs visual tokens", lines
            ),
            "memory",
        ),
        (
            plots.against_visual_tokens(labelled, "prefill_s", "time to first token (s)", "Latency vs visual tokens"),
            "latency",
        ),
    ]


def html_page(data: dict, stats: dict, reports_dir: Path = Path(".")) -> str:
    cells = list(latest_records(data).values())
    env = data["environment"]
    rows, cols, table = grid(cells)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body, tails = [], []
    for r in rows:
        tds = []
        for k in cols:
            c = table[r].get(k)
            if c is None:
                tds.append("<td class='empty'></td>")
                continue
            m = c.get("measurements") or {}
            outcome = c.get("outcome")
            detail = f"{m['peak_memory_mib']:.0f} MiB · {m.get('visual_tokens')} vt" if m.get("peak_memory_mib") else ""
            if _prediction_error(c):
                detail += f" · plan {_prediction_error(c)}"
            if _slowdown(c):
                detail += f" · vs single: {_slowdown(c)}"
            extra = ""
            if outcome in FAILING:
                tail_id = None
                if c.get("stderr_tail"):
                    tail_id = f"tail-{len(tails)}"
                    tails.append(
                        f"<details id='{tail_id}'><summary>{esc(c['id'])}: worker stderr (tail)</summary>"
                        f"<pre>{esc(c['stderr_tail'])}</pre></details>"
                    )
                extra = _failure_detail(c, tail_id, _server_log(c, reports_dir))
            elif outcome == "skipped":
                extra = f"<div class='remedy'>{esc(c.get('message') or '')}</div>"
            if c.get("unchecked"):
                extra += f"<div class='unchecked'>unchecked: {esc('; '.join(c['unchecked']))}</div>"
            tds.append(
                f"<td class='cell {esc(str(outcome))}' id='{esc(c['id'])}' title='{esc(c['id'])}' "
                f"style='background:{COLOURS.get(outcome, '#fff')}'>"
                f"<b>{esc(str(outcome))}</b><div>{detail}</div>{extra}</td>"
            )
        body.append(f"<tr><th>{esc(r)}</th>{''.join(tds)}</tr>")
    imgs = "".join(
        f"<figure><img class='plot' id='plot-{name}' alt='{name} plot' src='data:image/png;base64,{png}'></figure>"
        for png, name in _plots(cells, env)
        if png
    )
    loads = f"; model loads: {stats['model_loads']}, worker starts: {stats['worker_starts']}" if stats else ""
    tails_html = f"<h2>Worker stderr of failing cells</h2><div id='tails'>{''.join(tails)}</div>" if tails else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qwen-compat {esc(str(env.get("device")))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:4px;vertical-align:top}}td.cell{{min-width:9em}}
.cat{{font-weight:bold;color:#900}}.message{{font-size:11px;color:#500}}.remedy{{font-size:11px;color:#333}}
.links{{font-size:11px}}figure{{display:inline-block}}pre{{white-space:pre-wrap;font-size:11px}}</style></head>
<body><h1>qwen-compat: {esc(str(env.get("device")))} ({esc(str(env.get("gpu_name")))})</h1>
<p id="origin">{esc(origin(env))}</p>
<p>{esc(versions(env))}</p>
<p id="counts">{esc(_counts_text(cells))}{esc(loads)}</p><p id="plan">{esc(plan_accuracy(cells))}</p>
<table id="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>
<div id="plots">{imgs}</div>{tails_html}</body></html>"""


def write_summaries(reports_dir: Path, stats: dict | None = None, junit: JUnitOptions | None = None) -> list[str]:
    """Everything a run derives from its results.json; returns what the user should be told (a job
    summary that could not be appended)."""
    reports_dir = Path(reports_dir)
    data = load_results(reports_dir / "results.json")
    stats = stats or {}
    write_report(reports_dir / "run.json", json.dumps(stats, indent=1))
    write_report(reports_dir / "junit.xml", junit_xml(data, junit or JUnitOptions()))
    write_report(reports_dir / "results.csv", device_csv(data))
    write_report(reports_dir / "summary.md", markdown(data, stats))
    write_report(reports_dir / "summary.html", html_page(data, stats, reports_dir))
    warning = append_step_summary(step_markdown(data, stats))
    return [warning] if warning else []
