"""`racelab repro BUG`: the affected and the fixed kernel side by side, with evidence.

The kernels come from the scenario ([kernels] affected/fixed) unless --kernel
replaces them.  What each kernel is expected to do comes from the catalog
(the races a kernel is affected by), adjusted by a mitigation's predicted
effect (the scenario's [mitigations] table, from FACTS.md).  The verdicts
come only from the runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lab.config import RunConfig
from lab.run import BadInput, log
from lab.scenario import Scenario, from_data
from lab.session import Outcome


def expectations(s: Scenario, names: list[str], artifacts_affected: list[tuple[str, ...]],
                 mitigation: str | None) -> dict[str, str]:
    exp = {}
    for name, affected in zip(names, artifacts_affected):
        hit = s.name in affected
        if hit and mitigation and s["mitigations"].get(mitigation) == "prevents":
            hit = False
        exp[name] = "reproduced" if hit else "clean"
    return exp


def run_repro(cfg: RunConfig, *, budget_given: bool, progress: bool = True) -> Outcome:
    from lab import fleet, kernel, session

    s = from_data(cfg.scenario_data, path=f"{cfg.scenario}.toml")
    names = list(cfg.kernels) or [s["kernels"]["affected"], s["kernels"]["fixed"]]
    budget = cfg.duration if budget_given else s.budget()
    cfg = dataclasses.replace(
        cfg, kernels=tuple(names), duration=budget,
        # run to the first violation (plus a moment, to see its kinds), or to the budget
        stop_on_first=True, stop_grace=0.0 if cfg.stop_on_first else 2.0,
        evidence=tuple(sorted(set(cfg.evidence) | {"trace"})))
    if cfg.backend == "netns":
        if cfg.kernels and list(cfg.kernels) != [s["kernels"]["affected"], s["kernels"]["fixed"]]:
            log.info("netns backend: testing this machine's kernel; --kernel ignored")
        cfg = dataclasses.replace(cfg, kernels=())
        return session.run_netns(cfg, progress=progress)
    specs = fleet.resolve_kernels(names)
    affected: list[tuple[str, ...]] = [tuple(getattr(sp, "affected", ()) or ()) for sp in specs]
    expected = expectations(s, names, affected, cfg.mitigation)
    log.info("repro %s: %s", s.name, ", ".join(f"{k} (expect {v})" for k, v in expected.items()))
    title = f"racelab repro {s.name}" + (f" with mitigation {cfg.mitigation}" if cfg.mitigation else "")
    return fleet.run_vm(cfg, progress=progress, title=title, expected=expected)
