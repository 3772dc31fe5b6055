"""Keep secrets out of everything the harness writes.

Three nets, applied to every string of every file qwen-compat writes (results, JUnit, summaries,
run.json, gate and fleet outputs, stderr tails):
- values of environment variables whose names suggest a secret (TOKEN, KEY, SECRET, PASSWORD,
  PASS, PAT, JWT, CREDENTIAL, AUTH, DSN), `*_URL` values that carry credentials, and the variables
  a matrix names as holding a key (`api_key_env`), whatever their names;
- credentials inside URLs: `user:password@` userinfo and token-like query parameters;
- strings shaped like known tokens: `hf_…`, `sk-…`, `ghp_…`/`github_pat_…`, `AKIA…`, `Bearer …`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASS|(^|_)PAT($|_)|JWT|CREDENTIAL|AUTH|DSN", re.IGNORECASE)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s:]*(?::[^/@\s]*)?)@", re.IGNORECASE)
URL_TOKEN_PARAM = re.compile(
    r"(?P<key>[?&](?:access_token|token|api_key|apikey|key|sig|signature|password|secret|auth)=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)
TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|\bghp_[A-Za-z0-9]{20,}|"
    r"\bgithub_pat_[A-Za-z0-9_]{20,}|\bAKIA[0-9A-Z]{16}\b|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"
)


# A setting, not a secret: a short lowercase word (RAY_AUTH_MODE=token, HF_TOKEN_PATH-like flags). Scrubbed,
# it would be cut out of every text, harness keys included ("new_token_ids" -> "new_***_ids").
PLAIN_WORD = re.compile(r"[a-z_-]{1,11}|\d{1,7}|true|false|none|null", re.IGNORECASE)


def secret_values(named: Iterable[str] = ()) -> list[str]:
    """Values of environment variables that hold secrets, longest first (to be scrubbed whole): those whose
    names suggest one, and those `named` (a matrix's `api_key_env`), whose values are secrets whatever the
    names say."""
    named = set(named)
    found = {value for name, value in os.environ.items() if name in named and value}
    for name, value in os.environ.items():
        if len(value) < 4 or PLAIN_WORD.fullmatch(value):
            continue
        if SECRET_NAME.search(name):
            found.add(value)
        elif name.upper().endswith("_URL") and URL_USERINFO.search(value):
            found.add(value)
    return sorted(found, key=len, reverse=True)


# What each pattern cannot match without (exactly: a text holding none of them is left as it is): most strings
# of a record (ids, axis values, numbers' keys) skip the three regular expressions.
URL_USERINFO_NEEDS = ("://",)
URL_TOKEN_PARAM_NEEDS = ("=",)
TOKEN_SHAPES_NEEDS = ("hf_", "sk-", "ghp_", "github_pat_", "AKIA", "Bearer ")


def scrub_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    if any(needed in text for needed in URL_USERINFO_NEEDS):
        text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if any(needed in text for needed in URL_TOKEN_PARAM_NEEDS):
        text = URL_TOKEN_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)
    if any(needed in text for needed in TOKEN_SHAPES_NEEDS):
        text = TOKEN_SHAPES.sub(MASK, text)
    return text


def scrub(value, secrets: list[str] | None = None):
    """Scrub every string anywhere in a JSON-able structure (keys included, by the shapes of tokens only:
    the harness's own keys are names, never values)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {scrub_text(k, []) if isinstance(k, str) else k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value
