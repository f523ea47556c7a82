"""Results for other tools: TAP 13 streams and KCIDB documents.

TAP (https://testanything.org/tap-version-13-specification.html), from `racelab run`,
`repro` and `matrix --tap FILE`: one test point per row (run, repro) or cell (matrix),
judged exactly as the command's exit code judges it.  A row is `ok` when it has a
verdict and, where a level is expected (--expect; for repro the catalog's), meets it;
an INCONCLUSIVE row is `not ok`.  A matrix cell counts as lab.matrix.decide() says, as
junit.xml and the exit code count it: `ok` when it passed, `not ok` when it failed or erred,
and `ok ... # SKIP` for an affected kernel that did not reach its level within the budget
under `--missed skip` (under the default, `--missed fail`, that cell is `not ok`).  Each point carries a YAML
diagnostic block: the verdict, packets, seconds, violations by kind, and for a point
that is not ok (or skipped) a `message` saying why.  The YAML is block style with
double-quoted strings, the subset that TAP's own consumers (Perl's TAP::Parser YAMLish)
read as well as full YAML parsers (mappings nest; nothing is a list).

KCIDB (kernelci/kcidb-io, schema v4.0), from `racelab matrix --kcidb FILE`: the
matrix.json document as checkouts (kernel source + patches), builds (one per kernel:
its cache key, config hash, compiler) and tests (one per cell, path racelab.SCENARIO).
Ids are "racelab:LOCAL-ID".  A test's status says whether its cell met its
expectation, as the matrix's own exit code and junit.xml do: PASS, FAIL, SKIP (an
affected kernel that did not reach its level within the budget, under --missed skip) or
ERROR (no verdict).  So a known-affected kernel whose race reproduced is PASS; the verdict
itself is in the test's misc.  The host kernel, QEMU and accelerator are in each
test's environment.misc.

`python -m lab.export kcidb results/matrix-.../matrix.json` prints an existing
matrix's KCIDB document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from lab.matrix import ERROR, FAIL, FAILED, MISSED, PASS, PASSED, SKIPPED, Cell, cell_text
from lab.run import BadInput, writable_dir_problem
from lab.verdict import INCONCLUSIVE, Row, level_text, matches, verdict_text

ORIGIN = "racelab"
KCIDB_VERSION = {"major": 4, "minor": 0}   # every field used here is in v4.0
KCIDB_STATUS = {PASSED: "PASS", FAILED: "FAIL", SKIPPED: "SKIP", ERROR: "ERROR"}
# a matrix.json written before cells carried a status: its outcome, missed cells skipped
_STATUS_OF_OUTCOME = {PASS: PASSED, FAIL: FAILED, MISSED: SKIPPED, ERROR: ERROR}


def file_problem(path: Path) -> str | None:
    """None if a file can be written at path (its missing directories made); else what is wrong.
    Nothing is left behind: an existing file is opened for appending, never truncated."""
    p = Path(os.path.abspath(path))
    if p.is_dir():
        return f"{p} is a directory"
    if p.exists():
        try:
            open(p, "a").close()
        except OSError as e:
            return f"cannot write it ({e.strerror or e})"
        return None
    why = writable_dir_problem(p.parent)
    return f"{p.parent}: {why}" if why else None


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- TAP 13 ---------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One TAP test point."""

    ok: bool
    description: str
    skip: str = ""                                   # the reason, where the command itself skips
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _escape(text: str) -> str:
    # a '#' would start a directive, a newline a new line of the stream
    return " ".join(text.split()).replace("\\", "\\\\").replace("#", "\\#")


def tap(points: list[Point]) -> str:
    lines = ["TAP version 13", f"1..{len(points)}"]
    for n, p in enumerate(points, 1):
        line = f"{'ok' if p.ok else 'not ok'} {n} - {_escape(p.description)}"
        if p.skip:
            line += f" # SKIP {_escape(p.skip)}"
        lines.append(line)
        if p.diagnostics:
            lines.append("  ---")
            for k, v in p.diagnostics.items():
                lines += _yaml(k, v, 2)
            lines.append("  ...")
    return "\n".join(lines) + "\n"


def _yaml(key: str, value: Any, indent: int) -> list[str]:
    pad, key = " " * indent, _yaml_key(key)
    if isinstance(value, dict) and value:
        return [f"{pad}{key}:"] + [line for k, v in value.items() for line in _yaml(str(k), v, indent + 2)]
    return [f"{pad}{key}: {_yaml_scalar(value)}"]


def _yaml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key) else json.dumps(key, ensure_ascii=False)


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return "~"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # never an exponent (YAML 1.1 reads 1e-05 as a string); to the microsecond, as seconds need
        text = f"{v:.6f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(v, dict):
        return "{}"
    # no block lists: TAP::Parser's YAMLish takes a list item with ": " in it for a mapping
    return json.dumps(v if isinstance(v, str) else json.dumps(v), ensure_ascii=False)


def write_tap(path: Path, points: list[Point]) -> Path:
    return _write(path, tap(points))


def row_ok(row: Row, level: str | None) -> bool:
    """As `racelab run` and `repro` judge a row for their exit code: a verdict, and the
    expected level met where one is expected."""
    return row.verdict != INCONCLUSIVE and matches(row, level)


def _row_diagnostics(row: Row) -> dict[str, Any]:
    return {"verdict": row.verdict, "verdict_text": verdict_text(row), "packets": row.packets,
            "seconds": round(row.seconds, 3), "wall": round(row.wall, 1),
            "violations": dict(sorted(row.by_kind.items())),
            "onsets": dict(sorted(row.onsets_by_kind.items())),
            "first_violation_s": row.first_violation_s,
            "window_hits": row.window.count if row.window.available else None,
            "rate": level_text(row.corruption, row.packets, row.confidence)}


def row_points(rows: list[Row], scenario: str, levels: dict[str, str | None]) -> list[Point]:
    """run, repro: a point per kernel's row; levels: kernel -> the level judged (None: none)."""
    points = []
    for r in rows:
        level = levels.get(r.kernel)
        ok = row_ok(r, level)
        why = ("" if ok else verdict_text(r) if r.verdict == INCONCLUSIVE
               else f"expected {level}, got {verdict_text(r)}")
        points.append(Point(ok, f"{r.kernel} {scenario}: {r.verdict}",
                            diagnostics={**({"message": why} if why else {}), "expected": level,
                                         **_row_diagnostics(r)}))
    return points


def cell_points(cells: list[Cell]) -> list[Point]:
    """matrix: a point per cell, judged as the matrix's exit code (and junit.xml) judge it."""
    points = []
    for c in cells:
        skip = (c.message or f"affected kernel did not reach {c.expected} within budget") \
            if c.status == SKIPPED else ""
        why = c.message or {FAIL: f"expected {c.expected}: {cell_text(c)}",
                            ERROR: c.error or (verdict_text(c.row) if c.row else "error")}.get(c.outcome, "")
        diag: dict[str, Any] = {**({"message": why} if why else {}), "expected": c.expected,
                                "outcome": c.outcome}
        if c.row is not None:
            diag.update(_row_diagnostics(c.row))
        if c.out:
            diag["results"] = c.out
        points.append(Point(c.status in (PASSED, SKIPPED),
                            f"{c.kernel} {c.scenario}: {c.row.verdict if c.row else 'ERROR'}", skip, diag))
    return points


# --- KCIDB v4 ---------------------------------------------------------------------

def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def patchset_hash(patches: list[str], sums: list[str] | None = None) -> str | None:
    """KCIDB's patchset_hash: sha256 over the newline-terminated sha256 of each patch, in
    order ("" for none).  sums: the patches' sha256 as recorded; else the files are read,
    and None when one cannot be any more."""
    if not patches:
        return ""
    if not sums or len(sums) != len(patches):
        sums = [s for s in (_sha256(p) for p in patches) if s is not None]
        if len(sums) != len(patches):
            return None
    return hashlib.sha256("".join(f"{s}\n" for s in sums).encode()).hexdigest()


def _checkout(kernel: str, build: dict[str, Any]) -> dict[str, Any]:
    source, ident = build.get("source", ""), build.get("source_identity", "")
    patches = [str(p) for p in build.get("patches", [])]
    ps = patchset_hash(patches, build.get("patches_sha256"))
    # the same source and patches are one checkout, whatever config they were built with
    local = hashlib.sha256(json.dumps([ident or source or kernel, ps if ps is not None else patches]).encode())
    names = [Path(p).name for p in patches]
    co: dict[str, Any] = {
        "id": f"{ORIGIN}:checkout-{local.hexdigest()[:16]}", "origin": ORIGIN, "valid": True,
        "comment": " + ".join([ident or source or kernel, *names]),
        "misc": {"source": source, "source_identity": ident, "patches": names}}
    if ps is not None:
        co["patchset_hash"] = ps
    m = re.fullmatch(r"git:([0-9a-f]{40})", ident)
    if m:
        co["git_commit_hash"] = m.group(1)
    return co


def _build(kernel: str, build: dict[str, Any], checkout_id: str) -> dict[str, Any]:
    frags = [Path(f).name.removesuffix(".config") for f in build.get("fragments", [])]
    b: dict[str, Any] = {
        "id": f"{ORIGIN}:{build.get('key') or kernel}", "origin": ORIGIN, "checkout_id": checkout_id,
        "comment": kernel, "architecture": "x86_64", "valid": True,
        "misc": {"kernel": kernel, **{k: build[k] for k in ("key", "version", "config_hash", "source_identity")
                                      if build.get(k)}}}
    if frags:
        b["config_name"] = "+".join(frags)
    if build.get("compiler"):
        b["compiler"] = build["compiler"]
    if build.get("build_seconds"):
        b["duration"] = float(build["build_seconds"])
        if build.get("created"):
            b["start_time"] = _iso(float(build["created"]) - float(build["build_seconds"]))
    return b


def _test(run_id: str, cell: dict[str, Any], build_id: str) -> dict[str, Any]:
    row, env = cell.get("row"), cell.get("environment") or {}
    verdict = row["verdict"] if row else "ERROR"
    t: dict[str, Any] = {
        "id": f"{ORIGIN}:{run_id}/{cell['scenario']}/{cell['kernel']}", "origin": ORIGIN,
        "build_id": build_id, "path": f"{ORIGIN}.{cell['scenario']}",
        "status": KCIDB_STATUS[cell.get("status") or _STATUS_OF_OUTCOME[cell["outcome"]]],
        "comment": f"{cell['scenario']} on {cell['kernel']}: {verdict} (expected {cell['expected']})",
        "environment": {
            "comment": f"racelab guest(s) on {cell.get('uri') or 'libvirt'}"
                       + (f", {env['accelerator']}" if env.get("accelerator") else ""),
            "misc": {k: v for k, v in {"uri": cell.get("uri", ""), **env}.items() if v not in ("", None)}},
        "misc": {"verdict": verdict, "expected": cell["expected"], "outcome": cell["outcome"],
                 "results": cell.get("out", "")},
    }
    if cell.get("started"):
        t["start_time"] = cell["started"]
    excerpt = cell.get("error") or (row.get("verdict_text", "") if row else "")
    if excerpt:
        t["log_excerpt"] = excerpt[:16384]
    if row:
        t["duration"] = float(row["wall"])
        t["misc"].update({k: row[k] for k in ("verdict_text", "packets", "seconds", "by_kind", "onsets_by_kind",
                                              "first_violation_s", "rate_text") if k in row})
        if row.get("window", {}).get("available"):
            t["misc"]["window_hits"] = row["window"]["count"]
    return t


def kcidb(matrix_doc: dict[str, Any]) -> dict[str, Any]:
    """A matrix.json document as a KCIDB v4 report."""
    cells = matrix_doc["cells"]
    started = str(matrix_doc.get("started", "")).replace("-", "").replace(":", "")
    run_id = f"matrix-{started + '-' if started else ''}{matrix_doc.get('seed', 0)}"
    checkouts: dict[str, dict[str, Any]] = {}
    builds: dict[str, dict[str, Any]] = {}
    tests = []
    for c in cells:
        if c["kernel"] not in builds:
            co = _checkout(c["kernel"], c.get("build") or {})
            checkouts.setdefault(co["id"], co)
            builds[c["kernel"]] = _build(c["kernel"], c.get("build") or {}, co["id"])
        tests.append(_test(run_id, c, builds[c["kernel"]]["id"]))
    return {"version": dict(KCIDB_VERSION), "checkouts": list(checkouts.values()),
            "builds": list({b["id"]: b for b in builds.values()}.values()), "tests": tests}


def write_kcidb(path: Path, matrix_doc: dict[str, Any]) -> Path:
    return _write(path, json.dumps(kcidb(matrix_doc), indent=2) + "\n")


def cli_kcidb(path: Path) -> None:
    """`racelab dev export kcidb FILE`: a matrix.json that `racelab matrix` wrote, as KCIDB v4."""
    try:
        doc = json.loads(path.read_text())
        out = kcidb(doc)
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{path}: not a readable matrix.json ({e!r})",
                       hint="give the matrix.json of a results/matrix-... directory") from None
    print(json.dumps(out, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.export ...` is `racelab dev export ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.export", argv)


if __name__ == "__main__":
    sys.exit(main())
