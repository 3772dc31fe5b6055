"""The page a person reads: summary.md and a self-contained summary.html per device.

A grid of the matrix (rows: model / device / dtype / attention; columns: resolution / input / budget)
coloured by outcome, with category and remedy on failing cells, and two plots embedded as PNG:
peak memory against visual tokens per dtype, and time to first token against visual tokens.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

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


def _plot(cells: list[dict], y_key: str, y_label: str, title: str) -> str | None:
    """A PNG (base64) of y against visual tokens, one series per dtype; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for c in cells:
        m = c.get("measurements") or {}
        if m.get("visual_tokens") is not None and m.get(y_key) is not None:
            series[c["dtype"]].append((m["visual_tokens"], m[y_key]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for dtype, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.scatter(xs, ys, label=dtype, s=18)
    ax.set_xlabel("visual tokens")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


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


def markdown(data: dict, stats: dict) -> str:
    cells = list(latest_records(data).values())
    env = data["environment"]
    lines = [
        f"# qwen-compat: {env['device']} ({env['gpu_name']})",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, flash-attn {env['flash_attn']}, "
        f"vLLM {env['vllm']}, Python {env['python']}; matrix `{env['matrix_file']}`"
        + (f"; emulated on {env['emulated_on']}" if env.get("emulated_on") else ""),
        "",
        "Outcomes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts(cells).items()))
        + (f"; model loads: {stats['model_loads']}, worker starts: {stats['worker_starts']}" if stats else ""),
        "",
        plan_accuracy(cells),
        "",
        "| cell | outcome | category | peak MiB (source) | predicted MiB (error) | visual tokens | TTFT s "
        "| placement: map, vs single | remedy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m = c.get("measurements") or {}
        peak = f"{m['peak_memory_mib']:.0f} ({m['peak_memory_source']})" if m.get("peak_memory_mib") else ""
        predicted = (c.get("prediction") or {}).get("predicted_peak_mib")
        plan = f"{predicted:.0f} ({_prediction_error(c)})" if predicted else ""
        lines.append(
            f"| {c['id']} | {c['outcome']} | {c.get('category') or ''} | {peak} | {plan} | "
            f"{m.get('visual_tokens', '')} | {m.get('prefill_s', '')} | {_placement(c)} | "
            f"{(c.get('remedy') or '').replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def html_page(data: dict, stats: dict) -> str:
    cells = list(latest_records(data).values())
    env = data["environment"]
    rows, cols, table = grid(cells)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        tds = []
        for k in cols:
            c = table[r].get(k)
            if c is None:
                tds.append("<td class='empty'></td>")
                continue
            m = c.get("measurements") or {}
            detail = f"{m['peak_memory_mib']:.0f} MiB · {m.get('visual_tokens')} vt" if m.get("peak_memory_mib") else ""
            if _prediction_error(c):
                detail += f" · plan {_prediction_error(c)}"
            if _slowdown(c):
                detail += f" · vs single: {_slowdown(c)}"
            extra = ""
            if c["outcome"] in ("failed", "error", "xfailed", "xpassed-strict"):
                extra = (
                    f"<div class='cat'>{esc(c.get('category') or '')}</div>"
                    f"<div class='remedy'>{esc(c.get('remedy') or '')}</div>"
                )
            elif c["outcome"] == "skipped":
                extra = f"<div class='remedy'>{esc(c.get('message') or '')}</div>"
            tds.append(
                f"<td class='cell {c['outcome']}' id='{esc(c['id'])}' title='{esc(c['id'])}' "
                f"style='background:{COLOURS.get(c['outcome'], '#fff')}'>"
                f"<b>{c['outcome']}</b><div>{detail}</div>{extra}</td>"
            )
        body.append(f"<tr><th>{esc(r)}</th>{''.join(tds)}</tr>")
    plots = [
        (_plot(cells, "peak_memory_mib", "peak memory (MiB)", "Peak memory vs visual tokens"), "memory"),
        (_plot(cells, "prefill_s", "time to first token (s)", "Latency vs visual tokens"), "latency"),
    ]
    imgs = "".join(
        f"<figure><img class='plot' id='plot-{name}' alt='{name} plot' src='data:image/png;base64,{png}'></figure>"
        for png, name in plots
        if png
    )
    emulated = esc(" · emulated on " + env["emulated_on"]) if env.get("emulated_on") else ""
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts(cells).items()))
    loads = f"; model loads: {stats['model_loads']}, worker starts: {stats['worker_starts']}" if stats else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qwen-compat {esc(env["device"])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #bbb;padding:4px;vertical-align:top}}td.cell{{min-width:9em}}
.cat{{font-weight:bold;color:#900}}.remedy{{font-size:11px;color:#333}}figure{{display:inline-block}}</style></head>
<body><h1>qwen-compat: {esc(env["device"])} ({esc(env["gpu_name"])})</h1>
<p>torch {esc(env["torch"])}, transformers {esc(env["transformers"])}, flash-attn {esc(env["flash_attn"])},
vLLM {esc(env["vllm"])}; matrix {esc(str(env["matrix_file"]))}{emulated}</p>
<p id="counts">{esc(summary)}{esc(loads)}</p><p id="plan">{esc(plan_accuracy(cells))}</p>
<table id="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>
<div id="plots">{imgs}</div></body></html>"""


def write_summaries(reports_dir: Path, stats: dict | None = None) -> None:
    data = load_results(reports_dir / "results.json")
    stats = stats or {}
    write_report(reports_dir / "run.json", json.dumps(stats, indent=1))
    write_report(reports_dir / "summary.md", markdown(data, stats))
    write_report(reports_dir / "summary.html", html_page(data, stats))
