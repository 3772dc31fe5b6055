"""Keep secrets out of everything the harness writes: values of variables named like secrets."""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of environment variables whose names look like secrets (to be scrubbed)."""
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 4]


def scrub(value, secrets: list[str] | None = None):
    """Replace secret values anywhere in a JSON-able structure."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value
