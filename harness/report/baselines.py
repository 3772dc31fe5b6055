"""Named baselines, kept as pytest-benchmark keeps its storage: saved after a run, compared by name.

A baseline is a copy of a run's `<device>/results.json` files under `<reports>/baselines/<name>/`, or
under `<store>/<name>/` for a storage root shared between machines (a mounted share, a checkout).
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.errors import UserError
from harness.report.results import write_report

DEFAULT_REPORTS = Path("reports")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a name, never a path: no '/', no leading '.' ('..')


def check_name(name: str) -> None:
    """Checked when a run starts, not after hours of it."""
    if not NAME.fullmatch(name):
        raise UserError(
            f"baseline name '{name}' is not a plain name: it must start with a letter or digit and hold only "
            "letters, digits, '.', '_', '-'.",
            key="--compat-save-baseline",
            fix="use a name such as 'release-1.4' or 'nightly'.",
        )


def save(name: str, reports_dir: Path, store: Path | None = None) -> Path:
    """Copy every `<device>/results.json` of `reports_dir` into the baseline `name` (each file whole or
    not at all, as every report is written)."""
    check_name(name)
    store = Path(reports_dir) / "baselines" if store is None else Path(store)
    target = store / name
    for results in sorted(Path(reports_dir).glob("*/results.json")):
        if store.resolve() in results.resolve().parents:
            continue
        copy = target / results.parent.name / "results.json"
        write_report(copy, results.read_text(), lost=f"baseline '{name}' of {results.parent.name}")
    return target


def candidates(name_or_dir: str, reports: list[Path], stores: list[Path]) -> list[Path]:
    """Where a baseline may be, in the order looked at: the folder as given, each storage root's
    `<name>/`, then each reports folder's `baselines/<name>/`."""
    found = [Path(name_or_dir)]
    if NAME.fullmatch(name_or_dir):
        found += [Path(store) / name_or_dir for store in stores]
        found += [Path(folder) / "baselines" / name_or_dir for folder in reports]
    return list(dict.fromkeys(found))


def resolve(name_or_dir: str, reports: list[Path] = (DEFAULT_REPORTS,), stores: list[Path] = ()) -> Path:
    """A reports folder as given, or the saved baseline of that name."""
    looked = candidates(name_or_dir, list(reports), list(stores))
    for folder in looked:
        if folder.is_dir():
            return folder
    roots = [Path(p) for p in (*stores, *(Path(folder) / "baselines" for folder in reports))]
    saved = sorted({p.name for root in roots if root.is_dir() for p in root.iterdir() if p.is_dir()})
    raise UserError(
        f"'{name_or_dir}' is neither a reports folder nor a saved baseline (looked in "
        f"{', '.join(str(p) for p in looked)}).",
        key="--baseline",
        fix=f"saved baselines: {', '.join(saved) or 'none yet'}; give --reports DIR (where the run saved it) or "
        "--store DIR (a storage root), or save one after a run with `pytest --compat-save-baseline NAME`.",
    )
