"""`qwen-compat`: the command line around the pytest plugin.

qwen-compat run [PYTEST ARGS]     run a matrix (pytest with the plugin; defaults to the default matrix)
qwen-compat schema                JSON Schema of matrix files
qwen-compat explain TEXT|FILE|-   classify an error text, log file or standard input [--gpu --dtype --attn ...]
qwen-compat gate --baseline DIR|NAME --current DIR   compare a run with a baseline (exit 1 on regression)
qwen-compat report DIR...         merge many runners' reports into one fleet view
qwen-compat export --format csv|jsonl|md DIR...   many runners' results as one table or JSON Lines
qwen-compat fleet MATRIX --ray ADDRESS [--reports DIR] [PYTEST ARGS]   the matrix on a Ray cluster, by card
qwen-compat plan MATRIX --device KEY [--json]   predicted peak memory of every cell of that device, its loads
qwen-compat doctor [MATRIX]       this host's facts, and what the matrix will do here
qwen-compat smoke --endpoint URL  a running server's release check (built-in matrix)
qwen-compat smoke --webui URL     the same for a running Gradio WebUI, driven as a person would (--family)
qwen-compat engine install vllm   build (or reuse) the engine's own environment in the user's cache
qwen-compat engine list           the engines found here: where, version, interpreter
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from harness.errors import ReportWriteError, UserError


def _exists(text: str) -> bool:
    """A one-line argument naming something that exists (a file, a folder); a long text is never taken for a path."""
    try:
        return "\n" not in text and Path(text).exists()
    except (OSError, ValueError):  # File name too long, embedded NUL: a text, not a path
        return False


# One word with a folder separator or a log's extension: meant as a file, never an error text.
PATH_LIKE = re.compile(r"\S*/\S*|\S+\.(?:log|txt|out|err|json|jsonl|yaml|yml|html|xml)", re.IGNORECASE)


def _explain_input(arg: str | None) -> str:
    if arg == "-" or (arg is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if arg is None:
        raise UserError(
            "explain needs an error text.", key="TEXT", fix="pass the text, a log file, or '-' to read standard input."
        )
    if _exists(arg):
        if Path(arg).is_dir():
            raise UserError(f"{arg} is a folder, not a log.", file=arg, fix="pass one log file, or the error text.")
        try:
            data = Path(arg).read_bytes()
        except OSError as err:
            raise UserError(f"cannot read {arg}: {err.strerror}.", file=arg, fix="check the path.") from None
        if b"\0" in data[:8192]:
            raise UserError(
                f"{arg} is a binary file, not a log: there is no error text in it to classify.",
                file=arg,
                fix="pass the log or the error text itself (a core dump or a checkpoint is not one).",
            )
        return data.decode(errors="replace")
    if PATH_LIKE.fullmatch(arg.strip()):
        raise UserError(
            f"there is no file {arg}: it reads as a path, and a path is not an error text.",
            file=arg,
            fix="check the path, or pass the error text itself (quoted) or '-' to read standard input.",
        )
    return arg


def _pixel_count(value: str) -> int:
    from harness.matrix.schema import PIXELS_PATTERN, _pixels

    if not re.fullmatch(PIXELS_PATTERN, value):
        raise argparse.ArgumentTypeError(f"'{value}' is not a pixel count (e.g. 1003520 or 1280*28*28)")
    return _pixels(value)


def _explain(args) -> int:
    from harness.judge.remedies import Context, explain

    text = _explain_input(args.text)
    options = (args.gpu, args.dtype, args.attn, args.resolution, args.max_pixels, args.model)
    context = Context.from_options(*options) if any(o is not None for o in options) else None
    found = explain(text, context)
    matched = 0 if found.category != "other" else 1  # nothing in the catalog: a script must be able to tell
    if args.json:
        print(json.dumps(found.to_dict(), indent=2, ensure_ascii=False))
        return matched
    print(f"category: {found.category}")
    print(f"confidence: {found.confidence:.2f}")
    print(f"matched: {found.matched or '(none)'}")
    print(f"evidence: {found.evidence}")
    print(f"cause: {found.cause}")
    print(f"remedy: {found.remedy}")
    if found.runner_up:
        up = found.runner_up
        print(f"runner-up: {up['category']} ({up['matched']}, confidence {up['confidence']:.2f}): {up['evidence']}")
    for alt in found.alternatives:
        if found.runner_up and alt["matched"] == found.runner_up["matched"]:
            continue
        print(f"also close: {alt['category']} ({alt['matched']}): {alt['evidence']}")
    return matched


def _schema(args) -> int:
    from harness.matrix.schema import schema

    print(json.dumps(schema(), indent=2))
    return 0


def _run(pytest_args: list[str]) -> int:
    """Everything after `run` goes to pytest as it is (`-m v100`, `-k`, `--compat-*`)."""
    import pytest

    return int(pytest.main(pytest_args))


def _gate(args) -> int:
    from harness.report import baselines, gate
    from harness.report.ci import append_step_summary

    stores = [Path(d) for d in args.store]
    reports = [Path(args.reports)] if args.reports else [Path(args.current), baselines.DEFAULT_REPORTS]
    baseline = baselines.resolve(args.baseline, reports, stores)
    memory_tol = gate.parse_percent(args.memory_tolerance, "--memory-tolerance")
    latency_tol = (
        None if args.latency_tolerance is None else gate.parse_percent(args.latency_tolerance, "--latency-tolerance")
    )
    changes = gate.compare(baseline, Path(args.current), memory_tol, latency_tol, args.unchecked_fails)
    gate.print_table(changes)
    gate.write(changes, Path(args.out or args.current))
    _warn(append_step_summary(gate.markdown(changes)))
    return 1 if gate.regressions(changes) else 0


def _report(args) -> int:
    from harness.report import fleet
    from harness.report.ci import append_step_summary

    html_path, md_path = fleet.write([Path(d) for d in args.dirs], Path(args.out or args.dirs[0]))
    print(f"fleet view: {html_path} and {md_path}")
    _warn(append_step_summary(md_path.read_text()))
    return 0


def _export(args) -> int:
    from harness.report.exports import export
    from harness.report.results import write_report

    text = export([Path(d) for d in args.dirs], args.format)
    if args.out:
        write_report(Path(args.out), text)
        print(f"export: {args.out}")
    else:
        from harness.secrets import scrub_text

        sys.stdout.write(scrub_text(text))
    return 0


def _warn(line: str | None) -> None:
    if line:
        print(f"qwen-compat: {line}", file=sys.stderr)


def _fleet(args) -> int:
    from harness.dispatch import fleet

    return fleet.run(args)


def _quiet_transformers() -> None:
    """Library warnings (processor deprecations) would bury the table the user asked for."""
    import transformers

    transformers.utils.logging.set_verbosity_error()


def _placement_cell(placed: dict | None) -> str:
    if not placed:
        return ""
    peaks = ", ".join(f"{device} {mib:.0f}" for device, mib in placed["peaks_mib"].items())
    return f"{placed['summary']}; {peaks}"


def _expected(cell, device: str):
    """What the card's and the engine's rules say of a cell before it runs (None: expected to pass)."""
    from harness.engines.availability import tensor_parallel_expectation
    from harness.matrix.capabilities import effective_expectation
    from harness.matrix.gpus import table

    expectation = effective_expectation(cell, table()[device])
    if expectation.outcome == "pass" and cell.backend == "openai":
        expectation = tensor_parallel_expectation(cell) or expectation
    return None if expectation.outcome == "pass" else expectation


def _plan(args) -> int:
    from harness.devices.host import resolve
    from harness.matrix import cells
    from harness.matrix import schema as matrix
    from harness.matrix.cells import on_host, selector_matches
    from harness.plan.memory import predict

    args.device = resolve(args.device, "--device").key  # auto: this host's card; a clear error for an unknown key
    _quiet_transformers()
    m = matrix.load(args.matrix)
    chosen = [c for c in on_host(cells.expand(m, args.matrix), args.device) if c.device == args.device]
    if not chosen:
        raise UserError(
            f"no cell of this matrix targets '{args.device}'.",
            file=args.matrix,
            key="devices",
            fix="pick a device the matrix lists.",
        )
    from harness.plan.placement import offload_remedy, predict_placement, with_placement

    predictions = []
    for cell in chosen:
        expected = _expected(cell, args.device)
        prediction = predict(cell)
        if cell.placement != "single":
            prediction = with_placement(prediction, predict_placement(cell, cell.placement))
        row = prediction.to_dict()
        if cell.placement == "single" and row["verdict"] == "over":
            remedy = offload_remedy(cell, row["budget_mib"])
            if remedy:
                row["offload_remedy"] = {"placement": remedy[0], "says": remedy[1]}
        claim = next((c for c in m.claims if selector_matches(c.when, cell.axis_values())), None)
        if claim:
            row["claim"] = {"peak_gb": claim.peak_gb, "source": claim.source}
        if expected:
            row["expected"] = {
                "outcome": expected.outcome,
                "categories": expected.categories,
                "reason": expected.reason,
            }
        predictions.append(row)
    if args.json:
        print(json.dumps(predictions, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memory plan: {args.matrix} on {args.device}")
    placed = "placement: map, peak MiB per device"
    for column in (
        "cell",
        "peak MiB",
        "GB",
        "claimed GB",
        "verdict",
        "weights",
        "packed",
        "KV",
        "vision act.",
        "text act.",
        "overhead",
        placed,
    ):
        table.add_column(column, justify="left" if column in ("cell", placed) else "right", overflow="fold")
    for r in predictions:
        p = r["parts"]
        claimed = f"{r['claim']['peak_gb']:.1f}" if "claim" in r else ""
        table.add_row(
            r["id"],
            f"{r['predicted_peak_mib']:.0f}",
            f"{r['predicted_peak_mib'] * 2**20 / 1e9:.1f}",
            claimed,
            r["verdict"],
            f"{p['weights_mib']:.0f}",
            f"{p['weights_packed_mib']:.0f}" if "weights_packed_mib" in p else "",
            f"{p['kv_cache_mib']:.0f}",
            f"{p['vision_activations_mib']:.0f}",
            f"{p['text_activations_mib']:.0f}",
            f"{p['overhead_mib']:.0f}",
            _placement_cell(r.get("placement")),
        )
    Console(width=260).print(table)
    for r in predictions:
        if "expected" in r:
            kind = {"xfail": "expected failure", "skip": "skipped"}[r["expected"]["outcome"]]
            print(f"{r['id']}: {kind}: {r['expected']['reason']}")
    for r in predictions:
        if "offload_remedy" in r:
            print(
                f"{r['id']}: over its card; {r['offload_remedy']['says']}: "
                f"placement {json.dumps(r['offload_remedy']['placement'])}"
            )
    print(
        "MiB = 2**20 bytes; GB = 1e9 bytes (as the claimed figures are usually given). weights: what transformers "
        "holds while generating; packed: what a quantized checkpoint holds."
    )
    _print_load_plan(chosen, args.device, args.matrix)
    return 0


def _bytes(count: int) -> str:
    """1e9-based units, as the GB column of the memory plan."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _print_load_plan(chosen: list, device: str, matrix_file: str) -> None:
    """The model loads the run takes, each timed from its weights at this host's measured speeds where the plan's
    device is this host's (elsewhere another host's disk and card would be guessed)."""
    from rich.console import Console
    from rich.table import Table

    from harness.devices.host import detect_host
    from harness.plan.loads import load_plan

    loads = load_plan(chosen)
    kinds = {load.weights for load in loads}
    here = detect_host().key == device
    speeds = {}
    if here and "read" in kinds:
        from harness.devices.speeds import read_bytes_per_s

        speeds["read_bytes_per_s"] = read_bytes_per_s()
    if here and "seeded" in kinds:
        from harness.devices.speeds import seed_values_per_s

        speeds["seed_values_per_s"] = seed_values_per_s("cpu" if device == "cpu" else "cuda")
    loads = load_plan(chosen, **speeds)
    table = Table(title=f"load plan: {matrix_file} on {device}")
    for column in ("load", "first cell", "cells", "attention", "weights", "size", "predicted s"):
        table.add_column(column, justify="left" if column in ("first cell", "attention", "weights") else "right")
    for n, load in enumerate(loads, 1):
        predicted = "" if load.predicted_s is None else f"{load.predicted_s:.3g}"
        size = _bytes(load.bytes) if load.weights != "server" else ""
        attention = " then ".join(load.attentions)
        table.add_row(str(n), load.first_cell, str(load.cells), attention, load.weights, size, predicted)
    Console(width=260).print(table)
    switches = sum(len(load.attentions) - 1 for load in loads)
    line = f"{len(loads)} loads for {len(chosen)} cells ({switches} attention switches on a loaded model, not loads)"
    if here:
        timed = sum(load.predicted_s or 0.0 for load in loads)
        rates = [f"read {_bytes(speeds['read_bytes_per_s'])}/s"] if "read_bytes_per_s" in speeds else []
        rates += [f"seeding {speeds['seed_values_per_s']:.3g} values/s"] if "seed_values_per_s" in speeds else []
        line += (
            f"; predicted load time {timed:.3g} s at this host's {', '.join(rates) or 'speeds'} (measured once, cached)"
        )
        line += "; building the modules and the processor is not counted."
    else:
        line += f"; load times are predicted on the run's host: `qwen-compat plan {matrix_file} --device auto` there."
    print(line)


def _doctor(args) -> int:
    from harness import doctor
    from harness.devices.host import detect_host
    from harness.devices.torch_build import probe

    host = detect_host()
    build = probe()
    problem = doctor.torch_verdict(host, build) if host.compute_capability else None
    _quiet_transformers()
    rows = doctor.plan_cells(args.matrix, host) if args.matrix and not problem else None
    doctor.render(host, rows, build)
    if problem:
        print(f"qwen-compat: {problem}", file=sys.stderr)
    return 1 if problem else 0


def _engine(args) -> int:
    from harness.engines import environments

    if args.action == "install":
        environments.install(args.engine, fresh=args.fresh)
        return 0
    engines = environments.found_engines()
    for e in engines:
        print(f"{e.name} {e.version or '(version unknown)'}: {e.where} ({' '.join(e.command)}; python {e.python})")
    if not engines:
        print("no engine found (on PATH or managed); `qwen-compat engine install vllm` builds vLLM's CPU build")
    return 0


def _smoke(args) -> int:
    from harness import smoke

    return smoke.run(args)


def build_parser() -> argparse.ArgumentParser:
    from harness import __version__

    parser = argparse.ArgumentParser(prog="qwen-compat", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qwen-compat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a matrix with pytest: every argument after `run` goes to pytest")
    p = sub.add_parser("schema", help="print the JSON Schema of matrix files")
    p.set_defaults(func=_schema)
    p = sub.add_parser("explain", help="classify an error text, a log file or standard input")
    p.add_argument("text", nargs="?", help="the error text, a path to a log file, or - for standard input")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--gpu", help="GPU table key of the card that failed (e.g. v100, t4, a10g)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.add_argument("--attn", help="attention implementation: sdpa, eager or flash_attention_2")
    p.add_argument("--resolution", help="image resolution WxH")
    p.add_argument("--max-pixels", type=_pixel_count, help="the pixel budget, e.g. 1003520 or 1280*28*28")
    p.add_argument("--model", help="shipped architecture or tiny family, for the memory planner's max_pixels")
    p.set_defaults(func=_explain)
    p = sub.add_parser("gate", help="compare a run with a baseline; exit 1 on any regression, 2 on bad input")
    p.add_argument("--baseline", required=True, help="reports folder, or a name saved with --compat-save-baseline")
    p.add_argument("--current", required=True, help="reports folder of the run to check")
    p.add_argument(
        "--reports",
        help="reports folder whose baselines/NAME/ holds a named baseline (default: --current, then ./reports)",
    )
    p.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="DIR",
        help="a storage root holding NAME/ baselines (repeatable)",
    )
    p.add_argument("--memory-tolerance", default="5%", help="allowed rise of peak memory (default 5%%)")
    p.add_argument(
        "--latency-tolerance",
        help="allowed rise of time to first token; given, latency is judged on every cell; not given, only where "
        "both runs timed 3 or more repeats (then 15%%), and single samples are notes",
    )
    p.add_argument(
        "--unchecked-fails",
        action="store_true",
        help="a pass whose drift or agreement check had no twin in its run is a regression (default: a note)",
    )
    p.add_argument("--out", help="where gate.json and gate.md go (default: the current folder)")
    p.set_defaults(func=_gate)
    p = sub.add_parser("report", help="merge per-GPU reports folders into one fleet view (HTML and Markdown)")
    p.add_argument("dirs", nargs="+", help="reports folders, each holding <device>/results.json")
    p.add_argument("--out", help="where fleet.html and fleet.md go (default: the first folder)")
    p.set_defaults(func=_report)
    p = sub.add_parser("export", help="many runners' results as one CSV, JSON Lines or Markdown table")
    p.add_argument("dirs", nargs="+", help="reports folders (each holding <device>/results.json) or device folders")
    p.add_argument("--format", required=True, choices=("csv", "jsonl", "md"))
    p.add_argument("--out", help="file to write (default: standard output)")
    p.set_defaults(func=_export)
    p = sub.add_parser(
        "fleet",
        help="run a matrix on a Ray cluster: each device's cells on the nodes advertising its accelerator type",
        allow_abbrev=False,  # a pytest option must never be taken for an abbreviation of one of these
    )
    p.add_argument("matrix")
    p.add_argument("--ray", required=True, metavar="ADDRESS", help="the cluster (HOST:PORT), or local (in-process)")
    p.add_argument("--reports", default="reports", help="reports folder; each device's go to <reports>/<device>/")
    p.add_argument("--baseline", help="after the run, the release gate against this folder or baseline name")
    p.add_argument("--memory-tolerance", default="5%", help="the gate's allowed rise of peak memory (default 5%%)")
    p.add_argument("--latency-tolerance", help="the gate's allowed rise of TTFT (default: judged only with 3+ repeats)")
    p.add_argument(
        "--emulated-accelerators",
        action="store_true",
        help="let a CPU node that advertises a card run that card's cells (tests of placement; records say so)",
    )
    p.set_defaults(func=_fleet, pytest_args=[], takes_pytest_args=True)
    p = sub.add_parser("plan", help="predicted peak memory of every cell a matrix runs on one device")
    p.add_argument("matrix")
    p.add_argument("--device", required=True, help="GPU table key, or auto (this host's card)")
    p.add_argument("--json", action="store_true", help="one JSON object per cell")
    p.set_defaults(func=_plan)
    p = sub.add_parser(
        "smoke", help="smoke-test a running OpenAI-compatible server, or a Gradio WebUI, with a built-in matrix"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--webui", help="the Gradio app's address, e.g. http://127.0.0.1:7860/")
    p.add_argument("--api-key-env", help="NAME of the environment variable holding its API key")
    p.add_argument(
        "--model", help="the served model's name (default: the first the server lists; a WebUI does not say)"
    )
    p.add_argument("--family", help="qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_vl_moe (default: from the name)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--reports", default="reports", help="reports folder (results go to <reports>/endpoint-<host>-<port>/)"
    )
    p.add_argument(
        "--lenient", action="store_true", help="record the server's HTTP errors as skips (default: failures)"
    )
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="more pytest arguments")
    p.set_defaults(func=_smoke)
    p = sub.add_parser("engine", help="a serving engine's own environment: install it, or list those found here")
    p.add_argument("action", choices=["install", "list"])
    p.add_argument("engine", nargs="?", default="vllm", help="the engine (default vllm)")
    p.add_argument("--fresh", action="store_true", help="remove the environment and build it anew")
    p.set_defaults(func=_engine)
    p = sub.add_parser("doctor", help="this host's GPU, drivers and packages; what a matrix will do here")
    p.add_argument("matrix", nargs="?", default="matrices/default.yaml")
    p.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # argparse would take pytest's own options (-m, -k) for ours
        return _run(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `fleet` passes what it does not know to pytest; any other command refuses it
        if not getattr(args, "takes_pytest_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pytest_args = unknown
    try:
        return args.func(args)
    except (UserError, ReportWriteError) as err:
        print(f"qwen-compat: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
