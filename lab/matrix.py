"""`racelab matrix`: the kernel x scenario grid, without writing any pytest.

Each cell boots a fleet on one kernel and runs one scenario to a verdict.
Its expectation comes from the catalog: a kernel whose `affected` list names
the scenario should reproduce; any other kernel must stay clean.  Each cell
names the level it judges: "reproduced" (corruption seen), "window" (at least
the race window traced; for scenarios whose corruption is rare,
evidence.corruption_rare) or "clean" (neither corruption nor window hits).
A fixed kernel with any violation or window hit fails its cell.  An affected
kernel that does not reach its level within the budget ("missed", with its
rate bound) fails its cell too by default: a kernel the catalog calls affected
that does not reproduce is news (a lost regression test, a budget too short).
`--missed skip` reports such a cell as skipped instead.  decide() is that one
policy, and the pytest grid (lab.racelab_grid, --racelab-missed) uses it too.

Cells run `--jobs` at a time, spread round-robin over the libvirt URIs given
with --uri (or RACELAB_URIS, comma-separated).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import random
import shlex
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import scenario as scen
from lab.config import Backend, RunConfig, parse_duration
from lab.run import BadInput, InfraError, log
from lab.verdict import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, WINDOW_HIT, Row, level_text, matches,
                         verdict_text)

if TYPE_CHECKING:
    from lab.kernels.kernel import KernelSpec

# what a cell showed
PASS, FAIL, MISSED, ERROR = "pass", "fail", "not-reproduced-within-budget", "error"
# how it counts (JUnit, exit code, pytest): the outcome under the --missed policy
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"     # and ERROR
MISSED_POLICIES = ("fail", "skip")       # what a MISSED cell counts as
DEFAULT_MISSED = "fail"


@dataclass
class Cell:
    kernel: str
    scenario: str
    expected: str                  # the level judged: reproduced | window | clean
    row: Row | None = None
    outcome: str = ERROR           # pass | fail | not-reproduced-within-budget | error
    out: str = ""
    error: str = ""
    status: str = ERROR            # passed | failed | skipped | error (decide())
    message: str = ""              # why, for a cell that did not pass
    uri: str = ""                  # the libvirt URI it ran on
    started: str = ""              # UTC, ISO 8601
    build: dict[str, Any] = field(default_factory=dict)         # the kernel: build_info()
    environment: dict[str, Any] = field(default_factory=dict)   # host kernel, QEMU, accelerator

    def to_dict(self) -> dict[str, Any]:
        from lab.report import row_dict
        return {"kernel": self.kernel, "scenario": self.scenario, "expected": self.expected,
                "outcome": self.outcome, "status": self.status, "message": self.message,
                "out": self.out, "error": self.error,
                "row": row_dict(self.row) if self.row else None, "uri": self.uri, "started": self.started,
                "build": self.build, "environment": self.environment}


def build_info(artifact: Any, spec: Any = None) -> dict[str, Any]:
    """What identifies a cell's kernel build (for matrix.json and its KCIDB builds).  The
    patches are the spec's, as this checkout has them (a cached build names the files it
    was first built from), with their sha256: the document alone then says what they were."""
    if artifact is None:
        return {}
    info = {k: (list(v) if isinstance(v, tuple) else v) for k in (
        "key", "version", "source", "source_identity", "patches", "fragments", "config_hash", "compiler",
        "build_seconds", "created") if (v := getattr(artifact, k, None)) is not None}
    patches = [str(p) for p in (getattr(spec, "patches", None) or info.get("patches") or ())]
    try:
        sums = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in patches]
    except OSError:
        sums = []
    if patches:
        info["patches"] = patches
    if sums:
        info["patches_sha256"] = sums
    return info


def cell_outcome(expected: str, row: Row) -> str:
    """expected: the level this cell judges (lab.verdict.EXPECT_LEVELS)."""
    if row.verdict == INCONCLUSIVE:
        return ERROR
    if expected == "clean":
        return PASS if matches(row, "clean") else FAIL
    return PASS if matches(row, expected) else MISSED


@dataclass(frozen=True)
class Decision:
    outcome: str       # what the cell showed: PASS, FAIL, MISSED or ERROR (cell_outcome())
    status: str        # how it counts: PASSED, FAILED, SKIPPED or ERROR
    message: str       # why, for any status but PASSED


def decide(kernel: str, scenario: str, expected: str, row: Row, *, budget: float,
           missed: str = DEFAULT_MISSED) -> Decision:
    """A cell's outcome and how it counts, for `racelab matrix` and the pytest grid alike.

    missed: what an affected kernel that did not reach its level within the budget counts
    as, "fail" (the default: the catalog says it is affected, so that is news) or "skip"."""
    if missed not in MISSED_POLICIES:
        raise ValueError(f"unknown missed policy {missed!r}: one of {', '.join(MISSED_POLICIES)}")
    outcome = cell_outcome(expected, row)
    if outcome == PASS:
        return Decision(PASS, PASSED, "")
    if outcome == ERROR:
        return Decision(ERROR, ERROR, f"infrastructure: {verdict_text(row)}")
    if outcome == FAIL:
        return Decision(FAIL, FAILED, f"{kernel} is expected to be fixed for {scenario} but showed "
                                      f"{verdict_text(row)}: violations {row.by_kind}")
    why = (f"{kernel} is affected by {scenario} but did not reach the {expected} level within "
           f"{budget:.0f}s: {verdict_text(row)}; {level_text(row.corruption, row.packets, row.confidence)}")
    return Decision(MISSED, FAILED if missed == "fail" else SKIPPED, why)


def expected_for(kernel_spec: KernelSpec, scenario: str) -> str:
    """The level a cell judges: clean for a kernel the catalog does not list as affected;
    for an affected one, reproduced, or window where the scenario says its corruption
    is rare (a window hit then shows the kernel is vulnerable)."""
    if scenario not in (kernel_spec.affected or ()):
        return "clean"
    return "window" if scen.load(scenario)["evidence"].get("corruption_rare") else "reproduced"


def run_cell(cell: Cell, *, budget: float, vms: int, seed: int, out: Path, uri: str,
             progress: bool, missed: str = DEFAULT_MISSED) -> Cell:
    from lab import fleet

    s = scen.load(cell.scenario)
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend=Backend.VM, kernels=(cell.kernel,),
                    duration=budget, vms=vms, seed=seed, stop_on_first=True, stop_grace=1.0,
                    out=str(out), uris=(uri,), evidence=("trace",))
    cell.uri, cell.started = uri, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        outcome = fleet.run_vm(cfg, progress=progress, expected={cell.kernel: cell.expected})
        cell.row = outcome.rows[0]
        d = decide(cell.kernel, cell.scenario, cell.expected, cell.row, budget=budget, missed=missed)
        cell.outcome, cell.status, cell.message = d.outcome, d.status, d.message
        k = outcome.meta.get("kernels", {}).get(cell.kernel, {})
        cell.environment = {"host_kernel": outcome.meta.get("host_kernel", ""), "qemu": outcome.meta.get("qemu", ""),
                            **{f: k[f] for f in ("accelerator", "accelerator_reason", "vcpus") if f in k}}
    except InfraError as e:
        cell.outcome, cell.status, cell.error = ERROR, ERROR, str(e)
        cell.message = f"infrastructure: {e}"
    cell.out = str(out)
    return cell


def uris_from(args: list[str] | None) -> list[str]:
    env = [u for u in os.environ.get("RACELAB_URIS", "").split(",") if u]
    return list(args or []) or env or ["qemu:///system"]


def run_matrix(kernels: list[str], scenarios: list[str], *, budget: float, vms: int, jobs: int,
               out: Path, uris: list[str], seed: int, progress: bool = True,
               missed: str = DEFAULT_MISSED) -> list[Cell]:
    from lab import fleet, image

    for s in scenarios:
        scen.load(s)                           # every bad scenario before anything boots
    specs = fleet.resolve_kernels(kernels)     # every bad kernel, too
    fleet.preflight_vm()
    arts = fleet.build_kernels(kernels, progress=progress)
    image.ensure_image(progress=progress)
    cells = [Cell(k, s, expected_for(sp, s), build=build_info(a, sp))
             for k, sp, a in zip(kernels, specs, arts, strict=True) for s in scenarios]
    out.mkdir(parents=True, exist_ok=True)
    # several cells at once have no live line of their own (their progress would interleave):
    # each says when it starts and ends, with the tally so far
    tally = {PASS: 0, FAIL: 0, MISSED: 0, ERROR: 0}
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(c: Cell, i: int, **kw: Any) -> Cell:
        log.info("[matrix] start %s on %s (cell %d/%d, %s)", c.scenario, c.kernel, i + 1, len(cells), kw["uri"])
        done = run_cell(c, **kw)
        with lock:
            tally[done.outcome] += 1
            log.info("[matrix] done  %s on %s: %s  [%d/%d done: %d pass, %d fail, %d missed, %d error; %.0fs]",
                     c.scenario, c.kernel, cell_text(done), sum(tally.values()), len(cells), tally[PASS],
                     tally[FAIL], tally[MISSED], tally[ERROR], time.monotonic() - t0)
        return done

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        futs = [ex.submit(one, c, i, budget=budget, vms=vms, seed=seed + i,
                          out=out / f"{c.scenario}__{c.kernel.replace('/', '_').replace(':', '_')}",
                          uri=uris[i % len(uris)], progress=progress and jobs == 1, missed=missed)
                for i, c in enumerate(cells)]
        cells = [f.result() for f in futs]
    return cells


def cell_text(c: Cell) -> str:
    if c.row is None:
        return f"ERROR: {c.error[:60]}"
    w = f", window {c.row.window.count}" if c.row.window.available else ""
    judged = f"[{c.outcome}, judged: {c.expected}]"
    if c.row.verdict == REPRODUCED:
        return f"REPRODUCED ({c.row.violations} viol{w}) {judged}"
    if c.row.verdict == WINDOW_HIT:
        return f"WINDOW HIT ({c.row.window.count:,} interleavings, no corruption in {c.row.packets:,} pkts) {judged}"
    if c.row.verdict == NOT_REPRODUCED:
        w = f", window {c.row.window.count}" if c.row.window.available else ", window n/a"
        return f"clean (< {c.row.corruption.per_packet[1]:.2g}/pkt{w}) {judged}"
    return f"{verdict_text(c.row)} {judged}"


def print_grid(cells: list[Cell], kernels: list[str], scenarios: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="racelab matrix", show_lines=True)
    t.add_column("kernel")
    for s in scenarios:
        t.add_column(s)
    by = {(c.kernel, c.scenario): c for c in cells}
    colours = {PASS: "green", FAIL: "bold red", MISSED: "yellow", ERROR: "magenta"}
    for k in kernels:
        t.add_row(k, *[f"[{colours[by[(k, s)].outcome]}]{escape(cell_text(by[(k, s)]))}[/]" for s in scenarios])
    Console(width=160).print(t)


def junit_cases(cells: list[Cell]) -> list[Any]:
    """The grid as report.write_junit's testcases: one per cell, under racelab.matrix.SCENARIO."""
    from lab.report import JunitCase

    cases = []
    for c in cells:
        r = c.row
        props = (("expected", c.expected), ("outcome", c.outcome), ("status", c.status),
                 ("verdict", r.verdict if r else "error"), ("packets", r.packets if r else 0),
                 ("rate", level_text(r.corruption, r.packets, r.confidence) if r else ""),
                 ("first_violation_s", r.first_violation_s if r else None),
                 ("window_hits", (r.window.count if r.window.available else "n/a") if r else "n/a"),
                 ("window_rate", level_text(r.window, r.packets, r.confidence) if r else ""))
        # how a cell counts is decide()'s (the --missed policy), never this writer's
        result, message = {FAILED: ("failure", c.message), SKIPPED: ("skipped", c.message),
                           ERROR: ("error", c.error or c.message or (verdict_text(r) if r else "error"))
                           }.get(c.status, ("", ""))
        cases.append(JunitCase(f"racelab.matrix.{c.scenario}", c.kernel, r.wall if r else 0.0, props,
                               result, message))
    return cases


def parse_junit(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(scenario, kernel) -> properties + outcome: what CI tooling reads back."""
    root = ET.parse(path).getroot()
    out = {}
    for tc in root.iter("testcase"):
        scenario = tc.get("classname", "").rsplit(".", 1)[-1]
        props = {p.get("name", ""): p.get("value", "") for p in tc.iter("property")}
        out[(scenario, tc.get("name", ""))] = props
    return out


def write_heatmap(path: Path, cells: list[Cell], kernels: list[str], scenarios: list[str]) -> None:
    colours = {PASS: "#27ae60", FAIL: "#c0392b", MISSED: "#f1c40f", ERROR: "#8e44ad"}
    by = {(c.kernel, c.scenario): c for c in cells}
    head = "".join(f"<th>{html.escape(s)}</th>" for s in scenarios)
    rows = []
    for k in kernels:
        tds = []
        for s in scenarios:
            c = by[(k, s)]
            rel = os.path.relpath(Path(c.out) / "report.html", path.parent) if c.out else "#"
            tds.append(f"<td style='background:{colours[c.outcome]};color:#fff'>"
                       f"<a style='color:#fff' href='{html.escape(rel)}'>{html.escape(cell_text(c))}</a>"
                       f"<br><small>expected {c.expected}; {c.status}</small></td>")
        rows.append(f"<tr><th>{html.escape(k)}</th>{''.join(tds)}</tr>")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>racelab matrix</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #999;padding:8px}}
table{{border-collapse:collapse}}</style></head><body><h1>racelab matrix</h1>
<p>green: as expected; red: a fixed kernel showed violations or window hits; yellow: an affected
kernel did not reach the level its cell judges (reproduced: corruption; window: at least the race
window traced) within budget (failed, or skipped under --missed skip: each cell says which);
purple: infrastructure error</p>
<table><tr><th>kernel</th>{head}</tr>{''.join(rows)}</table></body></html>""")


@dataclass(frozen=True)
class MatrixArgs:
    """What `racelab matrix` was asked; lab.cli builds it from its options (same defaults)."""

    kernels: str                   # comma-separated kernel specs, as given
    scenarios: str                 # comma-separated scenario names
    budget: str = "5m"             # load time per cell, at most
    vms: int = 1                   # guests per cell
    missed: str = DEFAULT_MISSED   # an affected cell short of its level: fail | skip
    out: str = ""                  # results directory ("" = results/matrix-TIME-PID)
    jobs: int = 1                  # cells at a time
    uris: tuple[str, ...] = ()     # libvirt hosts (() = $RACELAB_URIS, else qemu:///system)
    as_json: bool = False          # matrix.json on stdout, the grid on stderr
    tap: str | None = None         # also write TAP here
    kcidb: str | None = None       # also write KCIDB JSON here


def main(a: MatrixArgs) -> int:
    kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if not kernels or not scenarios:
        raise BadInput("--kernels and --scenarios need at least one name each")
    budget = parse_duration(a.budget, "--budget")
    missed = a.missed
    if missed not in MISSED_POLICIES:
        raise BadInput(f"unknown --missed {missed!r}", hint=f"one of {', '.join(MISSED_POLICIES)}")
    out = Path(a.out or f"results/matrix-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    seed = random.SystemRandom().randrange(1 << 31)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    log.info("results: %s  (each cell's directory appears in it as the cell starts)", out.absolute())
    cells = run_matrix(kernels, scenarios, budget=budget, vms=a.vms, jobs=a.jobs, out=out,
                       uris=uris_from(list(a.uris)), seed=seed, missed=missed)
    as_json = a.as_json
    human = sys.stderr if as_json else sys.stdout   # --json: stdout is the document alone
    with contextlib.redirect_stdout(human):
        print_grid(cells, kernels, scenarios)
    n_missed = sum(c.outcome == MISSED for c in cells)
    if n_missed:
        print(f"{n_missed} affected cell(s) did not reach their level within the budget: "
              + ("failed (--missed fail: a kernel the catalog calls affected that does not reproduce is news; "
                 "--missed skip reports them as skipped)" if missed == "fail" else
                 "skipped (--missed skip; they do not change the exit code)"), file=human)
    from lab import export, report, results
    report.write_junit(out / "junit.xml", "racelab.matrix", junit_cases(cells))
    write_heatmap(out / "matrix.html", cells, kernels, scenarios)
    data = {"schema_version": results.MATRIX_VERSION, "cells": [c.to_dict() for c in cells], "seed": seed,
            "missed": missed, "wall_seconds": time.monotonic() - t0, "started": started,
            "command": " ".join(shlex.quote(x) for x in ["racelab", *sys.argv[1:]])}
    doc = json.dumps(data, indent=2, default=str)
    (out / "matrix.json").write_text(doc)
    print(f"results: {out}  (matrix.json, junit.xml, matrix.html); wall {time.monotonic() - t0:.0f}s",
          file=human)
    if a.tap:
        print(f"TAP: {export.write_tap(Path(a.tap), export.cell_points(cells))}", file=human)
    if a.kcidb:
        print(f"KCIDB: {export.write_kcidb(Path(a.kcidb), json.loads(doc))}", file=human)
    if as_json:
        print(doc)
    if any(c.status == ERROR for c in cells):
        return 3
    return 1 if any(c.status == FAILED for c in cells) else 0


__all__ = ["Cell", "Decision", "decide", "cell_outcome", "expected_for", "MISSED_POLICIES", "run_matrix",
           "parse_junit", "main"]
