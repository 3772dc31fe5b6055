"""`qwen-compat`: the command line around the pytest plugin.

  qwen-compat run [PYTEST ARGS]     run a matrix (pytest with the plugin; defaults to the default matrix)
  qwen-compat schema                JSON Schema of matrix files
  qwen-compat explain TEXT-OR-FILE  classify an error text or log
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError


def _explain(args) -> int:
    from .failures import classify

    text = args.text
    if "\n" not in text and len(text) < 1024 and Path(text).is_file():
        text = Path(text).read_text(errors="replace")
    found = classify(text)
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        print(f"category: {found.category}")
        print(f"matched: {found.matched or '(none)'}")
        print(f"cause: {found.cause}")
        print(f"remedy: {found.remedy}")
    return 0


def _schema(args) -> int:
    from .matrix import schema

    print(json.dumps(schema(), indent=2))
    return 0


def _run(args) -> int:
    import pytest

    return int(pytest.main(args.pytest_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-compat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a matrix with pytest (extra arguments go to pytest)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run)
    p = sub.add_parser("schema", help="print the JSON Schema of matrix files")
    p.set_defaults(func=_schema)
    p = sub.add_parser("explain", help="classify an error text or a log file")
    p.add_argument("text", help="the error text, or a path to a log file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"qwen-compat: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
