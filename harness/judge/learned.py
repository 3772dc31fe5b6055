"""The failure classifier's learned fallback: multinomial naive Bayes over a failure text's words, word
pairs, character trigrams and CJK characters, trained on the dev split of the failure corpus and the
catalog's examples, so that a text no catalog rule explains is not called `other` when its words say
otherwise ("llama-box crashed", "显存不够", "GGGG").

It also calibrates the classifier's confidence: `python benchmarks/train_failure_fallback.py` measures
on the dev split how often each kind of decision (a specific rule, a family, a hint, this model,
`other`) was right, the model's own decisions by leave-one-out, and stores the rates with the counts
in harness/data/failure-fallback.json. Pure Python, no dependency: the pytest process and the worker
both classify.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import pairwise
from typing import Protocol

MODEL_FILE = "failure-fallback.json"
ALPHA = 0.1  # additive smoothing; chosen by leave-one-out on the dev split (0.02, 0.1, 0.5 tried)
MIN_DOCUMENTS = 2  # a feature seen in one training text only is a name, a path or a number: dropped
# Naive Bayes is sure of everything on a long text: its log-odds are averaged over the text's feature
# mass and divided by TEMPERATURE before they become probabilities, so that a posterior can be compared
# with ACCEPT. Both were chosen on the dev split, replaying the issue-14 rules (written before the
# corpus grew) with this fallback by leave-one-out: 217 -> 276 of 313 right, 3 of 21 `other` texts lost;
# the flat region is TEMPERATURE 0.15-0.25 with ACCEPT 0.3-0.45.
TEMPERATURE = 0.15
MIN_MASS = 20.0  # ... over at least this much: two words of a short text do not make a sure guess
ACCEPT = 0.35  # the fallback answers when its posterior for a category (other than `other`) is at least this
MIN_FEATURES = 3  # ... and the text has at least this many known features other than trigrams
SURE = 0.7  # a fallback decision below this posterior counts as contested for its confidence
# How much a line's words count, by the role normalise() gave it: the deciding line most, frames least.
ROLE_WEIGHTS = {
    "decisive": 3.0,
    "exception": 2.0,
    "error": 2.0,
    "plain": 1.0,
    "wrapper": 0.5,
    "warning": 0.5,
    "info": 0.3,
    "frame": 0.3,
}
TRIGRAM_WEIGHT = 0.3
WORD = re.compile(r"[a-z][a-z0-9_]{1,29}")
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]+")


class TextLine(Protocol):
    text: str
    role: str


@cache
def _word_features(word: str) -> tuple[tuple[str, float], ...]:
    """A word's own feature and its character trigrams, with their weights for one occurrence."""
    padded = f"<{word}>"
    trigrams = ["g:" + padded[i : i + 3] for i in range(len(padded) - 2)]
    return (("w:" + word, 1.0), *((g, TRIGRAM_WEIGHT) for g in trigrams))


def _occurrences(line: TextLine) -> Iterator[tuple[str, float]]:
    """Every feature occurrence of one normalised line, with its weight: words, word pairs, character
    trigrams of words, CJK characters and pairs."""
    weight = ROLE_WEIGHTS[line.role]
    text = line.text.lower()
    words = WORD.findall(text)
    for word in words:
        for feature, value in _word_features(word):
            yield feature, weight * value
    for first, second in pairwise(words):
        yield f"b:{first} {second}", weight
    for run in CJK.findall(text):
        for char in run:
            yield "c:" + char, weight
        for first, second in pairwise(run):
            yield "d:" + first + second, weight


def line_features(line: TextLine) -> Counter:
    """Weighted features of one normalised line."""
    found: Counter = Counter()
    for feature, weight in _occurrences(line):
        found[feature] += weight
    return found


def features(lines: Iterable[TextLine], within: Container[str] | None = None) -> Counter:
    """A text's features (only those `within` a vocabulary, when given): each the mean weight of its
    occurrences times log(1 + occurrences), so that a line repeated forty times in a log, or a word
    in every frame of a traceback, is not forty times the evidence."""
    total: dict[str, float] = {}
    seen: dict[str, int] = {}
    for line in lines:
        for feature, weight in _occurrences(line):
            if within is not None and feature not in within:
                continue
            if feature in seen:
                total[feature] += weight
                seen[feature] += 1
            else:
                total[feature] = weight
                seen[feature] = 1
    log1p = math.log1p
    return Counter({f: value / seen[f] * log1p(seen[f]) for f, value in total.items()})


def train(examples: Sequence[tuple[Counter, str]], categories: Sequence[str]) -> dict:
    """Counts per category of the features seen in at least MIN_DOCUMENTS training texts. Only the
    categories of the examples belong in `categories`: one without any would have flat likelihoods,
    which beat every trained category on words it has rarely seen."""
    documents: Counter = Counter()
    for found, _ in examples:
        documents.update(found.keys())
    vocabulary = sorted(f for f, n in documents.items() if n >= MIN_DOCUMENTS)
    index = {c: i for i, c in enumerate(categories)}
    counts: dict[str, list[float]] = {f: [0.0] * len(categories) for f in vocabulary}
    for found, category in examples:
        for feature, value in found.items():
            if feature in counts:
                counts[feature][index[category]] += value
    totals = [round(sum(row[i] for row in counts.values()), 3) for i in range(len(categories))]
    return {
        "categories": list(categories),
        "alpha": ALPHA,
        "totals": totals,
        "features": {f: {str(i): round(v, 3) for i, v in enumerate(row) if v} for f, row in counts.items()},
    }


@dataclass(frozen=True)
class Guess:
    category: str
    posterior: dict[str, float]  # category -> probability
    known: int  # distinct words, word pairs and CJK characters of the text the model knows (trigrams aside)


class Model:
    """The shipped model: per category, log-likelihood ratios of the known features."""

    def __init__(self, data: dict):
        self.categories: list[str] = data["categories"]
        alpha = data["alpha"]
        vocabulary = len(data["features"])
        self.calibration: dict[str, float] = data.get("calibration", {})
        self._absent = [math.log(alpha / (t + alpha * vocabulary)) for t in data["totals"]]
        self._present = {
            feature: tuple((int(i), math.log((n + alpha) / alpha)) for i, n in by_class.items())
            for feature, by_class in data["features"].items()
        }
        self.vocabulary: Container[str] = self._present.keys()

    def guess(self, found: Counter) -> Guess:
        scores = [0.0] * len(self.categories)
        mass = known = 0
        for feature, value in found.items():
            present = self._present.get(feature)
            if present is None:
                continue
            known += not feature.startswith("g:")
            mass += value
            for i, ratio in present:
                scores[i] += value * ratio
        scale = 1.0 / (TEMPERATURE * max(mass, MIN_MASS))
        scores = [(s + mass * a) * scale for s, a in zip(scores, self._absent, strict=True)]
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        total = sum(exp)
        posterior = {c: e / total for c, e in zip(self.categories, exp, strict=True)}
        return Guess(max(posterior, key=posterior.get), posterior, known)

    def accepts(self, guess: Guess) -> bool:
        return guess.category != "other" and guess.posterior[guess.category] >= ACCEPT and guess.known >= MIN_FEATURES

    def line_support(self, line: TextLine, category: str) -> float:
        """How much one line speaks for `category` against the others (to quote as evidence)."""
        i = self.categories.index(category)
        support = 0.0
        for feature, value in line_features(line).items():
            for j, ratio in self._present.get(feature, ()):
                support += value * ratio * (1.0 if j == i else -1.0 / (len(self.categories) - 1))
        return support

    def confidence(self, kind: str, contested: bool) -> float:
        """The dev split's rate of right decisions of this kind (with a close runner-up, or without)."""
        key = f"{kind}/{'contested' if contested else 'clear'}"
        if key in self.calibration:
            return self.calibration[key]
        rate = self.calibration.get(kind, 0.5)  # never seen so on the dev split: the kind's rate, and for a
        if contested and kind != "learned":  # rule with a close runner-up no more than contested rules had
            rate = min(rate, self.calibration.get("rules/contested", rate))
        return rate


def model_text() -> str:
    return resources.files("harness.data").joinpath(MODEL_FILE).read_text()


@cache
def model() -> Model:
    return Model(json.loads(model_text()))
