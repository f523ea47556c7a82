"""`racelab repro BUG`: the affected and the fixed kernel side by side, with evidence.

The kernels come from the scenario ([kernels] affected/fixed) unless --kernel
replaces them.  What each kernel is expected to do comes from the catalog
(the races a kernel is affected by), adjusted by a mitigation's predicted
effect (the scenario's [mitigations] table).  The verdicts come only from
the runs.  Both fleets run at once; a clean control stops as soon as its
clean exposure rules out the affected kernel's measured rate (ControlStop).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lab import verdict as v
from lab.config import Backend, RunConfig, fmt_duration
from lab.run import InfraError, log
from lab.scenario import Scenario, from_data
from lab.session import Outcome, rows_from_targets
from lab.workload import TargetResult

if TYPE_CHECKING:
    from lab.host import Host


AFFECTED_GRACE_S = 5.0
HOLD = -1.0    # AgentSpec.stop_grace: after the first violation, load on until SIGUSR1 or the budget


def expectations(s: Scenario, names: list[str], artifacts_affected: list[tuple[str, ...] | None],
                 mitigation: str | None) -> dict[str, str]:
    """What each kernel should do, from the catalog; a kernel the catalog does not know
    (bzimage:, git:, tarball: without a catalog entry: affected None) gets no expectation:
    its verdict is the answer, never a mismatch."""
    exp = {}
    for name, affected in zip(names, artifacts_affected, strict=True):
        if affected is None:
            continue
        hit = s.name in affected
        if hit and mitigation and s["mitigations"].get(mitigation) == "prevents":
            hit = False
        exp[name] = "reproduced" if hit else "clean"
    return exp


def run_repro(cfg: RunConfig, *, budget_given: bool, progress: bool = True,
              fixed_duration: bool = False) -> Outcome:
    """fixed_duration: cfg.duration is the user's --duration, so a clean control runs
    all of it (no early stop); otherwise it is a budget (--budget, or the scenario's)."""
    from lab import fleet, session

    s = from_data(cfg.scenario_data, path=f"{cfg.scenario}.toml")
    names = list(cfg.kernels) or [s["kernels"]["affected"], s["kernels"]["fixed"]]
    budget = cfg.duration if budget_given or fixed_duration else s.budget()
    cfg = dataclasses.replace(
        cfg, kernels=tuple(names), duration=budget,
        # run to the first violation, or to the budget; a few seconds more show its kinds and
        # give the rate a clean control is tested against (k onsets: its lower bound grows
        # with k, so the control's wanted clean time falls: 4 onsets in 3 s want 21 s of it,
        # 8 in 6 s 13 s); the control runs meanwhile, so this costs the run no time
        stop_on_first=True, stop_grace=0.0 if cfg.stop_on_first else AFFECTED_GRACE_S,
        evidence=tuple(sorted(set(cfg.evidence) | {"trace"})))
    if cfg.backend == Backend.NETNS:
        if cfg.kernels and list(cfg.kernels) != [s["kernels"]["affected"], s["kernels"]["fixed"]]:
            log.info("netns backend: testing this machine's kernel; --kernel ignored")
        cfg = dataclasses.replace(cfg, kernels=())
        return session.run_netns(cfg, progress=progress)
    specs = fleet.resolve_kernels(names)
    affected: list[tuple[str, ...] | None] = [sp.affected for sp in specs]
    expected = expectations(s, names, affected, cfg.mitigation)
    log.info("repro %s: %s", s.name, ", ".join(
        f"{k} (expect {expected[k]})" if k in expected else f"{k} (unknown to the catalog: no expectation)"
        for k in names))
    title = f"racelab repro {s.name}" + (f" with mitigation {cfg.mitigation}" if cfg.mitigation else "")
    control = None if fixed_duration else ControlStop.for_repro(s, expected, cfg.vms)
    if control is not None and cfg.stop_grace > 0:
        # each guest holds its load after its first violation until ControlStop releases it:
        # the control's rate keeps being measured while the control needs it
        cfg = dataclasses.replace(cfg, stop_grace=HOLD)
    if control is not None:
        log.info("a clean control stops once an affected-like kernel would have shown an onset with "
                 "probability >= %g (run.control_miss = %g), within the %s budget",
                 1 - control.miss, control.miss, fmt_duration(budget))
    return fleet.run_vm(cfg, progress=progress, title=title, expected=expected, control=control)


@dataclass
class _Watched:
    """One target (a control's or an affected kernel's), as its agent's events tell it."""

    host: Host | None = None
    pid: int | None = None
    load_at: float | None = None   # agent clock
    prev_t: float = 0.0            # s since load start of the last receive-count reading
    prev_rx: int = 0
    clean_s: float = 0.0           # seconds packets flowed, as lab.workload counts exposure
    violated: bool = False
    onsets: int = 0                # violations that start a fault (the checker's "onset")
    first_violation_t: float | None = None   # s since load start
    at_grace: tuple[int, float] | None = None  # (onsets, clean_s) AFFECTED_GRACE_S after the first violation
    ended: bool = False            # its agent is done (agent-done, or the fleet says so)
    stop_sent: bool = False
    reason: str = ""               # the agent's own reason for ending ("stopped": ours)


@dataclass
class ControlStop:
    """Ends a clean control once its evidence suffices.

    The affected kernels (expected to reproduce) give a rate: the Garwood lower bound,
    at the scenario's confidence, of their onsets per second of traffic, summed over
    their guests as the control's clean seconds are.  A control (expected clean) that
    stays clean so long that an affected-like kernel would have shown an onset with
    probability >= 1 - miss is asked to end its load (SIGUSR1 to its agent, which ends
    as if its duration had elapsed: a normal result over the exposure it had).  Until
    every affected kernel has reproduced, the controls keep running; the budget caps
    them either way.

    The rate is measured while it is needed: repro holds an affected guest's load after
    its first violation (AgentSpec.stop_grace < 0) and counts its onsets live, so a
    rare race's bound tightens while the control runs instead of resting on the one
    onset seen before the load ended.  A held guest is released (SIGUSR1) at least
    AFFECTED_GRACE_S after its first violation, once no control still needs the rate.
    The fleet calls on_event() for every agent event, target_done() when an agent's
    run ends and annotate() on every row."""

    affected: tuple[str, ...]
    controls: tuple[str, ...]
    vms: int
    confidence: float
    miss: float
    rate: float | None = None      # decided lower rate (onsets/s); 0: no rate to test against
    by: dict[str, float] = field(default_factory=dict)   # affected kernel -> its lower rate
    _done: dict[str, list[TargetResult]] = field(default_factory=dict)
    _watched: dict[str, dict[str, _Watched]] = field(default_factory=dict)
    _said: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_repro(cls, s: Scenario, expected: dict[str, str], vms: int) -> ControlStop | None:
        affected = tuple(k for k, e in expected.items() if e == "reproduced")
        controls = tuple(k for k, e in expected.items() if e == "clean")
        miss = float(s["run"]["control_miss"])
        if not affected or not controls or miss <= 0:
            return None
        return cls(affected, controls, vms, s["run"]["confidence"], miss)

    def on_event(self, kernel: str, label: str, ev: dict[str, Any], host: Host) -> None:
        if kernel not in self.controls and kernel not in self.affected:
            return
        with self._lock:
            w = self._watched.setdefault(kernel, {}).setdefault(label, _Watched())
            typ, at = ev.get("type"), float(ev.get("at", 0.0) or 0.0)
            if typ == "load-start":
                w.host, w.load_at = host, at
                w.pid = int(ev["pid"]) if isinstance(ev.get("pid"), int) else None
            elif typ == "violation":
                w.violated = True
                w.onsets += 1 if ev.get("onset", True) else 0
                if w.first_violation_t is None and w.load_at is not None:
                    w.first_violation_t = at - w.load_at
            elif typ == "agent-done":
                w.reason, w.ended = str(ev.get("reason", "")), True
            elif typ in ("stats", "done") and w.load_at is not None:
                t, rx = at - w.load_at, int(ev.get("rx", 0) or 0)
                if rx > w.prev_rx:
                    w.clean_s += max(0.0, t - w.prev_t)
                    w.prev_rx = rx
                w.prev_t = max(w.prev_t, t)
                if w.at_grace is None and w.first_violation_t is not None \
                        and w.prev_t - w.first_violation_t >= AFFECTED_GRACE_S:
                    w.at_grace = (w.onsets, w.clean_s)
            todo = self._decide() if typ in ("stats", "done", "violation", "agent-done") else []
        self._send(todo)

    def target_done(self, kernel: str, res: TargetResult) -> None:
        """An agent's run ended (before its evidence is fetched: the rate is known now)."""
        with self._lock:
            # a guest lost before its load has no events: it is done all the same
            self._watched.setdefault(kernel, {}).setdefault(res.label, _Watched()).ended = True
            if kernel not in self.affected:
                todo = self._decide()
            else:
                self._done.setdefault(kernel, []).append(res)
                if len(self._done[kernel]) >= self.vms:
                    row = rows_from_targets(kernel, self._done[kernel], 0.0, self.confidence, vms=self.vms)
                    # the final count, unless the live one (same units) says more
                    final = row.corruption.per_second[0] if row.verdict == v.REPRODUCED else 0.0
                    self.by[kernel] = max(final, self._live(kernel) or 0.0)
                todo = self._decide()
        self._send(todo)

    def _live(self, kernel: str) -> float | None:
        """An affected kernel's lower rate from its guests' events; None: no onset yet.

        The better of two looks: at AFFECTED_GRACE_S after each guest's first violation
        (what a run that ended there would have measured), and now.  Onsets need not
        come at a steady rate (the generic race's come in a burst, then seldom), so the
        longer look alone could weaken the bound the shorter one gave; a rare race's
        bound grows with the longer one."""
        ws = list(self._watched.get(kernel, {}).values())
        onsets, seconds = sum(w.onsets for w in ws), sum(w.clean_s for w in ws)
        if onsets == 0 or seconds <= 0:
            return None
        now = v.poisson_interval(onsets, seconds, self.confidence)[0]
        if len(ws) < self.vms or not all(w.at_grace or w.ended for w in ws):
            return now
        k = sum(w.at_grace[0] if w.at_grace else w.onsets for w in ws)
        s = sum(w.at_grace[1] if w.at_grace else w.clean_s for w in ws)
        return max(now, v.poisson_interval(k, s, self.confidence)[0] if k and s > 0 else 0.0)

    def _current(self) -> float | None:
        """The rate a control is tested against now: the lowest affected kernel's; None until
        every affected kernel has reproduced (0: one ended without reproducing)."""
        rates = []
        for k in self.affected:
            r = self.by.get(k, self._live(k))
            if r is None:
                return None
            rates.append(r)
        return min(rates)

    def _decide(self) -> list[tuple[str, _Watched]]:
        """Targets to send SIGUSR1 now (called with the lock held): controls clean long enough,
        then held guests past their grace once no control still needs the rate."""
        rate = self._current()
        if rate is not None and (self.rate is None or not any(
                w.stop_sent for k in self.controls for w in self._watched.get(k, {}).values())):
            self.rate = rate   # frozen once a control is stopped on it: the rows cite that one
        if rate and not self._said:
            self._said = True
            log.info("%s reproduced (>= %.3g onsets/s at %.0f%% so far): a clean control may stop after "
                     "%.3g s of traffic", ", ".join(self.affected), rate, self.confidence * 100,
                     v.budget_for(rate, self.miss))
        todo = [t for k in self.controls for t in self._due(k, rate)]
        if any(self._needs_rate(k) for k in self.controls):
            return todo
        for k in (*self.affected, *self.controls):
            for label, w in self._watched.get(k, {}).items():
                if w.violated and not w.ended and not w.stop_sent and w.pid is not None \
                        and w.first_violation_t is not None \
                        and w.prev_t - w.first_violation_t >= AFFECTED_GRACE_S:
                    w.stop_sent = True
                    todo.append((label, w))
        return todo

    def _needs_rate(self, kernel: str) -> bool:
        """Is a control still running clean, waiting for enough evidence (or still booting)?"""
        ws = self._watched.get(kernel, {})
        return len(ws) < self.vms or any(not (w.ended or w.violated or w.stop_sent) for w in ws.values())

    def _due(self, kernel: str, rate: float | None) -> list[tuple[str, _Watched]]:
        """The targets of a control to stop now (called with the lock held)."""
        ws = self._watched.get(kernel, {})
        if not rate or len(ws) < self.vms or any(w.violated or w.pid is None for w in ws.values()):
            return []
        if any(w.stop_sent for w in ws.values()) or \
                not v.clean_enough(rate, sum(w.clean_s for w in ws.values()), self.miss):
            return []
        for w in ws.values():
            w.stop_sent = True
        log.info("%s: clean for %.1f s, enough against %s: ending its load", kernel,
                 sum(w.clean_s for w in ws.values()), ", ".join(self.affected))
        return list(ws.items())

    def _send(self, todo: list[tuple[str, _Watched]]) -> None:
        for label, w in todo:
            if w.host is None or w.pid is None:   # not loading yet: _decide() never picks such a one
                continue
            try:
                w.host.cmd(["kill", "-USR1", str(w.pid)], check=False, timeout=15)
            except InfraError as e:   # the guest is gone: its own stream says so
                log.debug("%s: stop request not delivered: %s", label, e)

    def annotate(self, row: v.Row) -> None:
        """Say in a control's row why it ended when it did."""
        if row.kernel not in self.controls:
            return
        rate = self.rate or 0.0
        stopped = any(w.reason == "stopped" for w in self._watched.get(row.kernel, {}).values())
        row.extra["control_stop"] = {
            "stopped_early": stopped, "miss": self.miss, "against": dict(self.by),
            "lower_rate_per_s": rate,
            "needed_s": round(v.budget_for(rate, self.miss), 3) if rate > 0 else None,
            "text": v.control_stop_text(row.seconds, rate, self.confidence, self.miss, stopped)
            if row.verdict == v.NOT_REPRODUCED else ""}
