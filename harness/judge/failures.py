"""Failure classification: error text -> category, the rule that decided, the deciding line, cause and remedy.

Evidence first: the text is normalised (ANSI codes, timestamps, worker and rank prefixes, log levels
stripped), each line gets a weight by the role it plays (the last exception line of a traceback and
the first error line of a log weigh most; warnings, info lines and traceback frames least), and every
rule of the catalog (harness/data/failure-catalog.yaml) is matched line by line. A rule's score is its
priority (specific reported failures over signature families over weak hints) plus the weight of the
best line it matched; `beats` lets a rule silence another when both match (an out-of-resources error
that mentions memory is a kernel launch, not an out-of-memory). Runner-up categories within a small
margin are returned as alternatives.
"""

from __future__ import annotations

import html
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import NamedTuple

import yaml

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
    r"See root cause above|Engine core initialization failed|EngineCore failed to start|ChildFailedError|"
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
                detector=entry.get("detector"),
                beats=tuple(entry.get("beats", ())),
            )
        )
    return tuple(out)


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
    matched: str | None  # rule (catalog entry) id, or None
    evidence: str  # the deciding line
    alternatives: list[dict] = field(default_factory=list)  # runner-up categories: category, matched, evidence

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
    """The best match of each rule that matched."""
    best: dict[str, Match] = {}
    for rule in rules():
        for line in lines:
            m = rule.search(line.text)
            if not m:
                continue
            score = rule.priority + WEIGHTS[line.role]
            if rule.id not in best or score > best[rule.id].score:
                span = m.span() if isinstance(m, re.Match) else m
                best[rule.id] = Match(score, rule, _excerpt(line.text, span), line.role)
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


def classify(text: str) -> Classification:
    """Classify an error message, traceback, log or issue text; unknown text is `other`.

    The deciding line has a veto: when it is an exception that no rule explains, only strong evidence
    elsewhere (a specific failure, or a family on another error line) overrules `other`; a package
    list or a code sample in an issue is not evidence. The remedy is the catalog's general one;
    `remedies.explain` writes it for a cell's GPU, dtype, attention and pixel budget.
    """
    lines = normalise(text)
    found = _matches(lines)
    _apply_beats(found)
    ranked = sorted(found.values(), key=lambda m: (m.score, m.rule.priority), reverse=True)
    decisive = next((line for line in lines if line.role == "decisive"), None)
    vetoed = (
        ranked
        and decisive is not None
        and EXCEPTION.match(decisive.text)
        and ranked[0].role != "decisive"
        and ranked[0].score < VETO
    )
    if not ranked or vetoed:
        first = _unexplained(lines)
        result = Classification(
            "other",
            f"not in the failure catalog: {first}" if first else "no error text",
            "read the stderr tail; if this is a recurring failure, add an entry to harness/data/failure-catalog.yaml",
            None,
            first[:EVIDENCE_CHARS],
            [{"category": m.rule.category, "matched": m.rule.id, "evidence": m.evidence} for m in ranked[:1]],
        )
    else:
        top = ranked[0]
        alternatives, seen = [], {top.rule.category}
        for m in ranked[1:]:
            if m.rule.category not in seen and m.score >= top.score - CLOSE:
                alternatives.append({"category": m.rule.category, "matched": m.rule.id, "evidence": m.evidence})
                seen.add(m.rule.category)
        result = Classification(
            top.rule.category, top.rule.cause, top.rule.remedy, top.rule.id, top.evidence, alternatives
        )
    return result


def is_sticky(text: str) -> bool:
    return bool(STICKY.search(text))
