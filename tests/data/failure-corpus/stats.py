"""Counts of the corpus per split: category, kind, source (counts only, never texts).

python tests/data/failure-corpus/stats.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main() -> None:
    splits = {name: yaml.safe_load((HERE / f"{name}.yaml").read_text()) or [] for name in ("dev", "heldout")}
    for field in ("category", "kind", "source"):
        counts = {name: Counter(e[field] for e in entries) for name, entries in splits.items()}
        keys = sorted(
            set(counts["dev"]) | set(counts["heldout"]), key=lambda k: (-(counts["dev"][k] + counts["heldout"][k]), k)
        )
        print(f"\n| {field} | dev | heldout | total |\n|---|---|---|---|")
        for key in keys:
            dev_n, held_n = counts["dev"][key], counts["heldout"][key]
            print(f"| {key} | {dev_n} | {held_n} | {dev_n + held_n} |")
        print(f"| **{len(keys)} distinct** | {len(counts['dev'])} | {len(counts['heldout'])} | |")
    dev, held = len(splits["dev"]), len(splits["heldout"])
    urls = {e["url"] for entries in splits.values() for e in entries}
    print(f"\ntotal: dev {dev}, heldout {held}, all {dev + held}; threads {len(urls)}")


if __name__ == "__main__":
    main()
