"""Kernel-side evidence on the host: the interleaving detector, over a saved trace.

The trace is written in the guest by lab.agent.tracer (the Tracer, kprobes
on the AF_XDP receive and flush paths, a streamed flight recorder); a raw one
is decoded into events by lab.rawtrace, a text one here; this module analyses them.

analyze() runs on the orchestrator's side and flags the ordering described
by fa349e396e48: a receive into socket S on CPU Y while another CPU X holds
receives into S that it has not flushed yet ("unflushed").  Only receives
that *succeeded* count, on both sides: a receive that fails (no FILL entry:
-ENOMEM, RX ring full: -ENOBUFS) reserves no RX slot and does not put the
socket on the CPU's flush list, and veth_poll() skips xdp_do_flush() when
none of its receives was redirected.  Counting failed receives as unflushed
made a fixed kernel look as racy as a reverted one (every poll that only
dropped left the CPU "holding" until its next successful poll).
For the generic-receive race, "overlap" counts receives that begin while
another CPU is inside a receive into the same socket; receives made by
xsk_generic_rcv() are flushed by it before it returns (under the pool lock on
a fixed kernel), so they never stay unflushed.

In a guest, collect() also runs csrc/xsktrace (the same counts in C, one pass
over the file) on the streamed trace.  A trace with nothing the host must see
(no violation marker or other checker mark, no window hit, no lost or dropped
events, its tail record written) then stays in the guest: its evidence event
carries the scanner's summary (guest_analysis, trace_needed false) and the host
builds the Analysis from it (analysis_from_summary).  Anything else, or a
scanner that is missing or fails (said in guest_analysis_note), is fetched and
analysed here as before.

`python -m lab.evidence analyze FILE` (`racelab dev evidence`) prints the
analysis as JSON; `python -m lab.evidence dump FILE [--around TS] [--count N]`
prints a raw trace as text (the flight recorder's last events before a
violation); `trim` keeps the pages of a raw trace around two counter values.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.agent.tracer import (_TEXT_CLOCK, _TEXT_PROFILE, CLOCK_MARK, INTERLEAVING_AFTER, INTERLEAVING_BEFORE,
                              RECORDER_MIN_S, SELF_FLUSHING_CALLERS, VIOLATION_MARK)
from lab.rawtrace import _open_text, is_raw, raw_events, read_raw, trim


def trace_options(scenario: str, stop_on_first: bool = True, buffer_kb: int = 4096,
                  stream: bool = True, max_mb: int = 0, window: str = "",
                  recorder_s: float = RECORDER_MIN_S) -> dict[str, Any]:
    """Tracer options.  buffer_kb: ring buffer per CPU (the reader's slack, and
    the flight recorder's depth once the stream is capped); max_mb: cap of the
    streamed file (0: a quarter of the guest's memory, at most 512 MB); window:
    the measure that is this race's window (default: the scenario's evidence.window);
    recorder_s: seconds the recorder must cover on every CPU before the first
    violation (the ring buffers grow to that at the measured event rate when the
    stream is capped; a shorter recorder is named in the results)."""
    return {"scenario": scenario, "stop_on_first": stop_on_first, "buffer_kb": buffer_kb,
            "stream": stream, "max_mb": max_mb, "window": window_measure(scenario, window),
            "recorder_s": recorder_s}


# --- analysis ------------------------------------------------------------------
#
# Events are tuples (ts, cpu, kind, a, b):
#   rcv      a = socket (int)            receive entry
#   rcvret   a = ret (int|None), b = caller name (str|None)
#   flush    a = socket                  flush of one socket
#   flushall                             flush of every socket on the CPU's list
#   mark     a = text                    trace_marker (checker events, clock marks)
#   lost     a = count (-1: unknown)     the CPU lost events before ts
# anything else (extra probes) is ignored by the analysis and shown by dump.

# "  <idle>-0  [001] ..s1.  123456: rcv: (__xsk_rcv+0x0/0x1d0) xs=0xffff888004a1c000"
# Clocks counted in nanoseconds (local, global, mono, ...) print "SECONDS.MICROS:";
# counter, uptime and x86-tsc print a plain integer.
_LINE = re.compile(r"\[(\d+)\]\s+\S+\s+(\d+)(?:\.(\d+))?:\s+([\w.]+):\s?(.*)$")
_HEADER = re.compile(r"entries-in-buffer/entries-written:\s*(\d+)/(\d+)")
_LOST = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]")
_XS = re.compile(r"xs=(0x[0-9a-fA-F]+|\d+)")
_RET = re.compile(r"\bret=(-?\d+)")
_CALLER = re.compile(r"\((\w[\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+ <- ")


def _int(s: str) -> int:
    return int(s, 16) if s.startswith(("0x", "0X")) else int(s)


@dataclass
class Analysis:
    receives: int = 0
    failed: int = 0                      # receives that returned an error (no FILL entry, RX ring full)
    flushes: int = 0
    window_hits: int = 0                 # successful receives that interleaved with another CPU's unflushed ones
    overlap_hits: int = 0                # receives that began while another CPU was inside one for S
    sockets: int = 0
    cpus: set[int] = field(default_factory=set)
    examples: list[dict[str, Any]] = field(default_factory=list)
    overlap_examples: list[dict[str, Any]] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    first_hit_ts: int | None = None
    first_overlap_ts: int | None = None
    first_hit_s: float | None = None     # seconds from the first receive to the first unflushed hit
    first_overlap_s: float | None = None
    span_s: float | None = None          # seconds from the first receive to the last event
    first_ts: int | None = None
    last_ts: int | None = None
    skipped: int = 0                     # events before every CPU's buffer has data (text traces)
    lost: int = 0                        # events the ring buffers overwrote before they were saved
    gaps: int = 0                        # places where a CPU lost events
    retracted: int = 0                   # hits withdrawn because a CPU they relied on lost events
    outcomes: bool = False               # receive results were traced (return probe)
    kprobe_missed: int = 0
    dropped: int = 0                     # events a full ring buffer refused (overwrite off): unmarked gaps
    clock: str = ""                      # the trace clock; "" when the trace does not say
    unparsed: int = 0                    # text lines that are neither comments nor events we read
    format: str = "text"
    notes: list[str] = field(default_factory=list)
    violation_ts: int | None = None      # counter value of the checker's first violation marker
    violation_mark: str = ""
    hits_before_violation: int | None = None   # window hits (this trace's measures) before that marker
    overlaps_before_violation: int | None = None
    # per CPU that received, flushed or lost events: seconds the recorder covers before the
    # marker, from the trace's start (or that CPU's last gap) to the marker
    recorder_s: dict[int, float] = field(default_factory=dict)
    # the events around the first violation (else the first hit): [ts, cpu, kind, detail]
    interleaving: list[list[Any]] = field(default_factory=list)
    interleaving_focus: str = ""         # "violation" | "window hit" | ""
    interleaving_at: int = -1            # index of the focus event (the marker, the hit's return) in it

    def window_problems(self) -> list[str]:
        """Why the window counts of this trace are not evidence (empty: they are)."""
        out: list[str] = []
        if self.kprobe_missed:
            out.append(f"kprobes missed {self.kprobe_missed} hit(s) (kprobe_profile): a receive, "
                       f"return or flush that was not traced can make or hide an interleaving")
        if self.receives and not self.outcomes:
            out.append("receive outcomes not traced (no return probe): a failed receive would "
                       "count as a held slot")
        if self.clock and self.clock != "counter":
            out.append(f"trace clock {self.clock}, not counter: events on different CPUs are not "
                       f"ordered exactly")
        if self.dropped:
            out.append(f"{self.dropped} event(s) dropped by a full ring buffer with overwrite off, "
                       f"with no mark where: gaps the analysis cannot see")
        if self.unparsed:
            out.append(f"{self.unparsed} trace line(s) not read as events: some may be receives or flushes")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"receives": self.receives, "failed_receives": self.failed, "flushes": self.flushes,
                "window_hits": self.window_hits, "unflushed_hits": self.window_hits,
                "overlap_hits": self.overlap_hits, "sockets": self.sockets, "cpus": sorted(self.cpus),
                "examples": self.examples[:20], "overlap_examples": self.overlap_examples[:20],
                "marks": self.marks[:50], "first_hit_ts": self.first_hit_ts,
                "first_overlap_ts": self.first_overlap_ts, "first_hit_s": self.first_hit_s,
                "first_overlap_s": self.first_overlap_s, "span_s": self.span_s,
                "skipped": self.skipped, "lost": self.lost, "gaps": self.gaps,
                "retracted": self.retracted, "outcomes_traced": self.outcomes,
                "kprobe_missed": self.kprobe_missed, "dropped": self.dropped,
                "trace_clock": self.clock, "unparsed_lines": self.unparsed, "trace_format": self.format,
                "window_available": not self.window_problems(),
                "window_problems": self.window_problems(), "analysis_notes": self.notes,
                "violation_ts": self.violation_ts, "violation_mark": self.violation_mark,
                "hits_before_violation": self.hits_before_violation,
                "overlaps_before_violation": self.overlaps_before_violation,
                "recorder_s": {str(c): v for c, v in sorted(self.recorder_s.items())},
                "recorder_min_s": min(self.recorder_s.values()) if self.recorder_s else None,
                "interleaving": self.interleaving, "interleaving_focus": self.interleaving_focus,
                "interleaving_at": self.interleaving_at}


class _Open:
    __slots__ = ("ts", "xs", "holders", "inside_of")

    def __init__(self, ts: int, xs: int, holders: dict[int, int], inside_of: list[int]) -> None:
        self.ts, self.xs, self.holders, self.inside_of = ts, xs, holders, inside_of


class _Analyzer:
    """Feed events in counter order; see the module docstring for the two measures."""

    def __init__(self, max_examples: int = 20) -> None:
        self.a = Analysis()
        self.max_examples = max_examples
        self.pending: dict[int, dict[int, int]] = {}   # socket -> cpu -> successful unflushed receives
        self.open: dict[int, _Open] = {}               # cpu -> receive awaiting its return
        self.last: dict[int, int] = {}                 # cpu -> ts of its last event
        # (commit ts, hit ts, kind "u"/"o", cpu, socket, holders); retracted ones are removed
        self.log: list[tuple[int, int, str, int, int, dict[int, int]]] = []
        self.clock: list[tuple[int, float]] = []
        self.first_rcv: int | None = None
        self.gap_at: dict[int, int] = {}               # cpu -> ts of its last gap (its recorder restarts there)
        self.recent: deque[list[Any]] = deque(maxlen=INTERLEAVING_BEFORE)
        self.after = -1                                # events still to keep after the focus (-1: no focus yet)

    def _keep(self, ev: tuple[Any, ...]) -> None:
        """The interleaving around the focus: a bounded window, never the whole trace."""
        kind = ev[2]
        if kind not in ("rcv", "rcvret", "flush", "flushall", "mark", "lost"):
            return
        detail = ev[3] if kind in ("mark", "rcvret", "lost") else (hex(ev[3]) if isinstance(ev[3], int) else "")
        item = [ev[0], ev[1], kind, detail]
        self.recent.append(item)
        if self.after > 0:
            self.a.interleaving.append(item)
            self.after -= 1

    def _focus(self, what: str) -> None:
        """The first violation, or (until one comes) the first window hit: keep what led to it."""
        a = self.a
        if a.interleaving_focus == "violation" or (what == "window hit" and a.interleaving_focus):
            return
        a.interleaving = list(self.recent)
        a.interleaving_focus, a.interleaving_at = what, len(a.interleaving) - 1
        self.after = INTERLEAVING_AFTER

    def feed(self, ev: tuple[Any, ...]) -> None:
        ts, cpu, kind = ev[0], ev[1], ev[2]
        a = self.a
        if a.first_ts is None:
            a.first_ts = ts
        a.last_ts = ts
        if kind == "mark":
            text = str(ev[3]).strip()
            if text.startswith(CLOCK_MARK):
                try:
                    self.clock.append((ts, float(text.split()[1])))
                except (IndexError, ValueError):
                    pass
                return
            a.marks.append(text)
            self._keep(ev)
            if text.startswith(VIOLATION_MARK) and a.violation_ts is None:
                a.violation_ts, a.violation_mark = ts, text
                self._focus("violation")
            return
        self._keep(ev)
        if kind == "lost":
            self._lost(ts, cpu, ev[3])
            return
        if kind not in ("rcv", "rcvret", "flush", "flushall"):
            return
        a.cpus.add(cpu)
        self.last[cpu] = ts
        if kind == "rcvret":
            o = self.open.pop(cpu, None)
            if o is not None:
                a.outcomes = a.outcomes or ev[3] is not None
                self._close(cpu, o, ev[3], ev[4], ts)
            return
        o = self.open.pop(cpu, None)
        if o is not None:          # its return never came (no return probe): outcome unknown
            self._close(cpu, o, None, None, ts)
        if kind == "flushall":
            a.flushes += 1
            for per in self.pending.values():
                if cpu in per:
                    per[cpu] = 0
            return
        xs = ev[3]
        if xs is None:
            return
        per = self.pending.setdefault(xs, {})
        if kind == "flush":
            a.flushes += 1
            per[cpu] = 0
            return
        a.receives += 1
        if self.first_rcv is None:
            self.first_rcv = ts
        inside = [c for c, oo in self.open.items() if c != cpu and oo.xs == xs]
        if inside:
            self.log.append((ts, ts, "o", cpu, xs, {c: 1 for c in inside}))
            if not self.a.interleaving_focus:
                self._focus("window hit")
        holders = {c: n for c, n in per.items() if c != cpu and n > 0}
        for c in inside:           # inside a receive into S: holding (or about to hold) a slot
            holders[c] = holders.get(c, 0) + 1
        self.open[cpu] = _Open(ts, xs, holders, inside)

    def _close(self, cpu: int, o: _Open, ret: int | None, caller: str | None, now: int) -> None:
        if ret is not None and ret != 0:
            self.a.failed += 1     # reserved nothing and is not on the flush list
            return
        if o.holders:
            self.log.append((now, o.ts, "u", cpu, o.xs, o.holders))
            if not self.a.interleaving_focus:
                self._focus("window hit")
        per = self.pending.setdefault(o.xs, {})
        if caller in SELF_FLUSHING_CALLERS:
            per[cpu] = 0           # flushed by its caller before anything else runs here
        else:
            per[cpu] = per.get(cpu, 0) + 1

    def _lost(self, ts: int, cpu: int, count: int) -> None:
        """cpu lost events before ts: forget its state, withdraw hits that relied on it."""
        a = self.a
        a.gaps += 1
        a.lost += count if count > 0 else 0
        gap_start = self.last.get(cpu, -1)
        self.open.pop(cpu, None)
        for per in self.pending.values():
            per.pop(cpu, None)
        keep: list[tuple[int, int, str, int, int, dict[int, int]]] = []
        while self.log and self.log[-1][0] > gap_start:
            e = self.log.pop()
            if e[1] > gap_start and cpu in e[5]:
                a.retracted += 1
            else:
                keep.append(e)
        self.log.extend(reversed(keep))
        self.last[cpu] = ts
        self.gap_at[cpu] = ts      # the recorder of this CPU starts again here

    def finish(self) -> Analysis:
        a = self.a
        for cpu, o in list(self.open.items()):
            self._close(cpu, o, None, None, a.last_ts or 0)
        self.open.clear()
        hits = sorted((e for e in self.log if e[2] == "u"), key=lambda e: e[1])
        overlaps = sorted((e for e in self.log if e[2] == "o"), key=lambda e: e[1])
        a.window_hits, a.overlap_hits = len(hits), len(overlaps)
        for src, dst in ((hits, a.examples), (overlaps, a.overlap_examples)):
            for e in src[:self.max_examples]:
                dst.append({"ts": e[1], "cpu": e[3], "socket": hex(e[4]),
                            ("unflushed_on" if e[2] == "u" else "inside_on"): e[5]})
        a.first_hit_ts = hits[0][1] if hits else None
        a.first_overlap_ts = overlaps[0][1] if overlaps else None
        if a.violation_ts is not None:
            a.hits_before_violation = sum(1 for e in hits if e[1] < a.violation_ts)
            a.overlaps_before_violation = sum(1 for e in overlaps if e[1] < a.violation_ts)
        a.sockets = len(self.pending)
        t = self._seconds
        if self.first_rcv is not None and len(self.clock) >= 2:
            t0 = t(self.first_rcv)
            a.span_s = _round(t(a.last_ts) - t0) if a.last_ts is not None else None
            a.first_hit_s = _round(t(a.first_hit_ts) - t0) if a.first_hit_ts is not None else None
            a.first_overlap_s = _round(t(a.first_overlap_ts) - t0) if a.first_overlap_ts is not None else None
        if a.violation_ts is not None and a.first_ts is not None and len(self.clock) >= 2:
            # a CPU's recorder covers the whole trace unless it lost events: one that began
            # receiving late was recorded, idle, from the start (a full ring buffer that
            # overwrote its oldest pages shows as a gap, where its coverage begins)
            start = {c: self.gap_at.get(c, a.first_ts) for c in a.cpus | self.gap_at.keys()}
            a.recorder_s = {c: _round(t(a.violation_ts) - t(s)) for c, s in start.items()
                            if s <= a.violation_ts}
        if a.gaps:
            a.notes.append(f"{a.gaps} gap(s) where a CPU lost events ({a.lost} known lost); "
                           f"{a.retracted} hit(s) that relied on them withdrawn")
        return a

    def _seconds(self, ts: int) -> float:
        """Counter value -> clock-mark seconds: linear between the two marks around
        it, clamped to the first/last mark outside them (no extrapolation: the
        counter only advances with events, so its rate says nothing about time
        where no marks were written, e.g. after the checker stopped tracing)."""
        c = self.clock
        if ts <= c[0][0]:
            return c[0][1]
        if ts >= c[-1][0]:
            return c[-1][1]
        i = bisect.bisect_left(c, (ts, float("-inf")))
        (x0, y0), (x1, y1) = c[i - 1], c[i]
        return y0 + (ts - x0) * (y1 - y0) / (x1 - x0) if x1 != x0 else y0


def _round(x: float) -> float:
    return round(x, 4)


# --- text traces ------------------------------------------------------------------

def _text_events(lines: Iterable[str], a: Analysis) -> list[tuple[Any, ...]]:
    """The events of a text trace.  Nothing is dropped silently: a line that is
    not an event is counted (unparsed), and a trace in another clock is read
    (nanoseconds from its "seconds.micros") and named, so the analysis can say
    its window counts are not evidence."""
    events: list[tuple[Any, ...]] = []
    pending_lost: dict[int, int] = {}
    seconds: str | None = None           # a "seconds.micros" timestamp seen
    first_unparsed = ""
    for line in lines:
        if line.startswith(_TEXT_CLOCK):
            a.clock = line[len(_TEXT_CLOCK):].strip()
            continue
        if line.startswith(_TEXT_PROFILE):
            parts = line[len(_TEXT_PROFILE):].split()
            if len(parts) >= 3 and parts[-1].isdigit():
                a.kprobe_missed += int(parts[-1])
            continue
        if line.startswith("#"):
            h = _HEADER.search(line)
            if h and int(h.group(1)) < int(h.group(2)):
                a.lost = int(h.group(2)) - int(h.group(1))
            continue
        if not line.strip():
            continue
        lm = _LOST.search(line)
        if lm:
            pending_lost[int(lm.group(1))] = int(lm.group(2))
            continue
        m = _LINE.search(line)
        if not m:
            a.unparsed += 1
            first_unparsed = first_unparsed or line.strip()[:120]
            continue
        cpu, kind, rest = int(m.group(1)), m.group(4), m.group(5)
        if m.group(3) is None:
            ts = int(m.group(2))
        else:
            seconds = seconds or f"{m.group(2)}.{m.group(3)}"
            ts = int(m.group(2)) * 10**9 + int(m.group(3).ljust(9, "0")[:9])
        if cpu in pending_lost:
            events.append((ts, cpu, "lost", pending_lost.pop(cpu), None))
        if kind in ("rcv", "flush"):
            x = _XS.search(rest)
            events.append((ts, cpu, kind, _int(x.group(1)) if x else None, None))
        elif kind == "rcvret":
            r, c = _RET.search(rest), _CALLER.search(rest)
            events.append((ts, cpu, kind, int(r.group(1)) if r else None, c.group(1) if c else None))
        elif kind == "flushall":
            events.append((ts, cpu, kind, None, None))
        elif kind == "tracing_mark_write":
            events.append((ts, cpu, "mark", rest.strip(), None))
    if seconds is not None and a.clock in ("", "counter"):
        # a counter never prints a fraction: whatever the header said, this is a
        # clock counted in nanoseconds (local, global, mono, ...)
        a.clock = f"in seconds ({seconds})"
    elif not a.clock:
        a.notes.append("trace clock not recorded in the trace: its integer timestamps are taken as "
                       "the counter clock")
    if a.unparsed:
        a.notes.append(f"{a.unparsed} line(s) not read as trace events, the first: {first_unparsed!r}")
    # per-CPU buffers are printed merged by timestamp already; sort to be safe (counter clock)
    events.sort(key=lambda e: e[0])
    return events


def analyze(lines: Iterable[str], max_examples: int = 20) -> Analysis:
    """Analyse a text trace (the `trace` file)."""
    an = _Analyzer(max_examples)
    events = _text_events(lines, an.a)
    # An overwritten ring buffer loses each CPU's oldest events first, and a
    # flush lost that way would look like an interleaving: only the span every
    # traced CPU still covers is analysed.
    first: dict[int, int] = {}
    for ts, cpu, kind, _, _ in events:
        if kind != "mark":
            first.setdefault(cpu, ts)
    start = max(first.values(), default=0) if an.a.lost else 0
    lost = an.a.lost
    for e in events:
        if e[0] < start:
            an.a.skipped += 1
            continue
        an.feed(e)
    an.a.lost = max(an.a.lost, lost)
    return an.finish()


# --- raw (streamed) traces: decoded by lab.rawtrace ------------------------------

def analyze_raw(path: Path, max_examples: int = 20) -> Analysis:
    rt = read_raw(path)
    an = _Analyzer(max_examples)
    an.a.format = "raw"
    for e in raw_events(rt):
        an.feed(e)
    prof = rt.tail.get("kprobe_profile", {})
    an.a.kprobe_missed = sum(int(v[1]) for v in prof.values())
    an.a.clock = str(rt.header.get("clock") or "counter")   # every raw trace before the field: counter
    for st in rt.tail.get("stats", {}).values():
        try:
            an.a.dropped += int(st.get("dropped events", 0))
        except (TypeError, ValueError):
            pass
    if not rt.tail:
        an.a.notes.append("trace ends without its tail record (tracer did not finish)")
    return an.finish()


def analyze_file(path: Path) -> Analysis:
    """Analyse a saved trace: raw (streamed) or text, optionally gzipped."""
    path = Path(path)
    if is_raw(path):
        return analyze_raw(path)
    with _open_text(path) as f:
        return analyze(f)


def analysis_from_summary(s: dict[str, Any]) -> Analysis:
    """The Analysis analyze_raw() gives of the trace a scanner summary describes.  Exact for what
    the summary holds (the counts); a trace with examples, marks or an interleaving to show is
    never left in the guest (transfer_reasons), so those stay empty as its own analysis has them."""
    def opt(k: str) -> Any:
        return s.get(k)
    a = Analysis(receives=int(s["receives"]), failed=int(s["failed_receives"]), flushes=int(s["flushes"]),
                 window_hits=int(s["unflushed_hits"]), overlap_hits=int(s["overlap_hits"]),
                 sockets=int(s["sockets"]), cpus={int(c) for c in s["cpus"]},
                 first_hit_ts=opt("first_hit_ts"), first_overlap_ts=opt("first_overlap_ts"),
                 first_hit_s=opt("first_hit_s"), first_overlap_s=opt("first_overlap_s"),
                 span_s=opt("span_s"), first_ts=opt("first_ts"), last_ts=opt("last_ts"),
                 lost=int(s["lost"]), gaps=int(s["gaps"]), retracted=int(s["retracted"]),
                 outcomes=bool(s["outcomes_traced"]), kprobe_missed=int(s["kprobe_missed"]),
                 dropped=int(s["dropped"]), clock=str(s["trace_clock"]), format="raw",
                 violation_ts=opt("violation_ts"), hits_before_violation=opt("hits_before_violation"),
                 overlaps_before_violation=opt("overlaps_before_violation"),
                 recorder_s={int(c): float(v) for c, v in (s.get("recorder_s") or {}).items()})
    if not s.get("tail"):
        a.notes.append("trace ends without its tail record (tracer did not finish)")
    if a.gaps:
        a.notes.append(f"{a.gaps} gap(s) where a CPU lost events ({a.lost} known lost); "
                       f"{a.retracted} hit(s) that relied on them withdrawn")
    return a


def merge(ev: dict[str, Any], a: Analysis) -> None:
    """Fold the host-side analysis of a fetched trace into a target's evidence
    (what the agent's collect() said), and decide whether its window count is
    evidence at all: if not, the level is unavailable and the note says why;
    the raw counts stay (unflushed_hits, overlap_hits) for whoever reads the trace."""
    a.kprobe_missed = max(a.kprobe_missed, int(ev.get("kprobe_missed") or 0))
    ev.update(a.to_dict())
    problems = a.window_problems()
    if problems:
        ev["available"] = False
        ev["note"] = "; ".join(filter(None, [str(ev.get("note") or ""),
                                             "window not measured: " + "; ".join(problems)]))
        ev.pop("window_hits", None)
        return
    # the scenario decides which interleaving is its race window
    ev["window_hits"] = ev.get(str(ev.get("measure", "unflushed_hits")), a.window_hits)


def recorder_check(ev: dict[str, Any], saw_violation: bool) -> list[str]:
    """Is the trace a flight recorder of the run's first violation?  ev: a target's merged
    evidence.  Problems go to ev["recorder_problems"] (and are returned): a violation the
    checker saw that left no marker in the trace, or a recorder shorter than wanted."""
    problems: list[str] = []
    if not ev.get("available"):
        return problems
    if saw_violation and ev.get("violation_ts") is None:
        problems.append("the checker saw a violation but the trace holds no violation marker: "
                        "the flight recorder did not catch it (trace_marker written after tracing "
                        "stopped, or the checker ran without --trace-marker)")
    wanted = float(ev.get("recorder_wanted_s") or RECORDER_MIN_S)
    short = {c: v for c, v in (ev.get("recorder_s") or {}).items() if v < wanted}
    if ev.get("violation_ts") is not None and short:
        problems.append(f"the recorder covers only "
                        f"{', '.join(f'cpu{c} {v * 1000:.0f} ms' for c, v in sorted(short.items()))} "
                        f"before the first violation (wanted >= {wanted * 1000:.0f} ms on every CPU)")
    ev["recorder_problems"] = problems
    return problems


def window_measure(scenario: str, window: str = "") -> str:
    """Which interleaving is the race's window: the scenario's evidence.window (data, not code);
    window, when given, is that value already (in the guest there are no scenario files)."""
    if window:
        return window
    from lab.scenario import load
    return str(load(scenario)["evidence"]["window"])


# --- command line ----------------------------------------------------------------------

def _fmt(e: tuple[Any, ...]) -> str:
    ts, cpu, kind, a, b = e
    if kind in ("rcv", "flush"):
        detail = f"xs={hex(a) if isinstance(a, int) else a}"
    elif kind == "rcvret":
        detail = f"ret={a}" + (f" caller={b}" if b else "")
    elif kind == "lost":
        detail = f"[LOST {a if a >= 0 else '?'} EVENTS]"
    elif kind == "mark":
        detail = str(a)
    else:
        detail = ""
    return f"[{cpu:03d}] {ts:>12}: {kind}: {detail}".rstrip()


def dump(path: Path, around: int | None = None, count: int = 200, out: Any = sys.stdout) -> None:
    if not is_raw(path):
        with _open_text(path) as f:
            for line in f:
                out.write(line)
        return
    rt = read_raw(path)
    if around is None:
        for e in raw_events(rt):
            out.write(_fmt(e) + "\n")
        return
    before: list[tuple[Any, ...]] = []
    after = -1
    for e in raw_events(rt):
        if after < 0 and e[0] < around:
            before.append(e)
            if len(before) > 2 * count:
                del before[:count]
            continue
        if after < 0:
            for b in before[-count:]:
                out.write(_fmt(b) + "\n")
            after = 0
        out.write(_fmt(e) + "\n")
        after += 1
        if after >= count:
            break


def cli_analyze(trace: Path) -> None:
    """`racelab dev evidence analyze TRACE`: the interleaving analysis, as JSON."""
    print(json.dumps(analyze_file(trace).to_dict(), indent=1))


def cli_trim(trace: Path, out: Path, lo: int, hi: int) -> None:
    """`racelab dev evidence trim TRACE OUT FROM TO`: the pages around [FROM, TO] into OUT."""
    print(f"{trim(trace, out, lo, hi)} page(s) kept")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.evidence ...` is `racelab dev evidence ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.evidence", argv)


if __name__ == "__main__":
    sys.exit(main())
