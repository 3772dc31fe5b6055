"""Standard exports of results: one flat row per cell (CSV, Markdown) or one record per line (JSON Lines).

`reports/<device>/results.csv` is written after every run; `qwen-compat export --format csv|jsonl|md
DIR...` merges many runners' folders into one table, each row naming its runner and card.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from harness.report.provenance import recorded_runner
from harness.report.results import latest_records, load_results, results_files

COLUMNS = (
    "runner",
    "id",
    "model",
    "device",
    "dtype",
    "attention",
    "resolution",
    "input",
    "quantization",
    "placement",
    "backend",
    "outcome",
    "category",
    "message",
    "peak_mib",
    "peak_source",
    "predicted_mib",
    "visual_tokens",
    "ttft_s",
    "decode_tokens_per_s",
    "started_utc",
    "git_commit",
)
FORMATS = ("csv", "jsonl", "md")


def _placement(record: dict):
    placement = record.get("placement")
    return placement if isinstance(placement, str) or placement is None else json.dumps(placement, sort_keys=True)


def flat_row(record: dict, env: dict) -> dict:
    """One cell as the flat row spreadsheets and dataframes read: its axes, verdict and key figures."""
    m = record.get("measurements") or {}
    provenance = env.get("provenance") or {}
    return {
        "runner": recorded_runner(env),
        "id": record.get("id"),
        "model": record.get("model"),
        "device": record.get("device") or env.get("device"),
        "dtype": record.get("dtype"),
        "attention": record.get("attn_implementation"),
        "resolution": record.get("resolution"),
        "input": record.get("input"),
        "quantization": record.get("quantization") or (record.get("definition") or {}).get("quantization"),
        "placement": _placement(record),
        "backend": record.get("backend"),
        "outcome": record.get("outcome"),
        "category": record.get("category"),
        "message": (record.get("message") or "").strip().split("\n")[0],
        "peak_mib": m.get("peak_memory_mib"),
        "peak_source": m.get("peak_memory_source"),
        "predicted_mib": (record.get("prediction") or {}).get("predicted_peak_mib"),
        "visual_tokens": m.get("visual_tokens"),
        "ttft_s": m.get("prefill_s"),
        "decode_tokens_per_s": m.get("decode_tokens_per_s"),
        "started_utc": provenance.get("started_utc"),
        "git_commit": provenance.get("git_commit"),
    }


def runs(folders: list[Path]) -> list[tuple[Path, dict]]:
    """(results file, its data) for every device folder under every given folder, in order."""
    return [(path, load_results(path)) for folder in folders for path in results_files(folder)]


def records(folders: list[Path]) -> list[tuple[dict, dict]]:
    """(record, its run's environment): the latest record of each cell of each device folder."""
    return [(rec, data["environment"]) for _, data in runs(folders) for rec in latest_records(data).values()]


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def jsonl_text(pairs: list[tuple[dict, dict]]) -> str:
    """One line per cell record, each with its run's environment (as results.jsonl writes them)."""
    return "".join(json.dumps({**rec, "environment": env}, default=str) + "\n" for rec, env in pairs)


def _md(value) -> str:
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def export(folders: list[Path], fmt: str) -> str:
    pairs = records(folders)
    if fmt == "jsonl":
        return jsonl_text(pairs)
    rows = [flat_row(rec, env) for rec, env in pairs]
    return csv_text(rows) if fmt == "csv" else markdown_table(rows)


def device_csv(data: dict) -> str:
    """results.csv of one device folder."""
    return csv_text([flat_row(rec, data["environment"]) for rec in latest_records(data).values()])
