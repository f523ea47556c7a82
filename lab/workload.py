"""The workload seen from the orchestrator: scenario -> AgentSpec -> results.

run_target() starts the agent on any Host (local namespaces or a guest over
SSH), streams its events to a callback and to events.jsonl, and returns a
TargetResult.  A stream that ends without the agent's "agent-done" is an
infrastructure loss, recorded as such and never counted as "not reproduced".

A target's exposure is the time its checker's receive count was rising
(exposure_s()), not the time the agent ran; a target that checked nothing
(no packets, senders that failed, traffic that stopped early) is lost
(lost_reason()) and counts neither way.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lab.agent.agent import AgentSpec, CheckerOpts, IperfOpts, SenderOpts
from lab.amplifier import PATCH_KNOB
from lab.cache import atomic_write
from lab.host import Host, Process
from lab.run import InfraError, LostVM
from lab.scenario import WIRING, Scenario, to_topology

if TYPE_CHECKING:
    from lab.amplifier import Plan

MAX_KEPT_VIOLATIONS = 500
# Traffic that stopped this long before the load ended (and at least this share of the load)
# leaves a target whose exposure is not what was asked: lost, not "clean".  Stats come every
# 0.5 s and a busy TCG guest delays them by a second or two.
STOPPED_EARLY_S = 3.0
STOPPED_EARLY_SHARE = 0.1
INTERRUPT_GRACE_S = 15.0   # after Ctrl-C: how long the agent gets to wind down and say its last


def agent_spec(s: Scenario, *, duration: float, seed: int, bin_dir: str, stop_on_first: bool,
               inject: str = "", trace: dict[str, Any] | None = None,
               checks: str = "all", stop_grace: float = 0.0,
               amplifier: Plan | None = None) -> AgentSpec:
    """The agent's spec for one target.  amplifier: the lab.amplifier.Plan chosen for
    this kernel (None: the scenario's patch knob only, as on a kernel we know nothing of)."""
    c, ld, x = s["checker"], s["load"], s["xdp"]
    topo = to_topology(s)
    queues = c["queues"]
    if s["topology"]["channels"]:
        queues = min(queues, s["topology"]["channels"])
    sender_inject = inject if inject in ("sequence", "checksum") else ""
    checker_inject = "" if sender_inject else inject
    w = WIRING[c["mode"]]
    sender = SenderOpts(ns=w.sender.ns, dev=w.sender.dev, dst_mac=w.target.mac, src_ip=w.sender.ip,
                        dst_ip=w.target.ip, senders=ld["senders"], burst=ld["burst"], gap_ns=ld["gap_ns"],
                        size=ld["size"], rate=ld["rate"], inject=sender_inject)
    if c["mode"] == "rxdrop":
        checker = CheckerOpts(ns=w.checker.ns, dev=w.checker.dev, mode="rxdrop", xdp=x["mode"], queues=queues,
                              frame_size=c["frame_size"], headroom=c["headroom"], frames=c["frames"],
                              shared_umem=c["shared_umem"], batch=c["batch"], busy_poll=c["busy_poll"],
                              checks=checks, inject=checker_inject, trace_marker=bool(trace),
                              sockets_per_queue=c["sockets_per_queue"], pick=c["pick"])
        iperf = None
    else:
        assert w.peer is not None and w.server is not None
        checker = CheckerOpts(ns=w.checker.ns, dev=w.checker.dev, peer_dev=w.peer.dev, mode="forward", xdp=x["mode"],
                              queues=queues, frame_size=c["frame_size"], headroom=c["headroom"],
                              frames=c["frames"], shared_umem=True, batch=c["batch"],
                              busy_poll=c["busy_poll"], checks=checks, inject=checker_inject,
                              trace_marker=bool(trace))
        iperf = IperfOpts(server_ns=w.server.ns, client_ns=w.sender.ns, server_ip=w.server.ip,
                          clients=ld["iperf3_clients"]) if ld["iperf3"] else None
    knobs = {}
    amp: dict[str, Any] = amplifier.to_dict() if amplifier is not None else {}
    if amplifier is None and s["amplifier"]["widen_rx_ns"]:
        knobs[PATCH_KNOB] = str(s["amplifier"]["widen_rx_ns"])
    elif amplifier is not None and amplifier.method == "patch":
        knobs[PATCH_KNOB] = str(amplifier.widen_rx_ns)
    return AgentSpec(topology=topo, checker=checker, sender=sender, iperf=iperf, duration=duration, knobs=knobs,
                     stop_on_first=stop_on_first, stop_grace=stop_grace, seed=seed, bin_dir=bin_dir,
                     trace=trace or {}, amplifier=amp)


@dataclass
class TargetResult:
    """What one agent run produced (one VM, or the local host)."""

    label: str
    kernel: str
    packets: int = 0
    load_seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    first_violation_s: float | None = None
    violations: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s since load, rx, violations)
    foreign: int = 0
    infra_error: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    senders: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    iperf: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)      # what the agent said about the set-up
    knobs: dict[str, bool] = field(default_factory=dict)  # kernel knob -> applied?
    amplifier: dict[str, Any] = field(default_factory=dict)  # what widened the window, and its hits
    load_started_host: float | None = None   # host monotonic clock when the load started (splat timing)
    last_heard_s: float = 0.0   # agent clock, since load start, of the last event (a crashed guest's exposure)
    pre_load_splats: list[str] = field(default_factory=list)  # kernel splats before load-start: shown, never counted
    onsets_by_kind: dict[str, int] = field(default_factory=dict)   # independent onsets (the checker's)
    # first_violation_s runs from the senders' ready line (their packets start then); this
    # one from the agent's load-start, sent before the senders are even started
    first_violation_from_load_start_s: float | None = None
    first_violation_origin: str = ""      # "senders ready" | "load start" (no sender line came)
    senders_ready_s: float | None = None  # since load start
    rx_points: list[tuple[float, int]] = field(default_factory=list)  # (s since load, checker rx)
    interrupted: bool = False             # Ctrl-C ended it: what it had so far, never a verdict

    @property
    def violation_count(self) -> int:
        return sum(self.by_kind.values())

    def onsets(self) -> dict[str, int]:
        """Independent onsets per kind.  A kind the checker gave no onset count for
        (kernel-splat: one crash is one splat) counts each violation as an onset."""
        return {k: min(n, self.onsets_by_kind[k]) if k in self.onsets_by_kind else n
                for k, n in self.by_kind.items() if n}

    def exposure_s(self) -> float:
        """Seconds during which packets flowed: the sum of the intervals between
        receive-count readings in which the count rose, up to the end of the load."""
        end = self.load_seconds if self.load_seconds > 0 else None
        total, prev_t, prev_rx = 0.0, 0.0, 0
        for t, rx in sorted(self.rx_points):
            t = min(t, end) if end is not None else t
            if rx > prev_rx:
                total += max(0.0, t - prev_t)
                prev_rx = rx
            prev_t = max(prev_t, t)
        return round(total, 3)

    def last_rise_s(self) -> float:
        """When the receive count last rose (s since load start), 0 if never."""
        last, prev_rx = 0.0, 0
        for t, rx in sorted(self.rx_points):
            if rx > prev_rx:
                last, prev_rx = t, rx
        return last

    def lost_reason(self) -> str | None:
        """Why this target is no evidence either way, or None.  A violation it saw is
        evidence whatever else went wrong; an interrupted target keeps its exposure."""
        if self.infra_error and not self.interrupted:
            return self.infra_error
        if self.interrupted or self.violation_count:
            return None
        if self.packets <= 0:
            return "no packets reached the checker"
        errors = int(self.senders.get("errors", 0) or 0)
        if errors:
            return (f"the senders reported {errors:,} send error(s) "
                    f"({self.senders.get('error', 'unknown error')}): the load did not run as asked")
        last = self.last_rise_s()
        if self.reason in ("duration", "stopped") and self.load_seconds > 0 and \
                self.load_seconds - last > max(STOPPED_EARLY_S, STOPPED_EARLY_SHARE * self.load_seconds):
            return (f"traffic stopped early: no packet after {last:.1f} s of a "
                    f"{self.load_seconds:.1f} s load")
        return None


EventSink = Callable[[str, dict[str, Any]], None]


class TextSink(Protocol):
    """Where events.jsonl lines go: a file, or a locked writer shared by a fleet's guests."""

    def write(self, s: str, /) -> object: ...


# --- the agent's events, as typed records ---------------------------------------------
# The agent (lab.agent) prints one JSON object per line; parse_event() reads one into the
# record of its type, so what each type carries is written down once, here.  The dict
# itself still goes on, unchanged, to events.jsonl and to on_event listeners.

@dataclass(frozen=True)
class LoadStart:
    at: float                       # agent clock (s), as every record's `at`


@dataclass(frozen=True)
class Violation:
    at: float
    kind: str
    rx: int                         # the checker's receive count at that moment
    onset: bool                     # it starts a new fault (others are its echo)
    raw: dict[str, Any]


@dataclass(frozen=True)
class Stats:
    """A periodic `stats` line, or the checker's final `done` line."""
    at: float
    rx: int
    foreign: int | None
    by_kind: dict[str, Any] | None          # every violation the checker counted, by kind
    onsets_by_kind: dict[str, Any] | None
    final: bool                             # the `done` line
    raw: dict[str, Any]


@dataclass(frozen=True)
class Sender:
    at: float
    ready: bool                     # the senders' ready line: their packets start now
    raw: dict[str, Any]


@dataclass(frozen=True)
class Note:
    at: float
    text: str
    knob: str                       # a kernel knob it set ("": none)
    applied: bool


@dataclass(frozen=True)
class Amplifier:
    at: float
    fields: dict[str, Any]          # what widened the window, and its hits


@dataclass(frozen=True)
class Evidence:
    at: float
    raw: dict[str, Any]


@dataclass(frozen=True)
class Iperf:
    at: float
    error: str                      # "": the TCP load ran as asked
    raw: dict[str, Any]


@dataclass(frozen=True)
class AgentError:
    at: float
    what: str
    stderr: tuple[str, ...]


@dataclass(frozen=True)
class AgentDone:
    at: float
    reason: str                     # duration, first-violation, stopped, error, interrupted, ...
    load_seconds: float
    error: str


@dataclass(frozen=True)
class OtherEvent:
    """A type run_target keeps nothing of (topology, phase, ...): listeners still see it."""
    at: float
    type: str


AgentEvent = (LoadStart | Violation | Stats | Sender | Note | Amplifier | Evidence | Iperf | AgentError
              | AgentDone | OtherEvent)


def parse_event(ev: dict[str, Any]) -> AgentEvent:
    """The typed record of one agent event (a JSON object with a `type`)."""
    typ, at = ev.get("type"), float(ev.get("at", 0.0))
    if typ == "load-start":
        return LoadStart(at)
    if typ == "violation":
        return Violation(at, str(ev.get("kind", "unknown")), int(ev.get("rx", 0) or 0),
                         bool(ev.get("onset", True)), ev)
    if typ in ("stats", "done"):
        by_kind, onsets = ev.get("by_kind"), ev.get("onsets_by_kind")
        return Stats(at, int(ev.get("rx", 0)), int(ev["foreign"]) if "foreign" in ev else None,
                     by_kind if isinstance(by_kind, dict) else None,
                     onsets if isinstance(onsets, dict) else None, typ == "done", ev)
    if typ == "sender":
        return Sender(at, ev.get("sender_type") == "ready", ev)
    if typ == "note":
        return Note(at, str(ev.get("text")), str(ev["knob"]) if ev.get("knob") else "", bool(ev.get("applied")))
    if typ == "amplifier":
        return Amplifier(at, {k: v for k, v in ev.items() if k not in ("type", "phase", "target", "at")})
    if typ == "evidence":
        return Evidence(at, ev)
    if typ == "iperf":
        return Iperf(at, str(ev.get("error") or ""), ev)
    if typ == "agent-error":
        return AgentError(at, str(ev.get("what")), tuple(ev.get("stderr") or ()))
    if typ == "agent-done":
        return AgentDone(at, str(ev.get("reason")), float(ev.get("load_seconds", 0.0)), str(ev.get("error")))
    return OtherEvent(at, str(typ))


@dataclass
class _Reduction:
    """run_target's state while the agent's events come in: apply() folds one into res."""

    res: TargetResult
    load_at: float | None = None    # agent clock of load-start
    ready_at: float | None = None   # agent clock of the senders' ready line
    done: bool = False              # an agent-done that is a result (not error, not interrupted)
    last_rx: int = 0                # the checker's highest receive count

    def apply(self, ev: AgentEvent) -> None:
        res, load_at = self.res, self.load_at
        if load_at is not None and ev.at >= load_at:
            res.last_heard_s = max(res.last_heard_s, round(ev.at - load_at, 3))
        match ev:
            case LoadStart():
                self.load_at = ev.at
                res.load_started_host = time.monotonic()
            case Violation():
                # the receive count then: packets seen, even when the guest dies before its next stats line
                self.last_rx = max(self.last_rx, ev.rx)
                res.by_kind[ev.kind] = res.by_kind.get(ev.kind, 0) + 1
                res.onsets_by_kind[ev.kind] = res.onsets_by_kind.get(ev.kind, 0) + (1 if ev.onset else 0)
                if load_at is not None:
                    res.rx_points.append((round(ev.at - load_at, 3), ev.rx))
                if res.first_violation_s is None and load_at is not None:
                    res.first_violation_from_load_start_s = round(max(0.0, ev.at - load_at), 6)
                    origin = self.ready_at if self.ready_at is not None else load_at
                    res.first_violation_s = round(max(0.0, ev.at - origin), 6)
                    res.first_violation_origin = "senders ready" if self.ready_at is not None else "load start"
                if len(res.violations) < MAX_KEPT_VIOLATIONS:
                    res.violations.append(ev.raw)
            case Stats():
                self.last_rx = max(self.last_rx, ev.rx)
                if ev.foreign is not None:
                    res.foreign = ev.foreign
                # the checker counts every violation; we may have seen only the first ones
                for k, n in (ev.by_kind or {}).items():
                    if int(n) > res.by_kind.get(k, 0):
                        res.by_kind[k] = int(n)
                for k, n in (ev.onsets_by_kind or {}).items():
                    if int(n) > res.onsets_by_kind.get(k, 0) or k not in res.onsets_by_kind:
                        res.onsets_by_kind[k] = int(n)
                if load_at is not None:
                    res.timeline.append((round(ev.at - load_at, 3), ev.rx, res.violation_count))
                    res.rx_points.append((round(ev.at - load_at, 3), ev.rx))
                if ev.final:
                    res.final = ev.raw
            case Sender():
                res.senders = ev.raw
                if ev.ready and self.ready_at is None:
                    self.ready_at = ev.at
                    if load_at is not None:
                        res.senders_ready_s = round(max(0.0, ev.at - load_at), 6)
            case Note():
                res.notes.append(ev.text)
                if ev.knob:
                    res.knobs[ev.knob] = ev.applied
            case Amplifier():
                res.amplifier.update(ev.fields)
            case Evidence():
                res.evidence = ev.raw
            case Iperf():
                res.iperf = ev.raw
                if ev.error:
                    res.notes.append(f"iperf3: {ev.error} (the TCP load did not run as asked)")
            case AgentError():
                res.infra_error = f"{ev.what}: {' | '.join(ev.stderr)[-500:]}"
            case AgentDone():
                self.done = ev.reason not in ("error", "interrupted")
                res.reason = ev.reason
                res.load_seconds = ev.load_seconds
                if ev.reason == "error":
                    res.infra_error = res.infra_error or ev.error
            case OtherEvent():
                pass


class _Watchdog:
    """Stops waiting on a stream whose host is gone (a guest that died mid-run)
    or has gone quiet: the agent prints stats every 0.5 s while it runs, so a
    stream silent for `silence` seconds comes from a guest that stopped
    answering (hung, paused, or its network gone), which libvirt still calls
    running and TCP keepalives behind QEMU's user-net never notice."""

    def __init__(self, alive: Callable[[], bool] | None, on_dead: Callable[[], None],
                 silence: float | None = None, *, deadline: float | None = None,
                 cancel: threading.Event | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.alive = alive
        self.silence = silence
        self.deadline = deadline   # monotonic: an agent still running then has overrun
        self.cancel = cancel       # set by Ctrl-C: ask the agent to stop, then wait a little
        self.on_cancel = on_cancel
        self.dead = False      # the host is gone
        self.silent = False    # the host is there but said nothing for `silence` seconds
        self.overran = False   # the agent ran past its deadline
        self.cancelled = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        if alive is not None or silence is not None or deadline is not None or cancel is not None:
            self._t = threading.Thread(target=self._run, args=(on_dead,), daemon=True)
            self._t.start()

    def heard(self) -> None:
        self._last = time.monotonic()

    def _run(self, on_dead: Callable[[], None]) -> None:
        period = 1.0 if self.silence is None else min(1.0, self.silence / 5)
        if self.deadline is not None:
            period = max(0.05, min(period, (self.deadline - time.monotonic()) / 5))
        if self.cancel is not None:
            period = min(period, 0.2)
        next_alive = 0.0
        grace_end: float | None = None
        while not self._stop.wait(period):
            now = time.monotonic()
            if self.cancel is not None and self.cancel.is_set():
                if not self.cancelled:
                    self.cancelled = True
                    grace_end = now + INTERRUPT_GRACE_S
                    if self.on_cancel is not None:
                        self.on_cancel()
                elif grace_end is not None and now >= grace_end:
                    on_dead()
                    return
                continue   # winding down: neither silence nor a dead host is news now
            if self.deadline is not None and now >= self.deadline:
                self.overran = True
                on_dead()
                return
            if self.alive is not None and now >= next_alive:
                next_alive = now + 1.0
                if not self.alive():
                    self.dead = True
                    on_dead()
                    return
            if self.silence is not None and now - self._last > self.silence:
                self.silent = True
                on_dead()
                return

    def close(self) -> None:
        self._stop.set()


def _give_up(proc: Process) -> None:
    """Stop reading proc: a guest that does not answer cannot be asked to kill
    anything, so an SSH process is abandoned (its channel closed, which wakes
    the reader); a local one is terminated."""
    abandon = getattr(proc, "abandon", None)
    if abandon is not None:
        abandon()
    else:
        proc.terminate()


def run_target(host: Host, spec: AgentSpec, *, label: str, kernel: str,
               on_event: EventSink | None = None, events_file: TextSink | None = None,
               alive: Callable[[], bool] | None = None, deadline_slack: float = 120.0,
               silence: float | None = None, cancel: threading.Event | None = None) -> TargetResult:
    """Run the agent on host; infrastructure loss is recorded in .infra_error.

    alive(): is the host still there (checked every second)?  silence: seconds
    without a line from the agent after which the host counts as lost.  An
    agent still running spec.duration + deadline_slack seconds after its start
    is stopped (infrastructure loss, never a verdict).  cancel (Ctrl-C): the
    agent is asked to stop and its last lines are read; the result is then
    .interrupted, with what it had counted so far."""
    res = TargetResult(label=label, kernel=kernel)
    env = {"PYTHONPATH": host.agent_path}
    argv = [*host.agent_python, "-m", "lab.agent", spec.to_json()]
    state = _Reduction(res)
    started = time.monotonic()
    try:
        with host.spawn(argv, env=env) as proc:
            dog = _Watchdog(alive, lambda: _give_up(proc), silence,
                            deadline=started + spec.duration + deadline_slack,
                            cancel=cancel, on_cancel=proc.terminate)
            try:
                for line in proc.lines():
                    dog.heard()
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if not isinstance(ev, dict) or ev.get("type") == "heartbeat":
                        continue   # a heartbeat only says the guest is alive (dog.heard above)
                    ev["target"] = label
                    if events_file is not None:
                        events_file.write(json.dumps(ev) + "\n")
                    state.apply(parse_event(ev))
                    if on_event is not None:
                        on_event(label, ev)
                dog.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    _give_up(proc)   # host.spawn() kills what is left when its block ends
            finally:
                dog.close()
            if dog.overran:
                res.infra_error = (f"agent overran its deadline ({spec.duration + deadline_slack:g} s "
                                   f"after its start) and was stopped")
            if dog.cancelled:
                res.interrupted = True
                res.infra_error = res.infra_error or "interrupted"
            if dog.silent and not state.done:
                raise LostVM(f"{label}: guest stopped answering (no output for {silence:g} s)",
                             hint="the guest hangs or is paused; see its console log")
            if dog.dead:
                raise LostVM(f"{label}: guest died or stopped answering during the run")
    except InfraError as e:
        res.infra_error = f"{type(e).__name__}: {e.message}"
    res.packets = state.last_rx
    if not state.done and res.infra_error is None:
        res.infra_error = "agent stream ended without a result (host lost?)"
    if res.first_violation_s is not None and res.first_violation_origin == "load start":
        res.notes.append("time to first violation measured from load start: no sender ready line "
                         "came before it (the guest may have died first, or no packet sender ran)")
    return res


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def fetch_evidence(host: Host, res: TargetResult, out: Path) -> None:
    """Bring the trace home and run the interleaving analysis on it (host side).  A trace the
    guest's scanner counted and found nothing in for the host (trace_needed false) is not moved:
    its Analysis is built from the scanner's summary and merged the same way.  On this
    machine (the netns backend) the agent's trace file is removed afterwards; a guest's
    goes with the guest."""
    from lab.host import LocalHost

    src = res.evidence.get("trace_path")
    try:
        _fetch_and_analyse(host, res, out)
    finally:
        if src and isinstance(host, LocalHost):
            Path(str(src)).unlink(missing_ok=True)


def _fetch_and_analyse(host: Host, res: TargetResult, out: Path) -> None:
    from lab import evidence

    ev = res.evidence
    if not ev.get("available") or not ev.get("trace_path"):
        return
    a = None
    ga = ev.get("guest_analysis")
    if ev.get("trace_needed") is False and isinstance(ga, dict):
        try:
            a = evidence.analysis_from_summary(ga)
        except (KeyError, TypeError, ValueError) as e:
            ev["guest_analysis_note"] = f"guest summary not usable ({type(e).__name__}: {e}): fetched"
    if a is not None:
        evidence.merge(ev, a)
        # the trace stays in the guest: no host file to point at
        ev["guest_trace_path"] = ev.pop("trace_path")
        ev["trace_file"] = None
        ev["analysed_in"] = "guest"
        ev["analysis_seconds"] = ga.get("seconds") if isinstance(ga, dict) else None
    else:
        dest = out / "evidence" / f"{res.label.replace('/', '_')}.trace"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            host.get(str(ev["trace_path"]), dest)
        except (OSError, InfraError) as e:
            ev["note"] = f"trace not fetched: {e}"
            ev["available"] = False
            return
        # the window count is evidence only from a complete trace (merge says why not)
        t = time.monotonic()
        evidence.merge(ev, evidence.analyze_file(dest))
        ev["trace_file"] = str(dest)
        ev["analysed_in"] = "host"
        ev["analysis_seconds"] = round(time.monotonic() - t, 3)
    # a splat is no checker violation: only the checker writes a marker
    checker_saw = any(n for k, n in res.by_kind.items() if k != "kernel-splat")
    res.notes.extend(f"flight recorder: {p}" for p in evidence.recorder_check(ev, checker_saw))
