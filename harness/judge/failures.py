"""Failure classification: error text -> category, the rule that decided, the deciding line, cause and remedy.

Evidence first: the text is normalised (ANSI codes, timestamps, worker and rank prefixes, log levels
stripped), each line gets a weight by the role it plays (the last exception line of a traceback and
the first error line of a log weigh most; warnings, info lines and traceback frames least), and every
rule of the catalog (harness/data/failure-catalog.yaml) is matched line by line. A rule's score is its
priority (specific reported failures over signature families over weak hints) plus the weight of the
best line it matched; `beats` lets a rule silence another when both match (an out-of-resources error
that mentions memory is a kernel launch, not an out-of-memory). Runner-up categories within a small
margin are returned as alternatives. When no rule decides, a naive Bayes fallback trained on the
corpus's dev split (harness/judge/learned.py) names the category the text's words point to; `other`
is left for texts whose words point nowhere. Every answer carries a confidence (how often decisions
of its kind were right on the dev split) and the likeliest other category.
"""

from __future__ import annotations

import html
import re
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import NamedTuple

import yaml

try:  # the regular-expression parser: Python 3.11 moved it
    from re import _constants as _sre
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

from harness.judge import learned

# Errors after which a CUDA context cannot be trusted: the worker that saw one is replaced.
STICKY = re.compile(
    r"CUDA error|cudaError|CUBLAS_STATUS|illegal memory access|device-side assert|"
    r"too many resources requested",
    re.IGNORECASE,
)

PRIORITY = {"specific": 60, "family": 40, "hint": 20}
VETO = 60  # what overrules an unexplained deciding exception: a specific rule, or a family on an error line
CLOSE = 15  # a runner-up category scoring within this margin of the winner is reported
EVIDENCE_CHARS = 300

# --- normalisation -------------------------------------------------------------------------------

# ANSI escapes, their remnants once the ESC byte is lost ("[36m"), and box-drawing borders (rich tracebacks)
DECORATION = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b|\[(?:\d{1,3};)*\d{1,3}m|[\u2500-\u257f]")
LEVELS = {
    "NOTE": "info",
    "DEBUG": "info",
    "TRACE": "info",
    "INFO": "info",
    "NOTICE": "info",
    "WARNING": "warning",
    "WARN": "warning",
    "ERROR": "error",
    "ERR": "error",
    "CRITICAL": "error",
    "FATAL": "error",
}
_LEVEL_NAMES = "DEBUG|TRACE|INFO|NOTICE|WARNING|WARN|ERROR|ERR|CRITICAL|FATAL"
_TIME = r"\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?"
_DATE = r"(?:\d{4}[-/]\d{1,2}[-/]\d{1,2}|\d{1,2}[-/]\d{1,2}(?:[-/]\d{2,4})?)"
PREFIXES = [
    re.compile(p)
    for p in [
        # glog: E1125 10:00:00.123456 1234 file.cc:12]
        r"^(?P<glog>[IWEF])\d{4} " + _TIME + r"\s+\d+\s+[\w./-]+:\d+\]\s*",
        # journald: Nov 25 10:00:00 host vllm[1234]:
        r"^[A-Z][a-z]{2} {1,2}\d{1,2} " + _TIME + r" [\w.\-]+ [\w.\-/@]+(?:\[\d+\])?:\s*",
        # docker compose: vllm-1  | ...
        r"^[\w.\-]+\s+\|\s",
        # worker prefixes: (VllmWorker rank=0 pid=123), (EngineCore_0 pid=1), (RayWorkerWrapper pid=1, ip=..)
        r"^\((?:[\w.\-]+(?:\s+[\w.\-]+=[\w.\-:]+)*\s+)?pid=\d+(?:,\s*ip=[\w.:]+)?\)\s*",
        # [rank0]:  [default3]:  [1,0]<stderr>:  [TM] and similar bracketed tags
        r"^\[(?i:rank|default|local_rank|node|worker|gpu|tp|dp|pp|ep)\s*\d+\]\s*:?\s*",
        r"^\[\d+,\d+\]<std(?:out|err)>:\s*",
        r"^\[TM\]\s*",
        # timestamps, optionally bracketed, with an SGLang-style TP tag
        r"^\[?" + _DATE + r"[ T]" + _TIME + r"(?:\s*(?:Z|[+-]\d{2}:?\d{2}|UTC))?(?:\s+(?:TP|DP|PP|EP)\d+)*\]?[\s|:\-]*",
        r"^\[?" + _TIME + r"\]?[\s|:\-]+",
        # log levels: ERROR, [error], ERROR:, | ERROR |, lmdeploy - ERROR - (upper case, or bracketed in any case)
        rf"^(?:[\w.]+ - )?(?:(?P<level>{_LEVEL_NAMES})|\[(?P<bracketed>(?i:{_LEVEL_NAMES}))\])"
        r"(?:\s*[:|]\s*|\s+-\s+|\s+)",
        r"^(?P<capitalised>Warning|Info|Debug|Note):\s*",
        # vLLM's source location after the level: [core.py:123]
        r"^\[?[\w./-]+\.py:\d+\]\s*",
        r"^[\w./-]+\.py:\d+\s+-\s*",
        # pytest's failure marker
        r"^E {2,}",
    ]
]
FRAME = re.compile(r'^File "[^"]*", line \d+|^at [\w.$<>]+\(|^[~^]{3,}\s*$|^#\d+\s+0x[0-9a-f]+ in ')
EXCEPTION = re.compile(
    r"(?:^|(?<=[\s:：,，(（\"'`>|]))((?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Fault|Warning)"
    r"|OutOfResources|Error|Exception))(?=\s*[:：]|\s*$)"
)
WRAPPER = re.compile(
    r"See root cause above|See stack trace \(above\) for the root cause|"
    r"Engine core initialization failed|EngineCore failed to start|ChildFailedError|"
    r"CalledProcessError|The above exception was the direct cause|During handling of the above exception|"
    r"Error executing job with overrides|^SystemExit|^KeyboardInterrupt|Traceback \(most recent call last\)|"
    r"For debugging consider passing|CUDA kernel errors might be asynchronously reported|"
    r"Compile with .TORCH_USE_CUDA_DSA.|Set TORCH_SHOW_CPP_STACKTRACES",
    re.IGNORECASE,
)
WEIGHTS = {"decisive": 30, "exception": 22, "error": 20, "plain": 10, "wrapper": 5, "warning": 0, "info": 0, "frame": 0}


@dataclass
class Line:
    text: str
    role: str  # decisive | exception | error | plain | wrapper | warning | info | frame
    after_gap: bool = False  # a blank line comes before it


def _strip_prefixes(line: str) -> tuple[str, str | None]:
    level = None
    for _ in range(8):
        before = line = line.lstrip()
        for prefix in PREFIXES:
            m = prefix.match(line)
            if m:
                found = next((v for v in m.groupdict().values() if v), None)
                if found:
                    level = level or LEVELS.get(found.upper(), {"I": "info", "W": "warning"}.get(found, "error"))
                line = line[m.end() :]
        if line == before:
            break
    return line.strip(), level


def normalise(text: str) -> list[Line]:
    """The text's non-empty lines, cleaned of log decoration, each with the role it plays."""
    lines: list[Line] = []
    after_frame = False
    gap = False
    text = DECORATION.sub("", html.unescape(text.replace("\r\n", "\n").replace("\r", "\n")))
    for raw in text.split("\n"):
        stripped, level = _strip_prefixes(raw.rstrip())
        if not stripped:
            gap = True
            continue
        exc = EXCEPTION.search(stripped)
        code_line, after_frame = after_frame and not (exc and exc.start() == 0), bool(FRAME.match(stripped))
        if WRAPPER.search(stripped):
            role = "wrapper"
        elif after_frame or code_line:
            role = "frame"
        elif exc and exc.group(1).endswith("Warning"):
            role = "warning"
        elif exc and exc.start() == 0:
            role = "exception"
        elif level in ("info", "warning"):
            role = level
        elif level == "error" or exc:
            role = "error"
        else:
            role = "plain"
        lines.append(Line(stripped, role, gap))
        gap = False
    _mark_decisive(lines)
    return lines


MESSAGE_LINES = 4  # lines of an exception's message that may follow its first line


def _mark_decisive(lines: list[Line]) -> None:
    """The last exception line of a traceback (with the lines its message continues on), else the
    first error line of a log, decides."""
    exceptions = [i for i, line in enumerate(lines) if line.role == "exception"]
    errors = [i for i, line in enumerate(lines) if line.role == "error"]
    if exceptions:
        first = exceptions[-1]
        lines[first].role = "decisive"
        for line in lines[first + 1 : first + 1 + MESSAGE_LINES]:
            if line.after_gap or line.role not in ("plain", "error"):
                break
            line.role = "decisive"
    elif errors:
        lines[errors[0]].role = "decisive"


# --- rules ---------------------------------------------------------------------------------------


@dataclass
class Rule:
    id: str
    category: str
    priority: int
    cause: str
    remedy: str
    regex: re.Pattern | None
    detector: str | None = None
    beats: tuple[str, ...] = ()
    anywhere: re.Pattern | None = None  # the signature over the whole text, lines joined: a quick test
    gate: tuple[str, ...] | None = None  # lower-case strings one of which every match contains: a quicker one

    def search(self, line: str) -> re.Match | tuple[int, int] | None:
        if self.detector:
            return DETECTORS[self.detector](line)
        return self.regex.search(line)


@cache
def catalog() -> list[dict]:
    return yaml.safe_load(resources.files("harness.data").joinpath("failure-catalog.yaml").read_text())


@cache
def rules() -> tuple[Rule, ...]:
    out = []
    for entry in catalog():
        out.append(
            Rule(
                id=entry["id"],
                category=entry["category"],
                priority=PRIORITY[entry.get("priority", "specific")],
                cause=" ".join(entry["cause"].split()),
                remedy=" ".join(entry["remedy"].split()),
                regex=re.compile(entry["signature"], re.IGNORECASE) if entry.get("signature") else None,
                anywhere=re.compile(entry["signature"], re.IGNORECASE | re.MULTILINE)
                if entry.get("signature")
                else None,
                gate=literal_gate(entry["signature"]) if entry.get("signature") else None,
                detector=entry.get("detector"),
                beats=tuple(entry.get("beats", ())),
            )
        )
    return tuple(out)


def literal_gate(signature: str) -> tuple[str, ...] | None:
    """Lower-case strings one of which every match of the (case-insensitive) signature contains, read
    off its parse tree; None when an alternative has no literal worth testing. A substring test in
    the lower-cased text is then enough to skip a rule, which most rules are for most texts."""
    found = _gate(_sre_parser.parse(signature, re.IGNORECASE))
    return tuple(sorted(found)) if found else None


def _worth(literal: str) -> bool:
    return len(literal) >= 3 or any(ord(c) > 0x7F for c in literal)


def _gate(items) -> set[str] | None:
    items = list(items)
    if len(items) == 1 and items[0][0] is _sre.BRANCH:
        out: set[str] = set()
        for alternative in items[0][1][1]:
            found = _gate(alternative)
            if found is None:
                return None
            out |= found
        return out
    if len(items) == 1 and items[0][0] is _sre.SUBPATTERN:
        return _gate(items[0][1][-1])
    best: set[str] | None = None
    run = ""
    for op, arg in [*items, (None, None)]:
        if op is _sre.LITERAL:
            run += chr(arg).lower()
            continue
        candidates = [{run}] if _worth(run) else []
        run = ""
        if op is _sre.SUBPATTERN or op is _sre.BRANCH:
            candidates.append(_gate([(op, arg)]))
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and arg[0] >= 1:
            candidates.append(_gate(arg[2]))
        for found in candidates:
            if found and (best is None or min(map(len, found)) > min(map(len, best))):
                best = found
    return best


# --- degenerate generated text ---------------------------------------------------------------------

# One character again and again (not the separators logs draw lines with), one short chunk repeated
# without spaces ("口口口", "<unk><unk>"), or one word repeated: what fp16 overflow and broken kernels
# produce when there are no logits to look at.
_SEPARATORS = r"\s\w=\-_#*.~+^|/\\<>()\[\]{}'\"`:;,─━═│┃║█▏▎▍▌▋▊▉░▒▓■□▇▆▅▄▃▂▁·•"
RUN_OF_CHAR = re.compile(rf"([^{_SEPARATORS}])(?:\s?\1){{11,}}")
RUN_OF_CJK = re.compile(r"([\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])(?:\s?\1){11,}")
RUN_OF_CHUNK = re.compile(r"(\S{2,16}?)\1{7,}")  # a chunk with a letter and a non-ASCII or symbol character
CHUNK_MIX = re.compile(r"[^\x00-\x7f]|[^\w\s]")
RUN_OF_WORD = re.compile(r"(?<!\S)(\S{1,24})(?:\s+\1){9,}(?!\S)")
LETTER = re.compile(r"[^\W\d_]")
# Scripts that rarely meet in one line unless a model is emitting random tokens.
SCRIPTS = {
    "latin": r"[A-Za-z]",
    "cjk": r"[\u4e00-\u9fff]",
    "kana": r"[\u3040-\u30ff]",
    "hangul": r"[\uac00-\ud7af]",
    "cyrillic": r"[\u0400-\u04ff]",
    "thai": r"[\u0e00-\u0e7f]",
    "arabic": r"[\u0600-\u06ff]",
    "devanagari": r"[\u0900-\u097f]",
    "replacement": "\ufffd",
}
GARBLED_SCRIPTS = 4


def degenerate_span(text: str) -> tuple[int, int] | None:
    """Where a run of one character, chunk or word starts and ends in `text`, or None."""
    for pattern in (RUN_OF_CHAR, RUN_OF_CJK):
        m = pattern.search(text)
        if m:
            return m.span()
    for m in RUN_OF_CHUNK.finditer(text):
        if LETTER.search(m.group(1)) and CHUNK_MIX.search(m.group(1)) and len(set(m.group(1))) > 1:
            return m.span()
    for m in RUN_OF_WORD.finditer(text):
        if LETTER.search(m.group(1)):
            return m.span()
    return None


def garbled_span(text: str) -> tuple[int, int] | None:
    """A line mixing many writing systems (CJK, Hangul, Cyrillic, Thai, U+FFFD...): random tokens."""
    found = sum(1 for pattern in SCRIPTS.values() if re.search(pattern, text))
    return (0, len(text)) if found >= GARBLED_SCRIPTS else None


DETECTORS = {"degenerate-text": degenerate_span, "garbled-text": garbled_span}


def is_degenerate_text(text: str) -> bool:
    """Generated text that collapsed into one repeated character or token ("!!!!!!!!", "。。。。")."""
    compact = "".join(text.split())
    if len(compact) >= 8 and len(set(compact)) == 1:
        return True
    words = text.split()
    if len(words) >= 6 and len(set(words)) == 1:
        return True
    return degenerate_span(text) is not None


# --- classification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    category: str
    cause: str
    remedy: str
    matched: str | None  # rule (catalog entry) id, `learned:<category>` for the fallback, or None
    evidence: str  # the deciding line
    alternatives: list[dict] = field(default_factory=list)  # runner-up categories: category, matched, evidence
    confidence: float = 0.5  # how often decisions of this kind were right on the corpus's dev split
    runner_up: dict | None = None  # the likeliest other category: category, matched, evidence, confidence

    def to_dict(self) -> dict:
        return asdict(self)


def _excerpt(line: str, span: tuple[int, int]) -> str:
    if len(line) <= EVIDENCE_CHARS:
        return line
    start = max(0, min(span[0] - 60, len(line) - EVIDENCE_CHARS))
    return line[start : start + EVIDENCE_CHARS].strip()


class Match(NamedTuple):
    score: int
    rule: Rule
    evidence: str
    role: str  # the role of the line it matched


def _matches(lines: list[Line]) -> dict[str, Match]:
    """The best match of each rule that matched: the first line, in the order of the weight of its
    role (the text's order among equals), that the rule matches. A rule is tried only on the lines
    that hold one of its literals (its gate), or, without a gate, when its pattern is in the text."""
    best: dict[str, Match] = {}
    whole = "\n".join(line.text for line in lines)
    lowered = whole.lower()
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line.text) + 1
    rank = {i: r for r, i in enumerate(sorted(range(len(lines)), key=lambda i: -WEIGHTS[lines[i].role]))}
    everywhere = sorted(range(len(lines)), key=rank.__getitem__)
    for rule in rules():
        if rule.gate is not None:
            found: set[int] = set()
            for literal in rule.gate:
                at = lowered.find(literal)
                while at != -1:
                    found.add(bisect_right(starts, at) - 1)
                    at = lowered.find(literal, at + 1)
            if not found:
                continue
            candidates = sorted(found, key=rank.__getitem__)
        elif rule.anywhere is not None and not rule.anywhere.search(whole):
            continue
        else:
            candidates = everywhere
        for i in candidates:
            line = lines[i]
            m = rule.search(line.text)
            if m:
                span = m.span() if isinstance(m, re.Match) else m
                best[rule.id] = Match(rule.priority + WEIGHTS[line.role], rule, _excerpt(line.text, span), line.role)
                break
    return best


def _beats(a: Match, b: Match) -> bool:
    return a.score > a.rule.priority and (b.rule.id in a.rule.beats or f"category:{b.rule.category}" in a.rule.beats)


def _apply_beats(found: dict[str, Match]) -> None:
    """A rule that matched outside warnings, info lines and frames silences the rules (or categories) it beats;
    of two that beat each other, the stronger stays."""
    matches = list(found.values())
    for m in matches:
        if any(_beats(o, m) and not (_beats(m, o) and m.score >= o.score) for o in matches if o is not m):
            del found[m.rule.id]


def _unexplained(lines: list[Line]) -> str:
    return next((line.text for line in lines if line.role == "decisive"), lines[0].text if lines else "")


KINDS = {v: k for k, v in PRIORITY.items()}  # rule priority -> the kind of decision, for the confidence
RUNNER_UP_FLOOR = 0.05  # the fallback's second choice is named as runner-up from this share on


def _named_family(rule: Rule) -> bool:
    return rule.id.endswith("-family") and rule.category.startswith(rule.id.removesuffix("-family"))


@cache
def _family_rules() -> dict[str, Rule]:
    """Per category, the rule whose cause and remedy the learned fallback borrows: the family named
    after the category, else its first family rule, else its first rule."""
    out: dict[str, Rule] = {}
    for rule in rules():
        held = out.get(rule.category)
        if (
            held is None
            or (_named_family(rule) and not _named_family(held))
            or (rule.priority == PRIORITY["family"] != held.priority)
        ):
            out[rule.category] = rule
    return out


def _learned_evidence(lines: list[Line], fallback: learned.Model, category: str) -> str:
    candidates = [line for line in lines if line.role != "frame"] or lines
    best = max(candidates, key=lambda line: fallback.line_support(line, category), default=None)
    return _excerpt(best.text, (0, 0))[:EVIDENCE_CHARS] if best else ""


def classify(text: str) -> Classification:
    """Classify an error message, traceback, log or issue text; unknown text is `other`.

    The catalog's rules decide first. The deciding line has a veto: when it is an exception that no
    rule explains, only strong evidence elsewhere (a specific failure, or a family on another error
    line) overrules; a package list or a code sample in an issue is not evidence. When no rule
    decides, the learned fallback (harness/judge/learned.py, trained on the corpus's dev split)
    names the category its words point to, and only when they point nowhere is it `other`. The
    remedy is the catalog's general one; `remedies.explain` writes it for a cell's GPU, dtype,
    attention and pixel budget.
    """
    return _classify(text, learned.model())


def _classify(text: str, fallback: learned.Model) -> Classification:
    lines = normalise(text)
    found = _matches(lines)
    _apply_beats(found)
    ranked = sorted(found.values(), key=lambda m: (m.score, m.rule.priority), reverse=True)
    decisive = next((line for line in lines if line.role == "decisive"), None)
    vetoed = (
        ranked
        and decisive is not None
        and EXCEPTION.match(decisive.text)
        and not any(m.role == "decisive" for m in ranked)
        and ranked[0].score < VETO
    )
    guess = fallback.guess(learned.features(lines, fallback.vocabulary))
    if ranked and not vetoed:
        top = ranked[0]
        alternatives, seen = [], {top.rule.category}
        for m in ranked[1:]:
            if m.rule.category not in seen and m.score >= top.score - CLOSE:
                alternatives.append({"category": m.rule.category, "matched": m.rule.id, "evidence": m.evidence})
                seen.add(m.rule.category)
        confidence = fallback.confidence(KINDS[top.rule.priority], bool(alternatives))
        if alternatives:
            runner_up = dict(alternatives[0])
        else:
            runner_up = _learned_runner_up(lines, fallback, guess, top.rule.category)
        if runner_up is not None:
            runner_up["confidence"] = _runner_up_confidence(
                confidence, guess, top.rule.category, runner_up["category"], bool(alternatives)
            )
        return Classification(
            top.rule.category,
            top.rule.cause,
            top.rule.remedy,
            top.rule.id,
            top.evidence,
            alternatives,
            confidence,
            runner_up,
        )
    rejected = [{"category": m.rule.category, "matched": m.rule.id, "evidence": m.evidence} for m in ranked[:1]]
    if fallback.accepts(guess):
        category = guess.category
        family = _family_rules()[category]
        confidence = fallback.confidence("learned", guess.posterior[category] < learned.SURE)
        ruled = bool(rejected) and rejected[0]["category"] != category
        runner_up = dict(rejected[0]) if ruled else _learned_runner_up(lines, fallback, guess, category)
        if runner_up is not None:
            runner_up["confidence"] = _runner_up_confidence(confidence, guess, category, runner_up["category"], ruled)
        return Classification(
            category,
            f"no catalog rule matched; its words read as {category} "
            f"(learned fallback, p={guess.posterior[category]:.2f}): {family.cause}",
            family.remedy,
            f"learned:{category}",
            _learned_evidence(lines, fallback, category),
            rejected,
            confidence,
            runner_up,
        )
    first = _unexplained(lines)
    confidence = fallback.confidence("other", bool(rejected) or guess.category != "other")
    runner_up = dict(rejected[0]) if rejected else _learned_runner_up(lines, fallback, guess, "other")
    if runner_up is not None:
        runner_up["confidence"] = _runner_up_confidence(
            confidence, guess, "other", runner_up["category"], bool(rejected)
        )
    return Classification(
        "other",
        f"not in the failure catalog: {first}" if first else "no error text",
        "read the stderr tail; if this is a recurring failure, add an entry to harness/data/failure-catalog.yaml",
        None,
        first[:EVIDENCE_CHARS],
        rejected,
        confidence,
        runner_up,
    )


def _learned_runner_up(lines: list[Line], fallback: learned.Model, guess: learned.Guess, winner: str) -> dict | None:
    """The fallback's likeliest category other than the winner, when its words give it some share."""
    others = {c: p for c, p in guess.posterior.items() if c != winner}
    total = sum(others.values())
    if not others or total <= 0 or guess.known < learned.MIN_FEATURES:
        return None
    category = max(others, key=others.get)
    if others[category] < RUNNER_UP_FLOOR:
        return None
    evidence = _learned_evidence(lines, fallback, category) if category != "other" else _unexplained(lines)
    return {"category": category, "matched": f"learned:{category}", "evidence": evidence}


def _runner_up_confidence(
    confidence: float, guess: learned.Guess, winner: str, category: str, ruled: bool = False
) -> float:
    """What is left of the winner's confidence, shared among the other categories as the fallback
    weighs them (at least half of it for a category a rule matched)."""
    others = {c: p for c, p in guess.posterior.items() if c != winner}
    share = others.get(category, 0.0) / (sum(others.values()) or 1.0)
    return round((1.0 - confidence) * (max(share, 0.5) if ruled else share), 3)


def is_sticky(text: str) -> bool:
    return bool(STICKY.search(text))
