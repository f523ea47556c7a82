"""`racelab selftest`: every detector fires when its fault is injected, on any kernel.

Each fault class is committed on purpose by the application itself (the
checker or the senders), so this works on a fixed kernel: it is the positive
control for every detector.  A clean run with the same load is the negative
control: it must show no violation at all.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass

from lab import dataplane, scenario
from lab.host import LocalHost
from lab.session import preflight_netns
from lab.workload import agent_spec, run_target


@dataclass
class Check:
    xdp: str
    mode: str
    inject: str            # "" = the clean control
    by_kind: dict[str, int]
    packets: int
    ok: bool
    error: str | None


# what forward mode (RX -> TX -> COMP) commits on its TX/COMP side: the COMP ring's detectors
FORWARD_KINDS = ("duplicate", "state", "poison")


def run_one(bin_dir: str, xdp: str, inject: str, seconds: float, seed: int,
            mode: str = "rxdrop") -> Check:
    over: dict[str, object] = {"xdp.mode": xdp, "load.senders": 1, "load.rate": 200000,
                               "checker.mode": mode}
    if mode == "forward":
        over["checker.frames"] = 1024   # a frame lost on purpose (state) must not starve the ring
    s = scenario.load("generic-rx-race", over)
    spec = agent_spec(s, duration=seconds, seed=seed, bin_dir=bin_dir, stop_on_first=False,
                      inject=inject)
    res = run_target(LocalHost(bin_dir), spec, label=f"{xdp}/{inject or 'clean'}",
                     kernel=f"host:{platform.release()}")
    if res.packets == 0 and res.infra_error is None:
        # no packet reached the checker, so this run says nothing about the detector: the load
        # did not start in time (seen once on a 2-core host with VMs running); try once more
        res = run_target(LocalHost(bin_dir), spec, label=f"{xdp}/{inject or 'clean'}",
                         kernel=f"host:{platform.release()}")
        if res.packets == 0 and res.infra_error is None:
            res.infra_error = "no packet reached the checker (twice): the load did not run"
    if inject:
        ok = res.by_kind.get(inject, 0) > 0 and res.infra_error is None
    else:
        ok = res.violation_count == 0 and res.packets > 0 and res.infra_error is None
    return Check(xdp, mode, inject, dict(res.by_kind), res.packets, ok, res.infra_error)


def main(xdp_modes: list[str] | None = None, kinds: list[str] | None = None, seconds: float = 4.0,
         as_json: bool = False) -> int:
    modes = xdp_modes or ["generic", "native"]
    kinds = kinds or list(dataplane.INJECT_KINDS)
    unknown = [k for k in kinds if k not in dataplane.INJECT_KINDS]
    if unknown:   # before root, before the build: a typo is the first thing to hear about
        from lab.run import BadInput
        raise BadInput(f"unknown detector kind(s): {', '.join(unknown)}",
                       hint=f"one of: {', '.join(dataplane.INJECT_KINDS)}")
    preflight_netns()
    bin_dir = str(dataplane.build())
    checks: list[Check] = []
    t0 = time.monotonic()
    forward = [k for k in kinds if k in FORWARD_KINDS]
    plan = [(xdp, "rxdrop", inject) for xdp in modes for inject in ["", *kinds]]
    if forward:
        plan += [(xdp, "forward", inject) for xdp in modes for inject in ["", *forward]]
    for xdp, mode, inject in plan:
        c = run_one(bin_dir, xdp, inject, seconds, seed=len(checks) + 1, mode=mode)
        checks.append(c)
        if not as_json:
            what = f"inject {inject:<10}" if inject else "clean control   "
            got = ", ".join(f"{k}={n}" for k, n in sorted(c.by_kind.items())) or "no violations"
            status = "ok  " if c.ok else "FAIL"
            print(f"{status} {xdp:<8} {mode:<7} {what} -> {got}; {c.packets:,} packets"
                  + (f"  [{c.error}]" if c.error else ""), flush=True)
    failed = [c for c in checks if not c.ok]
    if as_json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        print(f"selftest: {len(checks) - len(failed)} detectors ok, {len(failed)} failed "
              f"({time.monotonic() - t0:.0f}s, kernel {platform.release()})")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
