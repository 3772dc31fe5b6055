"""A line per finished cell while a matrix runs: `cell 37/204`, elapsed time and an ETA; coloured in a
terminal, plain text in CI logs. The ETA counts model loads apart from inference: the cells left
are timed at the mean inference time so far, plus one mean load per model group still to load."""

from __future__ import annotations

from collections import Counter

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


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Formats each finished cell with rich and hands the line to `write` (pytest's terminal).

    `planned` is this process's cells in run order (empty where it is not known, under xdist);
    `started` is when the run started, on `clock`'s scale.
    """

    def __init__(self, write, color: bool, planned=(), clock=None, started: float | None = None):
        import time

        self.write = write
        self.console = Console(force_terminal=color, no_color=not color, highlight=False, width=250)
        self.planned = list(planned)
        # loads_left[i]: model loads still to come once i cells are done (counted once, not per cell)
        self.loads_left = [0] * (len(self.planned) + 1)
        for i in range(len(self.planned) - 1, -1, -1):
            starts_group = i == 0 or self.planned[i].group != self.planned[i - 1].group
            self.loads_left[i] = self.loads_left[i + 1] + starts_group
        self.clock = clock or time.monotonic
        self.started = self.clock() if started is None else started
        self.count = 0
        self.outcomes: Counter = Counter()
        self.loads, self.load_s = 0, 0.0  # model loads so far and their seconds
        self.timed, self.inference_s = 0, 0.0  # cells timed so far and their inference seconds

    def eta(self) -> float | None:
        """Seconds left: remaining runnable cells x mean inference, plus a mean load per group to load."""
        left = len(self.planned) - self.count
        if left <= 0 or not self.timed:
            return None
        mean_load = self.load_s / self.loads if self.loads else 0.0
        return left * self.inference_s / self.timed + self.loads_left[self.count] * mean_load

    def cell_done(self, record: dict) -> None:
        self.count += 1
        self.outcomes[record["outcome"]] += 1
        m = record.get("measurements") or {}
        load = m.get("load_s") or 0.0
        if record.get("model_loaded"):
            self.loads, self.load_s = self.loads + 1, self.load_s + load
        if record.get("duration_s"):
            self.timed, self.inference_s = self.timed + 1, self.inference_s + max(record["duration_s"] - load, 0.0)
        style = STYLES.get(record["outcome"], "")
        total = len(self.planned) or "?"
        parts = [f"cell {self.count}/{total}", f"[{style}]{record['outcome'].upper():>8}[/]", escape(record["id"])]
        if m.get("peak_memory_mib") is not None:
            parts.append(f"{m['peak_memory_mib']:.0f} MiB ({m['peak_memory_source']})")
        if m.get("visual_tokens") is not None:
            parts.append(f"{m['visual_tokens']} visual tokens")
        if record.get("category") and record["outcome"] not in ("passed", "skipped"):
            parts.append(escape(f"[{record['category']}]"))
        eta = self.eta()
        timing = f"{duration(self.clock() - self.started)} elapsed" + (f", ETA {duration(eta)}" if eta else "")
        parts.append(timing)
        with self.console.capture() as captured:
            self.console.print("qwen-compat " + "  ".join(parts))
        self.write(captured.get().rstrip("\n"))

    def final_line(self, wall_s: float) -> str:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items()))
        return f"qwen-compat: {self.count} cells in {duration(wall_s)}: {counts}"
