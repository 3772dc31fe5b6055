"""Accuracy of the failure classifier on the corpus of real error texts (tests/data/failure-corpus).

python benchmarks/classifier_accuracy.py                    # dev split: accuracy, confusion summary
python benchmarks/classifier_accuracy.py --split dev --misses   # ... and every miss, to write rules from
python benchmarks/classifier_accuracy.py --split heldout    # the reported figure: accuracy only

The rules are written from the dev split and the catalog; the held-out split is only measured, so
its figure says how the classifier does on texts it was not written from. For that reason the
held-out report prints counts only, never the texts or the misses.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.judge.failures import classify  # noqa: E402


def load(split: str, folder: Path) -> list[dict]:
    return yaml.safe_load((folder / f"{split}.yaml").read_text()) or []


def measure(entries: list[dict]) -> tuple[Counter, Counter, list[tuple[dict, object]]]:
    """(total per category, right per category, misses with their classification)."""
    total, right, misses = Counter(), Counter(), []
    for entry in entries:
        found = classify(entry["text"])
        total[entry["category"]] += 1
        if found.category == entry["category"]:
            right[entry["category"]] += 1
        else:
            misses.append((entry, found))
    return total, right, misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "heldout"], default="dev")
    parser.add_argument("--corpus", type=Path, default=REPO / "tests" / "data" / "failure-corpus")
    parser.add_argument("--misses", action="store_true", help="dev only: print every miss with its evidence")
    args = parser.parse_args(argv)
    entries = load(args.split, args.corpus)
    total, right, misses = measure(entries)
    print(f"{args.split}: {len(entries)} texts from {args.corpus}")
    print(f"{'category':32} {'right':>5} {'total':>5} {'accuracy':>8}")
    for category in sorted(total):
        print(f"{category:32} {right[category]:5} {total[category]:5} {right[category] / total[category]:8.1%}")
    overall = sum(right.values()) / max(1, len(entries))
    print(f"{'overall':32} {sum(right.values()):5} {len(entries):5} {overall:8.1%}")
    if args.split == "dev":
        confusion = Counter((e["category"], f.category) for e, f in misses)
        print("\nconfusion (expected -> classified: count)")
        for (expected, got), n in confusion.most_common():
            print(f"  {expected} -> {got}: {n}")
        if args.misses:
            for entry, found in misses:
                print(f"\n--- {entry['url']} ({entry['kind']}) expected {entry['category']}, got {found.category}")
                print(f"    matched {found.matched}: {found.evidence[:200]!r}")
                print("    " + entry["text"][:600].replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
