"""`racelab selftest`: every detector fires when its fault is injected, on any kernel.

Each fault class is committed on purpose by the application itself (the
checker or the senders), so this works on a fixed kernel: it is the positive
control for every detector.  A clean run with the same load is the negative
control: it must show no violation at all.

One injected fault is enough to show a detector works, so an injection case
ends at its expected violation (the agent's graceful stop, SIGUSR1); only the
clean controls run their full duration.  The cases are independent (each in
namespaces of its own), so a few run side by side.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lab import dataplane, scenario
from lab.agent.dataplane import INJECT_KINDS
from lab.host import LocalHost
from lab.session import preflight_netns
from lab.workload import TargetResult, agent_spec, run_target


@dataclass
class Check:
    xdp: str
    mode: str
    inject: str            # "" = the clean control
    by_kind: dict[str, int]
    packets: int
    ok: bool
    error: str | None
    seconds: float = 0.0   # wall time of the case


# what forward mode (RX -> TX -> COMP) commits on its TX/COMP side: the COMP ring's detectors
FORWARD_KINDS = ("duplicate", "state", "poison")
# cases at once: each is mostly set-up (namespaces, sockets) and a second of load
JOBS = 4


class _StopAtKind:
    """Ends an injection case at its first violation of the injected kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pid: int | None = None
        self.sent = False
        self._lock = threading.Lock()

    def __call__(self, label: str, ev: dict[str, Any]) -> None:
        with self._lock:
            if ev.get("type") == "load-start" and isinstance(ev.get("pid"), int):
                self.pid = int(ev["pid"])
            elif ev.get("type") == "violation" and ev.get("kind") == self.kind and not self.sent \
                    and self.pid is not None:
                self.sent = True
                try:
                    os.kill(self.pid, signal.SIGUSR1)   # the agent ends its load as if it had run out
                except ProcessLookupError:
                    pass


def run_one(bin_dir: str, xdp: str, inject: str, seconds: float, seed: int,
            mode: str = "rxdrop") -> Check:
    """One case.  seconds: a clean control's load; an injection case's at most."""
    t0 = time.monotonic()
    over: dict[str, object] = {"xdp.mode": xdp, "load.senders": 1, "load.rate": 200000,
                               "checker.mode": mode}
    if mode == "forward":
        over["checker.frames"] = 1024   # a frame lost on purpose (state) must not starve the ring
    s = scenario.load("generic-rx-race", over)
    spec = agent_spec(s, duration=seconds, seed=seed, bin_dir=bin_dir, stop_on_first=False,
                      inject=inject)

    def once() -> TargetResult:
        return run_target(LocalHost(bin_dir), spec, label=f"{xdp}/{inject or 'clean'}",
                          kernel=f"host:{platform.release()}",
                          on_event=_StopAtKind(inject) if inject else None)

    res = once()
    if res.packets == 0 and res.infra_error is None:
        # no packet reached the checker, so this run says nothing about the detector: the load
        # did not start in time (seen once on a 2-core host with VMs running); try once more
        res = once()
        if res.packets == 0 and res.infra_error is None:
            res.infra_error = "no packet reached the checker (twice): the load did not run"
    if inject:
        ok = res.by_kind.get(inject, 0) > 0 and res.infra_error is None
    else:
        ok = res.violation_count == 0 and res.packets > 0 and res.infra_error is None
    return Check(xdp, mode, inject, dict(res.by_kind), res.packets, ok, res.infra_error,
                 round(time.monotonic() - t0, 3))


def plan_cases(modes: list[str], kinds: list[str]) -> list[tuple[str, str, str]]:
    """(xdp mode, checker mode, injected kind or "" for the clean control), in report order."""
    forward = [k for k in kinds if k in FORWARD_KINDS]
    plan = [(xdp, "rxdrop", inject) for xdp in modes for inject in ["", *kinds]]
    if forward:
        plan += [(xdp, "forward", inject) for xdp in modes for inject in ["", *forward]]
    return plan


def run_all(xdp_modes: list[str] | None = None, kinds: list[str] | None = None, seconds: float = 3.0,
         as_json: bool = False, jobs: int = JOBS) -> int:
    modes = xdp_modes or ["generic", "native"]
    kinds = kinds or list(INJECT_KINDS)
    unknown = [k for k in kinds if k not in INJECT_KINDS]
    if unknown:   # before root, before the build: a typo is the first thing to hear about
        from lab.run import BadInput
        raise BadInput(f"unknown detector kind(s): {', '.join(unknown)}",
                       hint=f"one of: {', '.join(INJECT_KINDS)}")
    preflight_netns()
    bin_dir = str(dataplane.build())
    t0 = time.monotonic()
    plan = plan_cases(modes, kinds)
    # the clean controls first: they run longest, the short injection cases fill in around them
    order = sorted(range(len(plan)), key=lambda i: plan[i][2] != "")
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        futs = {i: ex.submit(run_one, bin_dir, plan[i][0], plan[i][2], seconds, seed=i + 1, mode=plan[i][1])
                for i in order}
        checks = []
        for i in range(len(plan)):   # reported in plan order, each as soon as it and those before are done
            c = futs[i].result()
            checks.append(c)
            if not as_json:
                what = f"inject {c.inject:<10}" if c.inject else "clean control   "
                got = ", ".join(f"{k}={n}" for k, n in sorted(c.by_kind.items())) or "no violations"
                status = "ok  " if c.ok else "FAIL"
                print(f"{status} {c.xdp:<8} {c.mode:<7} {what} -> {got}; {c.packets:,} packets, "
                      f"{c.seconds:.1f}s" + (f"  [{c.error}]" if c.error else ""), flush=True)
    failed = [c for c in checks if not c.ok]
    if as_json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        print(f"selftest: {len(checks) - len(failed)} detectors ok, {len(failed)} failed "
              f"({time.monotonic() - t0:.0f}s, kernel {platform.release()})")
    return 0 if not failed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.selftest ...` is `racelab selftest ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.selftest", argv)


if __name__ == "__main__":
    sys.exit(main())
