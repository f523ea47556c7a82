"""Machine-readable results: the JSON Schemas racelab's outputs follow, and a validator.

summary.json (racelab run, repro), matrix.json (racelab matrix) and bisect.json
(racelab bisect) are described by lab/schemas/KIND.schema.json; a matrix cell's
row is the same object as a summary row, and its schema refers to summary's.
Every document carries "schema_version"; within a version fields may be added,
never removed or changed in meaning.  Validation uses the jsonschema library
(Draft 2020-12), so other tools can use the same files.

`python -m lab.results validate FILE` checks a file and prints what does not
conform (exit 1), or "ok".  Which schema applies is told by the file's name
(summary.json, matrix.json, bisect.json) or else by its content; --kind says it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "schemas"
SUMMARY_VERSION = 1
MATRIX_VERSION = 1
BISECT_VERSION = 1
VERSIONS = {"summary": SUMMARY_VERSION, "matrix": MATRIX_VERSION, "bisect": BISECT_VERSION}
# a key only that kind of document has at its top: how a renamed file is still told apart
_MARKS = {"rows": "summary", "cells": "matrix", "culprit": "bisect"}


def schema(name: str = "summary") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return doc


def _registry() -> Any:
    """Every schema under its $id, so that matrix's reference to summary's row resolves."""
    from referencing import Registry, Resource

    return Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in (schema(k) for k in VERSIONS))


def kind_of(doc: Any, path: Path | None = None) -> str | None:
    """summary, matrix or bisect: from the file's name, else from the document's own keys."""
    if path is not None and path.stem in VERSIONS:
        return path.stem
    if isinstance(doc, dict):
        for key, kind in _MARKS.items():
            if key in doc:
                return kind
    return None


def problems(doc: Any, name: str = "summary") -> list[str]:
    """Where doc does not follow the schema: one line each, with its JSON path; [] = valid."""
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(schema(name), registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def cli_validate(path: Path, kind: str | None = None) -> int:
    """`racelab dev results validate FILE`: "ok", or each place FILE does not follow its
    schema (exit 1)."""
    from lab.run import BadInput

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: {e}") from None
    kind = kind or kind_of(doc, path)
    if kind is None:
        raise BadInput(f"{path}: not a summary.json, matrix.json or bisect.json (no rows, cells or culprit "
                       "at its top)", hint="name the schema with --kind summary|matrix|bisect")
    found = problems(doc, kind)
    for p in found:
        print(f"{path}: {p}")
    if not found:
        print(f"{path}: ok ({kind} schema version {VERSIONS[kind]})")
    return 1 if found else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.results ...` is `racelab dev results ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.results", argv)


if __name__ == "__main__":
    sys.exit(main())
