"""Train the failure classifier's learned fallback and calibrate its confidence, from the dev split only.

python benchmarks/train_failure_fallback.py           # write harness/data/failure-fallback.json
python benchmarks/train_failure_fallback.py --check   # exit 1 when the shipped file differs from a retrain

The model (harness/judge/learned.py) is trained on the corpus's dev split and the catalog's examples;
the held-out split is never read. The calibration replays the whole classifier on every dev text
with a model trained without that text (leave-one-out), so the fallback's decisions are counted as
they would be on a text it has not seen, and stores per kind of decision (a specific rule, a
family, a hint, the fallback, `other`; with a close runner-up or without) the rate of right
decisions, (right + 1) / (n + 2), with the counts. The rules were written from the same dev texts,
so the rates of the rule kinds are optimistic; the held-out figures of
benchmarks/classifier_accuracy.py say by how much. Deterministic: the same corpus and catalog give
the same file, byte for byte.
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

DEV = REPO / "tests" / "data" / "failure-corpus" / "dev.yaml"
OUTPUT = REPO / "harness" / "data" / learned.MODEL_FILE
RULE_KINDS = ("specific", "family", "hint")


def examples(dev: Path = DEV) -> list[tuple[Counter, str]]:
    """(features, category) of every dev text, then of every catalog example."""
    texts = [(e["text"], e["category"]) for e in yaml.safe_load(dev.read_text())]
    texts += [(e["example"], e["category"]) for e in failures.catalog()]
    return [(learned.features(failures.normalise(text)), category) for text, category in texts]


def trained(dev: Path = DEV) -> dict:
    """The model's counts (no calibration): what `--check` and the tests compare."""
    found = examples(dev)
    return learned.train(found, sorted({category for _, category in found}))


class _Recording(learned.Model):
    """A model that remembers which calibration entry the classifier asked for."""

    asked: str = ""

    def confidence(self, kind: str, contested: bool) -> float:
        self.asked = f"{kind}/{'contested' if contested else 'clear'}"
        return 0.5


def calibration(dev: Path = DEV) -> tuple[dict[str, float], dict[str, list[int]], dict[str, int]]:
    """Replay the classifier on every dev text with a fallback trained without it. The rule kinds
    and `other` are counted as the classifier decided; the fallback is counted on every dev text it
    accepts when asked alone (as if no rule had matched), since the rules leave it too few dev texts
    to count on: an optimistic figure for the texts the rules leave, which are the harder ones."""
    entries = yaml.safe_load(dev.read_text())
    everything = examples(dev)
    categories = sorted({category for _, category in everything})
    counts: dict[str, list[int]] = {}

    def count(key: str, ok: bool) -> None:
        for name in (key, key.split("/")[0]):
            tally = counts.setdefault(name, [0, 0])
            tally[0] += ok
            tally[1] += 1

    right = learned_right = learned_decided = 0
    for i, entry in enumerate(entries):
        model = _Recording(learned.train(everything[:i] + everything[i + 1 :], categories))
        found = failures._classify(entry["text"], model)
        ok = found.category == entry["category"]
        right += ok
        if not model.asked.startswith("learned/"):
            count(model.asked, ok)
            if model.asked.split("/")[0] in RULE_KINDS:
                count("rules/" + model.asked.split("/")[1], ok)
        else:
            learned_decided += 1
            learned_right += ok
        guess = model.guess(everything[i][0])
        if model.accepts(guess):
            count(
                f"learned/{'contested' if guess.posterior[guess.category] < learned.SURE else 'clear'}",
                guess.category == entry["category"],
            )
    rates = {key: round((r + 1) / (n + 2), 3) for key, (r, n) in sorted(counts.items())}
    measured = {
        "dev_texts": len(entries),
        "right_leave_one_out": right,
        "decided_by_fallback": learned_decided,
        "fallback_right": learned_right,
    }
    return rates, dict(sorted(counts.items())), measured


def build(dev: Path = DEV) -> dict:
    data = trained(dev)
    rates, counts, measured = calibration(dev)
    data.update(calibration=rates, calibration_counts=counts, measured=measured)
    return data


def dump(data: dict) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    data = build()
    text = dump(data)
    measured = data["measured"]
    print(
        f"features: {len(data['features'])}; dev leave-one-out: {measured['right_leave_one_out']}/"
        f"{measured['dev_texts']} = {measured['right_leave_one_out'] / measured['dev_texts']:.1%}; the fallback "
        f"decided {measured['decided_by_fallback']} ({measured['fallback_right']} right)"
    )
    for key, rate in data["calibration"].items():
        r, n = data["calibration_counts"][key]
        print(f"  {key:22} {r:4}/{n:<4} confidence {rate:.3f}")
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print("shipped file is up to date" if same else f"{args.output} differs from a retrain")
        return 0 if same else 1
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
