"""A line per finished cell while a matrix runs: coloured in a terminal, plain text in CI logs."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

STYLES = {
    "passed": "green",
    "failed": "bold red",
    "error": "bold magenta",
    "skipped": "yellow",
    "xfailed": "cyan",
    "xpassed": "bold yellow",
    "xpassed-strict": "bold red",
}


class Progress:
    """Formats each finished cell with rich and hands the line to `write` (pytest's terminal)."""

    def __init__(self, write, color: bool):
        self.write = write
        self.console = Console(force_terminal=color, no_color=not color, highlight=False, width=250)
        self.count = 0

    def cell_done(self, record: dict) -> None:
        self.count += 1
        m = record.get("measurements") or {}
        style = STYLES.get(record["outcome"], "")
        parts = [f"[{style}]{record['outcome'].upper():>8}[/]", escape(record["id"])]
        if m.get("peak_memory_mib") is not None:
            parts.append(f"{m['peak_memory_mib']:.0f} MiB ({m['peak_memory_source']})")
        if m.get("visual_tokens") is not None:
            parts.append(f"{m['visual_tokens']} visual tokens")
        if record.get("category") and record["outcome"] not in ("passed", "skipped"):
            parts.append(escape(f"[{record['category']}]"))
        with self.console.capture() as captured:
            self.console.print(f"qwen-compat {self.count:>4} " + "  ".join(parts))
        self.write(captured.get().rstrip("\n"))
