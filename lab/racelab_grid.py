"""The grid test the pytest plugin adds when --racelab-kernels/--racelab-scenarios are given."""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.racelab_cell


def test_cell(racelab_cell: dict[str, Any], record_property: Callable[[str, object], None], tmp_path: Path) -> None:
    from lab import scenario as scen
    from lab.config import RunConfig
    from lab.matrix import ERROR, FAILED, SKIPPED, decide
    from lab.verdict import level_text

    c = racelab_cell
    s = scen.load(c["scenario"])
    out = Path(os.environ.get("RACELAB_GRID_OUT", tmp_path)) / f"{c['scenario']}__{c['kernel'].replace(':', '_')}"
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend=c["backend"],
                    kernels=() if c["backend"] == "netns" else (c["kernel"],), duration=c["budget"],
                    vms=c["vms"], seed=random.SystemRandom().randrange(1 << 31), stop_on_first=True,
                    stop_grace=1.0, out=str(out), evidence=trace_for(c, s["evidence"]))
    if c["backend"] == "netns":
        from lab import session
        outcome = session.run_netns(cfg, progress=False)
    else:
        from lab import fleet
        outcome = fleet.run_vm(cfg, progress=False, expected={c["kernel"]: c["expected"]})
    row = outcome.rows[0]
    d = decide(c["kernel"], c["scenario"], c["expected"], row, budget=c["budget"], missed=c["missed"])
    for k, v in (("verdict", row.verdict), ("expected", c["expected"]), ("level_judged", c["expected"]),
                 ("outcome", d.outcome), ("status", d.status),
                 ("packets", row.packets),
                 ("violations", row.violations), ("first_violation_s", row.first_violation_s),
                 ("rate", level_text(row.corruption, row.packets, row.confidence)),
                 ("window_hits", row.window.count if row.window.available else "n/a"),
                 ("window_rate", level_text(row.window, row.packets, row.confidence)),
                 ("results", str(outcome.out))):
        # xdist sends properties through execnet, which takes builtin types only: a Verdict is sent as its value
        record_property(k, v.value if isinstance(v, enum.Enum) else v)
    # the same decision as `racelab matrix` (lab.matrix.decide, --racelab-missed as --missed)
    if d.status in (FAILED, ERROR):
        pytest.fail(d.message, pytrace=False)
    if d.status == SKIPPED:
        pytest.skip(d.message)


def trace_for(cell: dict[str, Any], evidence: dict[str, Any]) -> tuple[str, ...]:
    """A cell judging the window, or any cell of a rare-corruption scenario (a fixed kernel's
    clean then covers the window too), collects the trace."""
    return ("trace",) if cell["expected"] == "window" or evidence.get("corruption_rare") else ()
