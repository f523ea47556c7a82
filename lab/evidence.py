"""Kernel-side evidence: an ftrace flight recorder and the interleaving detector.

Tracer (runs in the agent, next to the kernel under test) puts kprobes on the
AF_XDP RX producer and on the flush path, with the `counter` trace clock (a
global atomic counter: monotonic across CPUs even under TCG, where `global`
gave false interleavings).  The checker writes its own events into the same
buffer through trace_marker and turns tracing off at the first violation, so
the buffer ends just after the corruption: a flight recorder.

analyze() runs on the orchestrator's side and flags the ordering described
by fa349e396e48: a receive into socket S on CPU Y while another CPU X holds
receives into S that it has not flushed yet.  The same condition catches the
generic-receive race, because the receive and the flush both sit inside
xsk_generic_rcv()'s locked region on a fixed kernel: two CPUs inside that
region for one socket at once show up as the same unflushed interleaving.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Probe candidates in order of preference; resolved against the running kernel.
# __xsk_rcv first: copy mode always passes through it, and its kretprobe closes
# the "inside the receive" interval used for the generic-receive race.
RECEIVE_CANDIDATES = ("__xsk_rcv", "__xsk_rcv_zc", "xskq_prod_reserve_desc")
FLUSH_CANDIDATES = ("xsk_flush", "__xsk_map_flush")
GROUP = "racelab"
TRACE_OUT = "/tmp/racelab-trace.txt"


def trace_options(scenario: str, stop_on_first: bool = True, buffer_kb: int = 2048) -> dict[str, Any]:
    return {"scenario": scenario, "stop_on_first": stop_on_first, "buffer_kb": buffer_kb}


def tracefs() -> Path | None:
    for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (p / "kprobe_events").exists():
            return p
    return None


def mount_tracefs() -> bool:
    """Mount tracefs where the kernel has it but nobody mounted it; True if we did."""
    p = Path("/sys/kernel/tracing")
    if not p.is_dir() or (p / "trace").exists():
        return False
    import subprocess
    return subprocess.run(["mount", "-t", "tracefs", "nodev", str(p)], capture_output=True).returncode == 0


def kernel_symbols(names: Iterable[str]) -> set[str]:
    """Which of names the running kernel can kprobe (text symbols in kallsyms)."""
    wanted = set(names)
    found: set[str] = set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tT" and parts[2] in wanted:
                    found.add(parts[2])
    except OSError:
        pass
    return found


class Tracer:
    """Context manager: kprobes + counter clock on; everything restored on exit."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.root = tracefs()
        self.probes: dict[str, str] = {}      # event name -> symbol
        self.missing: list[str] = []
        self.note = ""
        self._saved: dict[str, str] = {}
        self._mounted = False

    def _w(self, name: str, value: str, append: bool = False) -> None:
        assert self.root is not None
        # raw os.write: Python's "a" mode seeks, which tracefs files refuse (EINVAL)
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(self.root / name, flags)
        try:
            os.write(fd, (value + "\n").encode())
        finally:
            os.close(fd)

    def __enter__(self) -> Tracer:
        if self.root is None and mount_tracefs():
            self._mounted = True
            self.root = tracefs()
        if self.root is None:
            self.note = "no tracefs with kprobe_events (CONFIG_KPROBE_EVENTS, tracefs mounted?)"
            return self
        syms = kernel_symbols(RECEIVE_CANDIDATES + FLUSH_CANDIDATES)
        rcv = next((s for s in RECEIVE_CANDIDATES if s in syms), None)
        flush = next((s for s in FLUSH_CANDIDATES if s in syms), None)
        for role, sym, cands in (("rcv", rcv, RECEIVE_CANDIDATES), ("flush", flush, FLUSH_CANDIDATES)):
            if sym is None:
                self.missing.append(f"{role}: none of {', '.join(cands)} is probeable in this kernel")
        if rcv is None or flush is None:
            self.note = "; ".join(self.missing)
            self.root = None if rcv is None and flush is None else self.root
        try:
            self._saved["trace_clock"] = _current_clock((self.root / "trace_clock").read_text()) if self.root else ""
            self._w("tracing_on", "0")
            self._w("trace", "")
            self._w("buffer_size_kb", str(self.opts.get("buffer_kb", 2048)))
            self._w("trace_clock", "counter")
            # __xsk_map_flush flushes every socket of its CPU's list: "flushall", no socket
            if flush == "__xsk_map_flush":
                roles = [("rcv", rcv, " xs=%di:x64", "p"), ("flushall", flush, "", "p")]
            else:
                roles = [("rcv", rcv, " xs=%di:x64", "p"), ("flush", flush, " xs=%di:x64", "p")]
            roles.append(("rcvret", rcv, "", "r"))
            for role, sym, fetch, kind in roles:
                if sym is None:
                    continue
                # first argument (the xdp_sock) is in %di on x86_64
                self._w("kprobe_events", f"{kind}:{GROUP}/{role} {sym}{fetch}", append=True)
                self._w(f"events/{GROUP}/{role}/enable", "1")
                self.probes[role] = sym
            self._w("tracing_on", "1")
        except OSError as e:
            self.note = f"tracing set-up failed: {e}"
            self._cleanup()
            self.root = None
        return self

    def _cleanup(self) -> None:
        if self.root is None:
            return
        for name, value in (("tracing_on", "0"),):
            try:
                self._w(name, value)
            except OSError:
                pass
        for role in list(self.probes) or ["rcv", "rcvret", "flush", "flushall"]:
            try:
                self._w(f"events/{GROUP}/{role}/enable", "0")
            except OSError:
                pass
            try:
                self._w("kprobe_events", f"-:{GROUP}/{role}", append=True)
            except OSError:
                pass
        if self._saved.get("trace_clock"):
            try:
                self._w("trace_clock", self._saved["trace_clock"])
            except OSError:
                pass
        if self._mounted:
            import subprocess
            subprocess.run(["umount", "/sys/kernel/tracing"], capture_output=True)

    def collect(self) -> dict[str, Any]:
        """Stop tracing, save the buffer to a file, and describe it."""
        if self.root is None or not self.probes:
            return {"available": False, "note": self.note or "tracing unavailable", "missing": self.missing}
        self._w("tracing_on", "0")
        t = time.monotonic()
        with open(self.root / "trace") as src, open(TRACE_OUT, "w") as dst:
            for line in src:
                dst.write(line)
        return {"available": True, "trace_path": TRACE_OUT, "probes": self.probes,
                "measure": window_measure(str(self.opts.get("scenario", ""))),
                "missing": self.missing, "note": self.note, "cpus": os.cpu_count(),
                "save_seconds": round(time.monotonic() - t, 3)}

    def __exit__(self, *exc: object) -> None:
        self._cleanup()


def _current_clock(text: str) -> str:
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


# "  <idle>-0  [001] ..s1.  123456: rcv: (__xsk_rcv_zc+0x0/0x1d0) xs=0xffff888004a1c000"
_EVENT = re.compile(r"\[(\d+)\]\s+\S+\s+(\d+):\s+(rcvret|rcv|flushall|flush):(?:.*?xs=(0x[0-9a-fA-F]+|\d+))?")
_HEADER = re.compile(r"entries-in-buffer/entries-written:\s*(\d+)/(\d+)")
_MARK = re.compile(r"\[(\d+)\]\s+\S+\s+(\d+):\s+tracing_mark_write:\s*(.*)$")


@dataclass
class Analysis:
    receives: int = 0
    flushes: int = 0
    window_hits: int = 0                 # receives that interleaved with another CPU's unflushed ones
    overlap_hits: int = 0                # receives that began while another CPU was inside one for S
    sockets: int = 0
    cpus: set[int] = field(default_factory=set)
    examples: list[dict[str, Any]] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    first_hit_ts: int | None = None
    skipped: int = 0                     # events before every CPU's buffer has data
    lost: int = 0                        # events the ring buffers overwrote

    def to_dict(self) -> dict[str, Any]:
        return {"receives": self.receives, "flushes": self.flushes, "window_hits": self.window_hits,
                "unflushed_hits": self.window_hits, "overlap_hits": self.overlap_hits,
                "sockets": self.sockets, "cpus": sorted(self.cpus), "examples": self.examples[:20],
                "marks": self.marks[:50], "first_hit_ts": self.first_hit_ts, "skipped": self.skipped,
                "lost": self.lost}


def analyze(lines: Iterable[str], max_examples: int = 20) -> Analysis:
    """Count receives into S on CPU Y while CPU X != Y holds unflushed receives into S."""
    a = Analysis()
    pending: dict[str, dict[int, int]] = {}   # socket -> cpu -> receives since its last flush
    inside: dict[int, str] = {}               # cpu -> socket it is receiving into right now
    events = []
    for line in lines:
        if line.startswith("#"):
            h = _HEADER.search(line)
            if h and int(h.group(1)) < int(h.group(2)):
                a.lost = int(h.group(2)) - int(h.group(1))
            continue
        m = _EVENT.search(line)
        if m:
            events.append((int(m.group(2)), int(m.group(1)), m.group(3), m.group(4)))
            continue
        mk = _MARK.search(line)
        if mk:
            a.marks.append(mk.group(3).strip())
    # per-CPU buffers are printed merged by timestamp already; sort to be safe (counter clock)
    events.sort(key=lambda e: e[0])
    # The ring buffers overwrite per CPU: a busy CPU loses its oldest events
    # first, and a flush lost that way would look like an interleaving.  Only
    # the span every traced CPU still covers is analysed.
    first: dict[int, int] = {}
    for ts, cpu, _, _ in events:
        first.setdefault(cpu, ts)
    start = max(first.values(), default=0) if a.lost else 0
    a.skipped = sum(1 for e in events if e[0] < start)
    for ts, cpu, kind, xs in events:
        if ts < start:
            continue
        a.cpus.add(cpu)
        if kind == "rcvret":
            inside.pop(cpu, None)
            continue
        if kind == "flushall":
            a.flushes += 1
            for per in pending.values():
                per[cpu] = 0
            continue
        if xs is None:
            continue
        per = pending.setdefault(xs, {})
        if kind == "flush":
            a.flushes += 1
            per[cpu] = 0
            continue
        a.receives += 1
        if any(c != cpu and x == xs for c, x in inside.items()):
            a.overlap_hits += 1
        inside[cpu] = xs
        others = {c: n for c, n in per.items() if c != cpu and n > 0}
        if others:
            a.window_hits += 1
            if a.first_hit_ts is None:
                a.first_hit_ts = ts
            if len(a.examples) < max_examples:
                a.examples.append({"ts": ts, "cpu": cpu, "socket": xs, "unflushed_on": others})
        per[cpu] = per.get(cpu, 0) + 1
    a.sockets = len(pending)
    return a


def analyze_file(path: Path) -> Analysis:
    with open(path, errors="replace") as f:
        return analyze(f)


def window_measure(scenario: str) -> str:
    """Which interleaving is the race's window: overlap (generic-rx) or unflushed (veth)."""
    return "overlap_hits" if scenario.startswith("generic") else "unflushed_hits"
