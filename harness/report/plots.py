"""The plots people expect of a compatibility run, as PNG (base64) for self-contained pages: peak memory
and time to first token against visual tokens, one line per model and dtype (with the card's memory and
the cells' budgets as lines), and a pass-rate heatmap of models against runners and cards."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import sys
import threading
from collections import defaultdict


def import_in_background() -> None:
    """Import the plotting stack now, on a thread of its own at the lowest CPU priority: the run's end then draws
    its plots without the ~0.7 s of imports, and meanwhile the imports take only the CPU time cells leave idle.
    A failure here is left for the end, where the same import raises in the main thread."""

    def imports():
        if sys.platform.startswith("linux"):  # there a thread's nice value is its own, not its process's
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        with contextlib.suppress(Exception):
            from matplotlib.backends import backend_agg  # noqa: F401  (Figure.savefig renders PNG with it)
            from matplotlib.figure import Figure  # noqa: F401

    threading.Thread(target=imports, name="qwen-compat-plot-imports", daemon=True).start()


def _axes(figsize: tuple[float, float]):
    """A figure and its axes without pyplot: no GUI backend, no global figure registry, and half a second less
    of imports at the end of a run (Figure.savefig renders PNG with Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    return fig, fig.subplots()


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def series_label(cell: dict, runner: str | None = None) -> str:
    parts = [runner, cell.get("model"), cell.get("dtype"), cell.get("attn_implementation")]
    return " · ".join(str(p) for p in parts if p)


def against_visual_tokens(
    cells: list[tuple[str, dict]],
    y_key: str,
    y_label: str,
    title: str,
    lines: dict[str, float] | None = None,
) -> str | None:
    """y against visual tokens, one line per series label (cells are (label, record) pairs), cells that
    did not pass marked with a cross, and horizontal reference `lines` (label -> y); None when no cell
    has both figures."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    failing: list[tuple[float, float]] = []
    for label, c in cells:
        m = c.get("measurements") or {}
        if m.get("visual_tokens") is not None and m.get(y_key) is not None:
            series[label].append((m["visual_tokens"], m[y_key]))
            if c.get("outcome") not in ("passed", "xpassed"):
                failing.append((m["visual_tokens"], m[y_key]))
    if not series:
        return None
    fig, ax = _axes((9.5, 4))  # the plot 7 wide, the legend beside it
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, label=label)
    if failing:
        xs, ys = zip(*failing, strict=True)
        ax.scatter(xs, ys, marker="x", s=60, color="black", zorder=3, label="did not pass")
    for label, y in sorted((lines or {}).items(), key=lambda kv: kv[1]):
        ax.axhline(y, linestyle="--", linewidth=1, color="#b00", alpha=0.7)
        ax.annotate(label, (0, y), xycoords=("axes fraction", "data"), fontsize=8, color="#b00", va="bottom")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # "best" costs 0.3 s
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def memory_lines(cells: list[dict], card_mib: float | None) -> dict[str, float]:
    """The card's memory and the distinct budgets of the cells (at most three), as reference lines."""
    lines = {f"card {card_mib:.0f} MiB": float(card_mib)} if card_mib else {}
    budgets = sorted({(c.get("prediction") or {}).get("budget_mib") for c in cells} - {None})
    lines.update({f"budget {b:.0f} MiB": float(b) for b in budgets[:3]})
    return lines


def pass_rate_heatmap(rows: list[str], columns: list[str], rates: dict[tuple[str, str], tuple[int, int]]) -> str | None:
    """Rows x columns coloured by passed / ran (cells that ran, not skipped), each annotated 'p/n'."""
    if not rows or not columns or not rates:
        return None
    grid = [[math.nan] * len(columns) for _ in rows]
    for (r, c), (passed, ran) in rates.items():
        if ran:
            grid[rows.index(r)][columns.index(c)] = passed / ran
    fig, ax = _axes((1.6 + 1.3 * len(columns), 1.0 + 0.4 * len(rows)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    for (r, c), (passed, ran) in rates.items():
        ax.text(
            columns.index(c),
            rows.index(r),
            f"{passed}/{ran}" if ran else "skipped",
            ha="center",
            va="center",
            fontsize=7,
        )
    fig.colorbar(image, ax=ax, label="pass rate")
    ax.set_title("pass rate (passed / ran)")
    fig.tight_layout()
    return _png(fig)
