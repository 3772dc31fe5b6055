"""Failure classification: error text -> category, cause and remedy, from the project's catalog.

The catalog (harness/data/failure-catalog.yaml) records real reported failures, ordered specific
to generic; the first entry whose signature matches wins.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources

import yaml

# Errors after which a CUDA context cannot be trusted: the worker that saw one is replaced.
STICKY = re.compile(
    r"CUDA error|cudaError|CUBLAS_STATUS|illegal memory access|device-side assert|"
    r"too many resources requested",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Classification:
    category: str
    cause: str
    remedy: str
    matched: str | None  # catalog entry id, or None
    first_line: str

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def catalog() -> list[dict]:
    entries = yaml.safe_load(resources.files("harness.data").joinpath("failure-catalog.yaml").read_text())
    for entry in entries:
        entry["_regex"] = re.compile(entry["signature"], re.IGNORECASE | re.MULTILINE)
    return entries


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def classify(text: str) -> Classification:
    """Classify an error message, traceback or log; unknown text is `other`, first line kept."""
    for entry in catalog():
        if entry["_regex"].search(text):
            return Classification(
                entry["category"],
                " ".join(entry["cause"].split()),
                " ".join(entry["remedy"].split()),
                entry["id"],
                _first_line(text),
            )
    first = _first_line(text)
    return Classification(
        "other",
        f"not in the failure catalog: {first}" if first else "no error text",
        "read the stderr tail; if this is a recurring failure, add an entry to harness/data/failure-catalog.yaml",
        None,
        first,
    )


def is_sticky(text: str) -> bool:
    return bool(STICKY.search(text))
