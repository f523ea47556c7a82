"""Machine-readable results: the JSON Schemas racelab's outputs follow, and a validator.

summary.json (racelab run, repro) is described by lab/schemas/summary.schema.json.
Every document carries "schema_version"; within a version fields may be added,
never removed or changed in meaning.  Validation uses the jsonschema library
(Draft 2020-12), so other tools can use the same files.

`python -m lab.results validate results/DIR/summary.json` checks a file and
prints what does not conform (exit 1), or "ok".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "schemas"
SUMMARY_VERSION = 1


def schema(name: str = "summary") -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def problems(doc: Any, name: str = "summary") -> list[str]:
    """Where doc does not follow the schema: one line each, with its JSON path; [] = valid."""
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(schema(name))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.results", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    val = sub.add_parser("validate", help="check a summary.json against its schema")
    val.add_argument("file", type=Path)
    a = ap.parse_args(argv)
    try:
        doc = json.loads(a.file.read_text())
    except (OSError, ValueError) as e:
        print(f"{a.file}: {e}", file=sys.stderr)
        return 2
    found = problems(doc)
    for p in found:
        print(f"{a.file}: {p}")
    if not found:
        print(f"{a.file}: ok (summary schema version {SUMMARY_VERSION})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
