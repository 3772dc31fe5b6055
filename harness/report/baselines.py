"""Named baselines, kept as pytest-benchmark keeps its storage: saved after a run, compared by name.

A baseline is a copy of a run's `<device>/results.json` files under `reports/baselines/<name>/`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from harness.errors import UserError

DEFAULT_STORE = Path("reports") / "baselines"


def check_name(name: str) -> None:
    """Checked when a run starts, not after hours of it."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(
            f"baseline name '{name}' has characters other than letters, digits, '.', '_', '-'.",
            key="--compat-save-baseline",
            fix="use a name such as 'release-1.4' or 'nightly'.",
        )


def save(name: str, reports_dir: Path, store: Path = DEFAULT_STORE) -> Path:
    """Copy every `<device>/results.json` of `reports_dir` into the baseline `name`."""
    check_name(name)
    target = store / name
    for results in Path(reports_dir).glob("*/results.json"):
        if store.resolve() in results.resolve().parents:
            continue
        (target / results.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(results, target / results.parent.name / "results.json")
    return target


def resolve(name_or_dir: str, store: Path = DEFAULT_STORE) -> Path:
    """A reports folder as given, or the saved baseline of that name."""
    given = Path(name_or_dir)
    if given.is_dir():
        return given
    if (store / name_or_dir).is_dir():
        return store / name_or_dir
    saved = sorted(p.name for p in store.glob("*") if p.is_dir()) if store.is_dir() else []
    raise UserError(
        f"'{name_or_dir}' is neither a reports folder nor a saved baseline.",
        key="--baseline",
        fix=f"saved baselines: {', '.join(saved) or 'none yet'}; save one after a run with "
        f"`pytest --compat-save-baseline NAME`.",
    )
