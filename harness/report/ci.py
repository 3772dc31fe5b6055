"""CI-native output: the run's, the gate's and the fleet view's Markdown appended to GitHub's job summary.

GitHub Actions names a file in GITHUB_STEP_SUMMARY for each step and shows what the step appended to it
on the run's page; it refuses a step's summary over 1 MiB, so each append is kept well under that.
Appending never fails a run: the reports are written already, and a summary that could not be
appended is said in one line.
"""

from __future__ import annotations

import os

from harness.secrets import scrub_text

STEP_SUMMARY = "GITHUB_STEP_SUMMARY"
LIMIT_BYTES = 512 * 1024


def fit(markdown: str, limit: int = LIMIT_BYTES) -> str:
    """Whole lines up to `limit` bytes, and a line saying where the rest is when cut."""
    if len(markdown.encode()) <= limit:
        return markdown
    kept, size = [], 0
    for line in markdown.splitlines(keepends=True):
        size += len(line.encode())
        if size > limit - 200:
            break
        kept.append(line)
    return "".join(kept) + "\n_(cut here to fit the job summary: the whole text is in the reports artifact)_\n"


def append_step_summary(markdown: str) -> str | None:
    """Append to the job summary when there is one; a one-line warning when it could not be written."""
    path = os.environ.get(STEP_SUMMARY)
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(fit(scrub_text(markdown)) + "\n")
    except OSError as exc:
        return f"could not append to the job summary {path} ({exc.strerror or exc}); the reports themselves are written"
    return None
