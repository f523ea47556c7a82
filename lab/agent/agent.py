"""The agent: runs one scenario where the kernel under test is.

The orchestrator starts `python -m lab.agent` through a Host (locally for the
netns backend, over SSH inside a guest) and writes an AgentSpec as one JSON
line to its stdin.  The agent builds the topology, starts the checker and the
load, and streams JSON events on stdout:

  {"type":"topology", ...}            namespaces are up
  {"type":"ready", ...}               the checker's sockets are bound (from xskcheck)
  {"type":"load-start","t":...,"pid":...}  senders / iperf3 started (t: agent clock);
                                      SIGUSR1 to pid ends the load early (reason "stopped")
  {"type":"violation", ...}           from xskcheck, as it happens
  {"type":"stats", ...}               from xskcheck, periodically
  {"type":"sender", ...}              sender progress
  {"type":"evidence", ...}            kernel-side evidence (trace), at the end
  {"type":"iperf", ...}               iperf3's report (bits/s, bytes, retransmits, error)
  {"type":"agent-error", ...}         the checker or a load generator failed (stderr tail)
  {"type":"done", ...}                final checker counters
  {"type":"agent-done","load_seconds":...,"reason":...}
  {"type":"heartbeat"}                every few seconds, so a silent guest means a hung one

Everything it starts runs with PR_SET_PDEATHSIG and inside namespaces held by
keeper processes, so killing the agent in any way removes all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.agent import dataplane
from lab.agent.jsonable import from_jsonable, to_jsonable
from lab.agent.topology import Topology, TopologySpec, build

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CheckerOpts:
    ns: str
    dev: str
    peer_dev: str = ""
    mode: str = "rxdrop"
    xdp: str = "generic"
    queues: int = 1
    frame_size: int = 2048
    headroom: int = 0
    frames: int = 256
    shared_umem: bool = False
    batch: int = 64
    busy_poll: bool = False
    checks: str = "all"
    inject: str = ""
    trace_marker: bool = False
    stats_ms: int = 500
    sockets_per_queue: int = 1      # > 1: sockets sharing each queue's pool (XDP_SHARED_UMEM, same queue)
    pick: str = "cpu"               # how the XDP program picks among them: cpu or rr


@dataclass(frozen=True)
class SenderOpts:
    ns: str
    dev: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    senders: int = 2
    burst: int = 32
    gap_ns: int = 0
    size: int = 64
    rate: int = 0
    inject: str = ""


@dataclass(frozen=True)
class IperfOpts:
    server_ns: str
    client_ns: str
    server_ip: str
    streams: int = 1
    clients: int = 1      # iperf3 clients, client i pinned to CPU i (3.12 runs all -P streams in one thread)


@dataclass(frozen=True)
class AgentSpec:
    topology: TopologySpec
    checker: CheckerOpts
    sender: SenderOpts | None
    iperf: IperfOpts | None
    duration: float
    stop_on_first: bool = False
    stop_grace: float = 0.0      # with stop_on_first: keep the load on this long after the first violation
                                 # (< 0: hold it until the orchestrator says stop, SIGUSR1, or the duration)
    seed: int = 0
    bin_dir: str = ""
    trace: dict[str, Any] = field(default_factory=dict)   # evidence options (lab.evidence)
    knobs: dict[str, str] = field(default_factory=dict)   # /sys path -> value, set for the run
    amplifier: dict[str, Any] = field(default_factory=dict)   # lab.amplifier.Plan.to_dict()

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self))

    @classmethod
    def from_json(cls, text: str) -> AgentSpec:
        spec: AgentSpec = from_jsonable(cls, json.loads(text))
        return spec


def checker_argv(bin_dir: str, c: CheckerOpts, duration: float, seed: int,
                 stop_on_first: bool) -> list[str]:
    """xskcheck's argv through the one validated builder (lab.agent.dataplane)."""
    return dataplane.checker_argv(
        bin_dir, dev=c.dev, mode=c.mode, xdp=c.xdp, peer_dev=c.peer_dev or None, queues=c.queues,
        frame_size=c.frame_size, headroom=c.headroom, frames=c.frames, shared_umem=c.shared_umem,
        batch=c.batch,
        duration=duration, stats_ms=c.stats_ms, checks=c.checks, inject=c.inject or None,
        stop_on_first=stop_on_first, trace_marker=c.trace_marker, seed=seed,
        busy_poll=c.busy_poll, sockets_per_queue=c.sockets_per_queue, pick=c.pick)


def sender_argv(bin_dir: str, s: SenderOpts, duration: float, seed: int) -> list[str]:
    """xsksend's argv, one sender per CPU (wrapping), through lab.agent.dataplane."""
    ncpu = os.cpu_count() or 1
    return dataplane.sender_argv(
        bin_dir, dev=s.dev, dst_mac=s.dst_mac, src_ip=s.src_ip, dst_ip=s.dst_ip, senders=s.senders,
        cpus=[i % ncpu for i in range(s.senders)], burst=s.burst, gap_ns=s.gap_ns, size=s.size,
        duration=duration, rate=s.rate, seed=seed, inject=s.inject or None)


@contextlib.contextmanager
def _knob(path: str, value: str) -> Iterator[None]:
    """Set a kernel knob for the run and put the old value back."""
    p = Path(path)
    if not p.exists():
        # Not fatal: the scenario still runs, unamplified, and says so in its results.
        emit({"type": "note", "knob": path, "applied": False,
              "text": f"{path} does not exist in this kernel: running WITHOUT the amplifier "
                      f"(it needs a kernel built with widen-rx.patch, e.g. NAME+widen-rx)"})
        yield
        return
    old = p.read_text().strip()
    p.write_text(value + "\n")
    emit({"type": "note", "knob": path, "applied": True, "text": f"{path} = {value} (was {old})"})
    try:
        yield
    finally:
        try:
            p.write_text(old + "\n")
        except OSError:
            pass


@contextlib.contextmanager
def _amplifier(bin_dir: str, plan: dict[str, Any]) -> Iterator[None]:
    """xskamp for the run: kprobes (with a BPF busy-wait for kprobe-delay) at the
    race window, placed before the checker starts and removed after the load.
    A probe the kernel refuses stops the run: it must never go on silently
    unamplified (the veth race then looks like a fixed kernel)."""
    out: queue.Queue[tuple[str, str | None]] = queue.Queue()
    amp = Child("amplifier", dataplane.amplifier_argv(
        bin_dir, probes=list(plan["probes"]),
        delay_ns=int(plan.get("delay_ns", 0)) if plan["method"] == "kprobe-delay" else 0,
        gate=str(plan.get("gate") or "") if plan["method"] == "kprobe-delay" else "",
        holds=list(plan.get("holds") or ()) if plan["method"] == "kprobe-delay" else [],
        hold_ns=int(plan.get("hold_ns", 0) or 0) if plan["method"] == "kprobe-delay" else 0), out)
    try:
        ready = _wait_line(amp, out, "ready", 30.0)
        if ready is None:
            raise Stop(f"amplifier ({plan['method']} at {', '.join(plan['probes'])}) did not start: "
                       f"{' | '.join(amp.stderr[-5:]) or 'no output'}")
        emit({"type": "amplifier", "phase": "ready", "method": plan["method"],
              **{k: v for k, v in ready.items() if k != "type"}})
        yield
    finally:
        amp.stop()
        done = None
        while True:
            try:
                _, line = out.get(timeout=0.2)
            except queue.Empty:
                break
            ev = _parse(line, amp.name) if line is not None else None
            if ev is not None and ev.get("type") == "done":
                done = ev
        if done is not None:
            emit({"type": "amplifier", "phase": "done", "method": plan["method"],
                  **{k: v for k, v in done.items() if k != "type"}})
        elif amp.proc.returncode not in (0, -signal.SIGTERM):
            emit({"type": "note", "text": f"amplifier exited {amp.proc.returncode} without its final "
                                          f"counts: {' | '.join(amp.stderr[-3:])}"})


def _wait_line(child: Child, out: queue.Queue[tuple[str, str | None]], typ: str, timeout: float,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """The first JSON line of type typ from child (every line before it, and it, go to
    on_event), or None if the child ended or the timeout passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, line = out.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            child.proc.wait(5)
            return None
        ev = _parse(line, child.name)
        if ev is None:
            continue
        if on_event is not None:
            on_event(ev)
        if ev.get("type") == typ:
            return ev
    return None


IPERF_PORT = 5201


def _start_iperf(ip: IperfOpts, topo: Topology, duration: float, stack: ExitStack
                 ) -> list[tuple[Child, queue.Queue[tuple[str, str | None]]]]:
    """iperf3 servers and clients; with clients > 1, client i is pinned to CPU i (wrapping)
    so TCP enters the queue from several CPUs at once, as in the veth race's report."""
    ncpu = os.cpu_count() or 1
    pinned = ip.clients > 1
    for i in range(ip.clients):
        srv = Child(f"iperf3-server-{i}", topo.nsenter(ip.server_ns, [
            "iperf3", "-s", "-1", "-J", "-p", str(IPERF_PORT + i)]), queue.Queue())
        stack.callback(srv.stop)
    time.sleep(0.5)
    clis = []
    for i in range(ip.clients):
        out: queue.Queue[tuple[str, str | None]] = queue.Queue()
        argv = ["iperf3", "-c", ip.server_ip, "-p", str(IPERF_PORT + i), "-t", str(max(1, int(duration))),
                "-P", str(ip.streams), "-J"]
        if pinned:
            argv = ["taskset", "-c", str(i % ncpu), *argv]
        cli = Child("iperf3" if not pinned else f"iperf3-{i}", topo.nsenter(ip.client_ns, argv), out)
        stack.callback(cli.stop)
        clis.append((cli, out))
    return clis


def _iperf_sum(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One "iperf" event for all clients: throughput and bytes summed, any error kept."""
    if len(reports) == 1:
        return reports[0]
    ev: dict[str, Any] = {"type": "iperf", "clients": len(reports),
                          "returncode": max((r.get("returncode") or 0) for r in reports)}
    for k in ("bits_per_second", "bytes", "retransmits", "seconds"):
        vals = [r[k] for r in reports if isinstance(r.get(k), (int, float))]
        if vals:
            ev[k] = max(vals) if k == "seconds" else sum(vals)
    errors = [f"client {i}: {r['error']}" for i, r in enumerate(reports) if r.get("error")]
    if errors:
        ev["error"] = "; ".join(errors)
    ev["per_client_bits_per_second"] = [r.get("bits_per_second", 0.0) for r in reports]
    return ev


def _iperf_result(cli: Child, out: queue.Queue[tuple[str, str | None]], *, early: bool
                  ) -> dict[str, Any]:
    """iperf3 -J's report, once it has ended by itself (-t), as one "iperf" event."""
    try:
        cli.proc.wait(10 if not early else 0.1)
    except subprocess.TimeoutExpired:
        pass
    cli.stop()
    lines: list[str] = []
    while True:
        try:
            _, line = out.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            lines.append(line)
    ev: dict[str, Any] = {"type": "iperf", "returncode": cli.proc.returncode}
    try:
        rep = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        rep = None
    if not isinstance(rep, dict):
        ev["error"] = ("stopped before its report (the run ended early)" if early else
                       f"no report from iperf3: {' | '.join(cli.stderr[-5:]) or 'empty output'}")
        return ev
    if rep.get("error"):
        ev["error"] = str(rep["error"])
    end = rep.get("end") or {}
    sent, recv = end.get("sum_sent") or {}, end.get("sum_received") or {}
    ev.update(bits_per_second=recv.get("bits_per_second", 0.0), bytes=recv.get("bytes", 0),
              retransmits=sent.get("retransmits"), seconds=recv.get("seconds", 0.0))
    if not early and not ev.get("error") and not ev["bytes"]:
        ev["error"] = "iperf3 moved no data"
    return ev


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A process inside a namespace whose stdout lines go to a shared queue."""

    def __init__(self, name: str, argv: Sequence[str], out: queue.Queue[tuple[str, str | None]]):
        self.name = name
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, preexec_fn=_die_with_parent)
        self.stderr: list[str] = []
        self._t_out = threading.Thread(target=self._pump, args=(out,), daemon=True)
        self._t_err = threading.Thread(target=self._pump_err, daemon=True)
        self._t_out.start()
        self._t_err.start()

    def _pump(self, out: queue.Queue[tuple[str, str | None]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            out.put((self.name, line.rstrip("\n")))
        out.put((self.name, None))

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            del self.stderr[:-50]

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._t_out.join(2)
        self._t_err.join(2)


_T0 = time.monotonic()
_EMIT = threading.Lock()
HEARTBEAT_S = 5.0


def emit(obj: dict[str, Any]) -> None:
    """One event line; "at" is the agent's clock, shared by all sources."""
    obj.setdefault("at", round(time.monotonic() - _T0, 6))
    line = json.dumps(obj) + "\n"
    with _EMIT:
        sys.stdout.write(line)
        sys.stdout.flush()


def _heartbeat(stop: threading.Event) -> None:
    """A line every few seconds, also while the topology is built or the checker attaches:
    the orchestrator takes a silent guest for a hung one (vm.silence)."""
    while not stop.wait(HEARTBEAT_S):
        emit({"type": "heartbeat"})


class Stop(Exception):
    pass


def run_agent(spec: AgentSpec) -> int:
    from lab.agent import tracer as evidence

    t0 = time.monotonic()
    bin_dir = spec.bin_dir
    events: queue.Queue[tuple[str, str | None]] = queue.Queue()
    reason = "duration"
    load_start: float | None = None
    final: dict[str, Any] | None = None
    with ExitStack() as stack:
        beat = threading.Event()
        threading.Thread(target=_heartbeat, args=(beat,), daemon=True).start()
        stack.callback(beat.set)
        topo: Topology = stack.enter_context(build(spec.topology))
        emit({"type": "topology", "t": time.monotonic() - t0, "netns": list(topo.keepers),
              "channels": topo.channels, "cpus": os.cpu_count()})
        for path, value in spec.knobs.items():
            stack.enter_context(_knob(path, value))
        if spec.amplifier.get("method") in ("kprobe", "kprobe-delay"):
            stack.enter_context(_amplifier(bin_dir, spec.amplifier))
        tracer = None
        if spec.trace:
            tracer = stack.enter_context(evidence.Tracer(spec.trace))
        c = spec.checker
        active = min(topo.channels.get(f"{c.ns}/{d}", c.queues) for d in filter(None, (c.dev, c.peer_dev)))
        if active < c.queues:
            emit({"type": "note", "text": f"{c.dev}: {c.queues} sockets asked, {active} queue(s) usable "
                                          f"(the device has fewer active channels)"})
            c = dataclasses.replace(c, queues=active)
        # the checker ends by itself a little after the load, if nobody stops it
        # the checker itself stops at the first violation only when no grace period follows it
        checker = Child("checker", topo.nsenter(c.ns, checker_argv(
            bin_dir, c, spec.duration + 30, spec.seed,
            spec.stop_on_first and spec.stop_grace == 0)), events)
        stack.callback(checker.stop)
        _wait_ready(checker, events, t0)
        for note in topo.apply_late():
            emit({"type": "note", "text": note})
        children: list[Child] = []
        iperf_clis: list[tuple[Child, queue.Queue[tuple[str, str | None]]]] = []
        # load-start goes out before the first packet: a kernel that oopses on the
        # first frames may take the guest down before a later event could leave it
        load_start = time.monotonic()
        # pid: the orchestrator may end the load early with SIGUSR1 (see _request_stop)
        emit({"type": "load-start", "t": load_start - t0, "pid": os.getpid()})
        if spec.sender and spec.sender.senders > 0:
            s = spec.sender
            sender = Child("sender", topo.nsenter(s.ns, sender_argv(
                bin_dir, s, spec.duration + 30, spec.seed)), events)
            stack.callback(sender.stop)
            children.append(sender)
        if spec.iperf:
            iperf_clis = _start_iperf(spec.iperf, topo, spec.duration, stack)
        deadline = load_start + spec.duration
        checker_open = True
        while checker_open:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            if _STOP.is_set() and reason in ("duration", "first-violation"):
                # the orchestrator has seen enough: end the load as if its duration (or the
                # grace after the first violation) had elapsed
                reason = "stopped" if reason == "duration" else reason
                break
            try:
                src, line = events.get(timeout=min(timeout, 0.2))
            except queue.Empty:
                continue
            if line is None:
                if src == "checker":
                    checker_open = False
                    reason = "checker-exit"
                continue
            ev = _parse(line, src)
            if ev is None:
                continue
            emit(ev)
            if ev.get("type") == "violation" and spec.stop_on_first and reason != "first-violation":
                reason = "first-violation"
                if spec.stop_grace >= 0:
                    deadline = min(deadline, time.monotonic() + spec.stop_grace)
                if spec.stop_grace == 0:
                    break
        load_seconds = time.monotonic() - load_start
        for ch in children:
            if ch.proc.poll() is not None and ch.proc.returncode != 0:
                # a load generator that died is a workload that did not run: never a clean verdict
                emit({"type": "agent-error", "what": ch.name, "returncode": ch.proc.returncode,
                      "stderr": ch.stderr[-20:]})
            ch.stop()
        if iperf_clis:
            emit(_iperf_sum([_iperf_result(cli, out, early=reason != "duration")
                             for cli, out in iperf_clis]))
        checker.stop()
        # drain what the checker printed while stopping (its final "done")
        while True:
            try:
                src, line = events.get(timeout=0.5)
            except queue.Empty:
                break
            if line is None:
                continue
            ev = _parse(line, src)
            if ev is None:
                continue
            if ev.get("type") == "done" and src == "checker":
                final = ev
            emit(ev)
        if checker.proc.returncode not in (0, -signal.SIGTERM) and final is None:
            emit({"type": "agent-error", "what": "checker",
                  "returncode": checker.proc.returncode, "stderr": checker.stderr[-20:]})
        if tracer is not None:
            # with the data plane's trace scanner, a trace the host need not see stays here
            scanner = Path(bin_dir) / evidence.SCANNER if bin_dir else None
            emit({"type": "evidence", **tracer.collect(scanner=scanner)})
        emit({"type": "agent-done", "t": time.monotonic() - t0, "load_seconds": load_seconds,
              "reason": reason, "checker_returncode": checker.proc.returncode,
              "checker_stderr": checker.stderr[-10:]})
    return 0


def _wait_ready(checker: Child, events: queue.Queue[tuple[str, str | None]], t0: float,
                timeout: float = 60.0) -> None:
    if _wait_line(checker, events, "ready", timeout, on_event=emit) is not None:
        return
    if checker.proc.poll() is None:
        raise Stop(f"checker not ready within {timeout:g} s")
    emit({"type": "agent-error", "what": "checker-start", "returncode": checker.proc.returncode,
          "stderr": checker.stderr[-20:]})
    raise Stop(f"checker exited before ready: {' | '.join(checker.stderr[-5:])}")


def _parse(line: str, src: str) -> dict[str, Any] | None:
    """One JSON event from the checker or a sender (a sender's own type moves to sender_type)."""
    try:
        ev = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(ev, dict):
        return None
    return {**ev, "type": "sender", "sender_type": ev.get("type")} if src == "sender" else ev


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Set by SIGUSR1: end the load now, gracefully (the counts are a normal result, never an
# interruption).  A flag polled by the load loop, since a handler must not take the queue's lock.
_STOP = threading.Event()


def _request_stop(signum: int, frame: object) -> None:
    _STOP.set()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    # the spec: a JSON argument, a file, or one line on stdin
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    if arg is None:
        text = sys.stdin.readline()
    elif arg.lstrip().startswith("{"):
        text = arg
    else:
        text = Path(arg).read_text()
    spec = AgentSpec.from_json(text)
    # SIGTERM/SIGINT/SIGHUP unwind the ExitStack: topology and children go away
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    signal.signal(signal.SIGUSR1, _request_stop)
    try:
        return run_agent(spec)
    except Stop as e:
        emit({"type": "agent-done", "reason": "error", "error": str(e)})
        return 3
    except KeyboardInterrupt:
        emit({"type": "agent-done", "reason": "interrupted"})
        return 130
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator, which decides
        emit({"type": "agent-done", "reason": "error", "error": f"{type(e).__name__}: {e}"})
        return 3


if __name__ == "__main__":
    sys.exit(main())
