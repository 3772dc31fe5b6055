"""Append new corpus entries to dev.yaml or heldout.yaml by the split rule; the only writer of both files.

python tests/data/failure-corpus/add.py NEW.yaml [NEW2.yaml ...]

NEW.yaml is a YAML list of entries (url, source, category, kind, text). Each entry goes to the side
its URL's hash decides (see README.md: sha256(url) odd -> heldout), whatever its text says; a text
already in either file (whitespace-normalised) is skipped. Prints counts only, never held-out texts,
and re-parses both files after writing.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from harness.matrix.schema import CATEGORIES as VERDICT_CATEGORIES  # noqa: E402

# over-budget and wrong-answer are the harness's own verdicts on a cell that ran: no failure text has them
CATEGORIES = set(VERDICT_CATEGORIES) - {"over-budget", "wrong-answer"}
KINDS = {"traceback", "log", "prose", "one-line", "output-text"}
FIELDS = ("url", "source", "category", "kind", "text")


def side(url: str) -> str:
    """The split an entry belongs to, from its URL alone (fixed rule, never re-drawn)."""
    return "heldout" if int(hashlib.sha256(url.encode()).hexdigest(), 16) % 2 == 1 else "dev"


def normalised(text: str) -> str:
    return " ".join(text.split())


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def check(entry: dict, where: str) -> dict:
    missing = [f for f in FIELDS if not entry.get(f)]
    if missing:
        raise SystemExit(f"{where}: missing {', '.join(missing)}")
    if entry["category"] not in CATEGORIES:
        raise SystemExit(f"{where}: unknown category {entry['category']!r}")
    if entry["kind"] not in KINDS:
        raise SystemExit(f"{where}: unknown kind {entry['kind']!r}")
    if not entry["url"].startswith("https://"):
        raise SystemExit(f"{where}: url must be https: {entry['url']!r}")
    text = entry["text"] if entry["text"].endswith("\n") else entry["text"] + "\n"
    fields = ("url", "source", "category", "kind")
    return {**{name: entry[name] for name in fields}, "text": text}


def main(paths: list[str]) -> int:
    files = {name: HERE / f"{name}.yaml" for name in ("dev", "heldout")}
    seen = set()
    for path in files.values():
        seen |= {normalised(e["text"]) for e in yaml.safe_load(path.read_text()) or []}
    added = {"dev": 0, "heldout": 0}
    skipped = 0
    for new in paths:
        entries = yaml.safe_load(Path(new).read_text()) or []
        for i, raw in enumerate(entries):
            entry = check(raw, f"{new} entry {i}")
            key = normalised(entry["text"])
            if key in seen:
                skipped += 1
                continue
            seen.add(key)
            target = side(entry["url"])
            dumped = yaml.dump([entry], Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=10_000)
            if yaml.safe_load(dumped) != [entry]:
                raise SystemExit(f"{new} entry {i}: does not survive a YAML round trip")
            with files[target].open("a") as out:
                out.write(dumped)
            added[target] += 1
    for path in files.values():
        yaml.safe_load(path.read_text())  # still parses
    print(f"added dev {added['dev']}, heldout {added['heldout']}; skipped {skipped} duplicate texts")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
