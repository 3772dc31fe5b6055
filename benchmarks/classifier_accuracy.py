"""Accuracy of the failure classifier on the corpus of real error texts (tests/data/failure-corpus).

python benchmarks/classifier_accuracy.py                    # dev split: accuracy, confusion summary
python benchmarks/classifier_accuracy.py --split dev --misses   # ... and every miss, to write rules from
python benchmarks/classifier_accuracy.py --split heldout    # the reported figure: counts only
python benchmarks/classifier_accuracy.py --split heldout --no-fallback   # the rules alone

Accuracy per category, per source (the project a text comes from) and per kind of decision (a
specific rule, a family, a hint, the learned fallback, `other`), with the mean confidence of each
kind. The rules and the learned fallback are written and trained from the dev split and the
catalog; the held-out split is only measured, so its figure says how the classifier does on texts
it was not written from. For that reason the held-out report prints counts only, never the texts
or the misses. On the dev split the fallback has seen every text: its honest dev figure is the
leave-one-out one that benchmarks/train_failure_fallback.py prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.judge import failures, learned  # noqa: E402


def load(split: str, folder: Path) -> list[dict]:
    return yaml.safe_load((folder / f"{split}.yaml").read_text()) or []


class _NoFallback(learned.Model):
    def accepts(self, guess: learned.Guess) -> bool:
        return False


def kind(found: failures.Classification) -> str:
    if found.matched is None:
        return "other"
    if found.matched.startswith("learned:"):
        return "learned"
    rule = next(r for r in failures.rules() if r.id == found.matched)
    return failures.KINDS[rule.priority]


def measure(entries: list[dict], fallback: bool = True) -> tuple[dict[str, Counter], list[tuple[dict, object]]]:
    """Per grouping (category, source, kind), total and right counts; the misses with their classification."""
    model = learned.model() if fallback else _NoFallback(json.loads(learned.model_text()))
    counts = {name: Counter() for name in ("total", "right", "source", "source_right", "kind", "kind_right")}
    confidence: Counter = Counter()
    misses = []
    for entry in entries:
        found = failures._classify(entry["text"], model)
        ok = found.category == entry["category"]
        decided = kind(found)
        counts["total"][entry["category"]] += 1
        counts["right"][entry["category"]] += ok
        counts["source"][entry["source"]] += 1
        counts["source_right"][entry["source"]] += ok
        counts["kind"][decided] += 1
        counts["kind_right"][decided] += ok
        confidence[decided] += found.confidence
        if not ok:
            misses.append((entry, found))
    counts["confidence"] = confidence
    return counts, misses


def _table(title: str, total: Counter, right: Counter, order: list[str], extra: Counter | None = None) -> None:
    print(f"\n{title:32} {'right':>5} {'total':>5} {'accuracy':>8}" + ("  mean confidence" if extra else ""))
    for key in order:
        line = f"{key:32} {right[key]:5} {total[key]:5} {right[key] / total[key]:8.1%}"
        print(line + (f"  {extra[key] / total[key]:.3f}" if extra else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "heldout"], default="dev")
    parser.add_argument("--corpus", type=Path, default=REPO / "tests" / "data" / "failure-corpus")
    parser.add_argument("--misses", action="store_true", help="dev only: print every miss with its evidence")
    parser.add_argument("--no-fallback", action="store_true", help="the catalog's rules alone, no learned fallback")
    args = parser.parse_args(argv)
    entries = load(args.split, args.corpus)
    counts, misses = measure(entries, fallback=not args.no_fallback)
    total, right = counts["total"], counts["right"]
    print(f"{args.split}: {len(entries)} texts from {args.corpus}" + (" (rules only)" if args.no_fallback else ""))
    _table("category", total, right, sorted(total))
    overall = sum(right.values()) / max(1, len(entries))
    print(f"{'overall':32} {sum(right.values()):5} {len(entries):5} {overall:8.1%}")
    kinds = [k for k in ("specific", "family", "hint", "learned", "other") if counts["kind"][k]]
    _table("decided by", counts["kind"], counts["kind_right"], kinds, counts["confidence"])
    by_source = sorted(counts["source"], key=lambda s: (-counts["source"][s], s))
    _table("source", counts["source"], counts["source_right"], by_source)
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
