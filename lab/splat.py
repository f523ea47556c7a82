"""Kernel splats: found in a kernel log as it is written, timed against the load.

A splat (WARNING, BUG, Oops, a trap, a panic) is one block of kernel log
lines.  Two sources feed the same parser: a guest's serial console (a file
libvirt writes; SplatWatcher) and this machine's own kernel log for the
netns backend (/dev/kmsg; KmsgWatcher).

Only a splat whose first line came after the load started says anything
about the race.  One from boot or from setting up the topology is kept in
full and shown as a note, and decides nothing: the run decides the row.
The boundary is where the log stood when the agent's "load-start" event
reached us; the watcher reads everything up to that moment first, so a
splat printed before it is never taken for one of the load's.

    python -m lab.splat CONSOLE.log    # the splats in a saved console log
"""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.scenario import Stalls
from lab.workload import TargetResult

# Stalls and lockups come from starved vCPUs as well as from a broken kernel:
# under TCG on a busy host a fixed 6.1.192 printed "rcu_sched kthread starved"
# with two pinned guests on two host CPUs.  [vm] stalls decides whether they
# count (stall_policy).  A workqueue lockup is the same watchdog idea (a
# worker pool that did not run for 30 s) and comes from the same starvation;
# a panic the kernel raises *because of* a stall (softlockup_panic and its
# kin) is that stall.
STALL = re.compile(r"rcu: INFO: rcu_\w+ (self-)?detected (expedited )?stall|RCU stall|soft lockup|"
                   r"INFO: task .* blocked for more than|BUG: workqueue lockup|"
                   r"Watchdog detected hard LOCKUP|"
                   r"Kernel panic - not syncing: (softlockup: hung tasks|hung_task: blocked tasks|"
                   r"RCU Stall|Hard LOCKUP)")
# The first line of a splat.  x86 prints "kernel BUG at FILE:LINE!" for BUG()
# and BUG_ON(), then "invalid opcode: 0000 [#1]"; the other traps say
# "NAME: ERRCODE [#N]" too.  The traps are matched with that "[#N]" so a
# user program's "traps: prog[42] general protection fault ip:..." (a
# segfault, not the kernel's) is not a splat.
SPLAT = re.compile(
    r"Oops:|BUG:|WARNING:|KASAN:|KCSAN:|UBSAN:|Kernel panic|kernel BUG at \S+|"
    r"(general protection fault|invalid opcode|stack segment|double fault)[^:]*: [0-9a-f]{4} \[#\d+\]|"
    r"PANIC: double fault|Unable to handle kernel|"
    r"rcu: INFO: rcu_\w+ (self-)?detected (expedited )?stall|RCU stall|watchdog: BUG: soft lockup|"
    r"INFO: task .* blocked for more than|Watchdog detected hard LOCKUP|"
    r"list_add corruption|list_del corruption")
# The panic an oops ends in: part of that crash.
PANIC = re.compile(r"Kernel panic - not syncing")
END = re.compile(r"---\[ end (trace|Kernel panic)")
CUT_HERE = "------------[ cut here ]------------"
CUT_LINES = 4          # "cut here" and a WARN's message, at most this many lines before the trigger
SPLAT_LINES = 80       # a splat's text: at most this many lines ...
SPLAT_SECONDS = 5.0    # ... collected for at most this long after its first line
TAIL_LINES = 30        # after "---[ end trace": the registers again, then the panic
# A guest lost within this long of its checker's last word, after a kernel
# splat, died of that splat.  Under TCG the checker's stats come every
# 0.5 s and a crashed checker's agent reports after stopping the senders
# (up to 5 s each); an older splat had nothing to do with the loss.
CRASH_WINDOW = 10.0
# agent events that say the load is still running
_PROGRESS = frozenset({"load-start", "stats", "violation", "done"})


@dataclass(frozen=True)
class Splat:
    text: str             # the whole block, lines joined by "\n" (a WARN's message and "cut here" first)
    seen_at: float        # host monotonic clock when its trigger line was read
    after_load: bool      # its trigger line came after the load had started

    @property
    def first_line(self) -> str:
        """Its trigger line (WARNING:, kernel BUG at, ...), which says what it is."""
        return trigger_line(self.text).strip()


def trigger_line(text: str) -> str:
    lines = text.split("\n")
    return next((line for line in lines if SPLAT.search(line)), lines[0])


@dataclass
class _Block:
    lines: list[str]
    start: float
    stall: bool
    after_load: bool
    ended: bool = False       # its "---[ end trace" was seen
    panicked: bool = False    # ... and then the panic it ended in
    pending: list[str] = field(default_factory=list)   # lines after the end: kept if a panic follows


class SplatParser:
    """Kernel log lines in, splats out, each once with its text.

    A splat is a block of lines from its first trigger line (BUG:, WARNING:,
    ...) to its "---[ end trace" (plus the lines that still belong to the
    crash: the register dump again and the panic), or SPLAT_LINES lines, or
    `window` seconds after it began, whichever comes first.  Trigger lines
    inside a block are the same crash ("kernel BUG at" then "invalid
    opcode: 0000 [#1]") and fold into it; a panic shortly after an earlier
    splat is that splat's end.  A new block starts at a trigger after the
    end of a trace that is not its panic (a second WARNING), and at anything
    but another stall line inside a stall's block: a BUG, or a panic, is
    never hidden in a stall note, and a panic after a stall is its own.
    """

    def __init__(self, on_splat: Callable[[Splat], None], window: float = SPLAT_SECONDS) -> None:
        self.on_splat = on_splat
        # "------------[ cut here ]------------" and what follows it up to the trigger:
        # WARN(cond, "message") prints its message there, before the "WARNING:" line
        self._cut: list[str] = []
        self.window = window
        self.loaded = False       # the load has started: blocks from now on count
        self._block: _Block | None = None
        self._since_close = TAIL_LINES + 1   # lines since the last block's end (or its close)
        self._last_stall = False             # ... and whether that block was a stall

    def feed(self, line: str, now: float) -> None:
        hit = SPLAT.search(line) is not None
        stall = hit and STALL.search(line) is not None
        panic = PANIC.search(line) is not None
        cut = self._cut
        if CUT_HERE in line:
            self._cut = [line]
        elif cut and not hit and len(cut) < CUT_LINES:
            self._cut = cut + [line]
        else:
            self._cut = []
        b = self._block
        if b is not None:
            if b.stall:
                if not hit or stall:
                    b.lines.append(line)
                    if len(b.lines) >= SPLAT_LINES:
                        self.close()
                    return
                self.close()
            elif hit and b.ended and not panic:
                self.close()
            elif not b.ended:
                b.lines.append(line)
                b.ended = END.search(line) is not None
                if len(b.lines) >= SPLAT_LINES:
                    self.close()
                return
            else:   # after its end: the registers again, then perhaps the panic
                b.pending.append(line)
                b.panicked = b.panicked or panic
                if b.panicked:
                    b.lines += b.pending[:max(0, SPLAT_LINES - len(b.lines))]
                    b.pending = []
                if "end Kernel panic" in line or len(b.pending) >= TAIL_LINES:
                    self.close()
                return
        self._since_close += 1
        if not hit:
            return
        if panic and not stall and self._since_close <= TAIL_LINES and not self._last_stall:
            return   # the end of the crash reported just before
        self._block = _Block([*cut, line], now, stall=stall, after_load=self.loaded)

    def tick(self, now: float) -> None:
        """A splat that has not ended within its window is reported as it stands."""
        if self._block is not None and now - self._block.start >= self.window:
            self.close()

    def close(self) -> None:
        b, self._block = self._block, None
        if b is None:
            return
        self._since_close = len(b.pending)   # lines since its end
        self._last_stall = b.stall
        self.on_splat(Splat("\n".join(b.lines), b.start, b.after_load))


class _Follower:
    """A kernel log followed by a thread, fed to a SplatParser.

    on_agent_event() is given the agent's events: at "load-start" it reads
    the log up to that moment before marking the load as started, and it
    keeps the time of the checker's last word (last_progress) for
    crashed_of_splat."""

    def __init__(self, on_splat: Callable[[Splat], None] | None, interval: float,
                 window: float) -> None:
        self.splats: list[Splat] = []
        self.last_progress: float | None = None
        self._on_splat = on_splat
        self._parser = SplatParser(self._found, window)
        self._lock = threading.RLock()
        self._buf = ""
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._interval = interval

    def _found(self, s: Splat) -> None:
        self.splats.append(s)
        if self._on_splat is not None:
            self._on_splat(s)

    def _read(self) -> str:
        raise NotImplementedError

    def _start(self) -> None:
        self._t.start()

    def _finish(self) -> None:
        self._stop.set()
        if self._t.is_alive():
            self._t.join(5)
        with self._lock:
            self.poll()
            if self._buf:                 # a last line without its newline
                self._line(self._buf, time.monotonic())
                self._buf = ""
            self._parser.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def _line(self, line: str, now: float) -> None:
        self._parser.feed(line, now)

    def poll(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._buf += self._read().replace("\r", "")
            lines = self._buf.split("\n")
            self._buf = lines.pop()
            for line in lines:
                self._line(line, now)
            self._parser.tick(now)

    def mark_load_start(self) -> None:
        """Everything written so far came before the load; what follows counts."""
        with self._lock:
            self.poll()
            self._parser.loaded = True

    def on_agent_event(self, ev: dict[str, Any]) -> None:
        typ = ev.get("type")
        if typ == "load-start":
            self.mark_load_start()
        if typ in _PROGRESS:
            self.last_progress = time.monotonic()


class SplatWatcher(_Follower):
    """Follows a guest's console log file from its first byte (the boot too)."""

    def __init__(self, path: Path, on_splat: Callable[[Splat], None] | None = None,
                 interval: float = 0.5, window: float = SPLAT_SECONDS) -> None:
        super().__init__(on_splat, interval, window)
        self.path = path
        self._pos = 0

    def __enter__(self) -> SplatWatcher:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def _read(self) -> str:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except OSError:
            data = ""
        return data


KMSG = Path("/dev/kmsg")
_KMSG_READ = 16384           # larger than any record: a short buffer is EINVAL
_KMSG_KEEP = 20000           # lines kept for the evidence file


class KmsgWatcher(_Follower):
    """Follows this machine's kernel log (/dev/kmsg) from the moment it is entered.

    The file is opened non-blocking and seeked to its end, so the boot and
    whatever the kernel said before the run are not read.  Only the kernel's
    own records are parsed (facility 0): a line user space wrote to
    /dev/kmsg is not a kernel splat.  `unavailable` says why the log could
    not be read (no /dev/kmsg in a container, say); the fd is closed on exit."""

    def __init__(self, path: Path = KMSG, on_splat: Callable[[Splat], None] | None = None,
                 interval: float = 0.2, window: float = SPLAT_SECONDS, kernel_only: bool = True) -> None:
        super().__init__(on_splat, interval, window)
        self.path = path
        self.kernel_only = kernel_only
        self.unavailable = ""
        self.lost = 0                  # times records were overwritten before we read them
        self.lines: list[str] = []     # the kernel's lines since we started, as dmesg shows them
        self._fd: int | None = None

    def __enter__(self) -> KmsgWatcher:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.unavailable = f"cannot read {self.path}: {e.strerror}"
            return self
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                self._finish()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _read(self) -> str:
        if self._fd is None:
            return ""
        chunks = []
        while True:
            try:
                data = os.read(self._fd, _KMSG_READ)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:    # the ring wrapped past us: read on from the oldest
                    self.lost += 1
                    continue
                raise
            if not data:
                break
            chunks.append(data.decode(errors="replace"))
        return "".join(chunks)

    def _line(self, line: str, now: float) -> None:
        text = kmsg_line(line, self.kernel_only)
        if text is None:
            return
        if len(self.lines) < _KMSG_KEEP:
            self.lines.append(text)
        self._parser.feed(text, now)


_ESC = re.compile(r"\\x([0-9a-fA-F]{2})")


def kmsg_line(record: str, kernel_only: bool = True) -> str | None:
    """One /dev/kmsg line ("PRI,SEQ,USEC,FLAGS;text") as dmesg prints it,
    "[   12.000002] text"; None for a record's dictionary lines (" KEY=VALUE")
    and, with kernel_only, for what user space wrote (facility other than 0)."""
    if not record or record.startswith(" "):
        return None
    head, sep, text = record.partition(";")
    fields = head.split(",")
    if not sep or len(fields) < 3 or not fields[0].isdigit() or not fields[2].isdigit():
        return None
    if kernel_only and int(fields[0]) >> 3 != 0:
        return None
    usec = int(fields[2])
    text = _ESC.sub(lambda m: chr(int(m.group(1), 16)), text)
    return f"[{usec // 1_000_000:5d}.{usec % 1_000_000:06d}] {text}"


# --- what the splats mean for a target -------------------------------------------

def stall_policy(stalls: str, accel: str, overcommit: bool = False) -> tuple[Stalls, str]:
    """[vm] stalls resolved for a target: (Stalls.NOTE | Stalls.VIOLATION, why).

    "auto" counts stalls only where a stall says something about the kernel:
    under KVM with at least one host CPU per vCPU.  Under TCG, on an
    overcommitted KVM host, on the netns backend's shared host kernel, or
    under an accelerator we do not know, a fixed kernel stalls too."""
    policy = Stalls(stalls)
    if policy != Stalls.AUTO:
        return policy, f"vm.stalls = {policy}"
    if accel == "kvm" and not overcommit:
        return Stalls.VIOLATION, "vm.stalls = auto under KVM"
    why = {"kvm": "under KVM the fleet's vCPUs overcommit the host CPUs, so starved guests stall "
                  "on a fixed kernel too",
           "tcg": "starved vCPUs under TCG stall on a fixed kernel too",
           "host": "the host kernel is shared with everything else this machine runs"}
    return Stalls.NOTE, "vm.stalls = auto: " + why.get(accel, f"accelerator {accel or 'unknown'} is not "
                                                          "trusted with stalls")


def splat_kind(text: str, stalls: str = "note") -> str:
    """"stall" (noted, not a violation) or "kernel-splat" (a violation).
    stalls="violation" ([vm] stalls) counts stalls and lockups as splats too."""
    return "stall" if stalls == Stalls.NOTE and STALL.search(trigger_line(text)) else "kernel-splat"


def record_splats(res: TargetResult, splats: Sequence[Splat], stalls: str = "note",
                  why: str = "") -> None:
    """A target's splats: kernel-splat violations, notes for stalls, and for
    everything before the load a note and res.pre_load_splats (never counted).

    A splat after the load started is a violation with a time (from when its
    first line was read), so a guest that oopsed before the checker said
    anything still has a time to first violation."""
    for s in splats:
        if not s.after_load:
            res.pre_load_splats.append(s.text)
            res.notes.append("kernel splat before the load, not counted: " + s.text)
            continue
        if splat_kind(s.text, stalls) == "stall":
            res.notes.append(f"guest stall, not counted as a violation ({why or 'vm.stalls = note'}; "
                             "--set vm.stalls=violation counts them): " + s.first_line)
            continue
        res.by_kind["kernel-splat"] = res.by_kind.get("kernel-splat", 0) + 1
        res.violations.append({"type": "violation", "kind": "kernel-splat", "text": s.text,
                               "target": res.label})
        if res.load_started_host is not None:
            # the host's clock, when the console watcher read it: to its poll interval
            from_load = max(0.0, s.seen_at - res.load_started_host)
            ready = res.senders_ready_s
            t = round(max(0.0, from_load - ready) if ready is not None else from_load, 3)
            if res.first_violation_s is None or t < res.first_violation_s:
                res.first_violation_s = t
                res.first_violation_from_load_start_s = round(from_load, 3)
                res.first_violation_origin = "senders ready" if ready is not None else "load start"


def crashed_of_splat(res: TargetResult, splats: Sequence[Splat], traced: bool,
                     stalls: str = "note", last_progress: float | None = None,
                     who: str = "guest", log_name: str = "console log") -> bool:
    """A target lost right after a kernel splat died of the kernel under test.

    "Right after": the splat came after the load started, and no earlier
    than CRASH_WINDOW before the checker's last word (last_progress, host
    monotonic; now if not known).  That is the race's outcome (the reverted
    generic receive oopses in __xsk_rcv_zc), not a lost host: the target
    keeps its packets and its kernel-splat violation, and the row says
    REPRODUCED.  Its trace and dmesg died with it; the console log (in the
    evidence) holds the splat.  A splat from boot, or one long before the
    loss, leaves the loss an infrastructure loss."""
    if res.infra_error is None:
        return False
    ref = time.monotonic() if last_progress is None else last_progress
    fatal = [s for s in splats if s.after_load and splat_kind(s.text, stalls) == "kernel-splat"
             and s.seen_at >= ref - CRASH_WINDOW]
    if not fatal:
        return False
    res.notes.append(f"{who} crashed after a kernel splat (the stream ended with "
                     f"{res.infra_error.split(':', 1)[0]}): {fatal[-1].first_line}; see the {log_name}")
    res.infra_error = None
    res.reason = "guest-crashed"
    if not res.load_seconds:
        # the load ran at least until the last event the guest sent (a stats line, a violation)
        res.load_seconds = max(res.timeline[-1][0] if res.timeline else 0.0, res.last_heard_s)
    if traced and not res.evidence.get("available"):
        res.evidence = {**res.evidence, "available": False,
                        "note": "guest crashed: its flight recorder died with it"}
    return True


def host_splats(res: TargetResult, kmsg: KmsgWatcher, stalls: str, traced: bool, out: Path) -> None:
    """The netns backend's verdict on this machine's kernel log: the same rules
    as a guest's console; the log since the run began is kept as evidence."""
    if kmsg.unavailable:
        res.notes.append(f"host kernel log not watched ({kmsg.unavailable}): a WARN or BUG during "
                         "the load would go unseen")
        return
    if kmsg.lost:
        res.notes.append(f"host kernel log: records were overwritten before they were read "
                         f"({kmsg.lost} time(s)); a splat among them would go unseen")
    policy, why = stall_policy(stalls, "host")
    record_splats(res, kmsg.splats, policy, why)
    crashed_of_splat(res, kmsg.splats, traced, policy, kmsg.last_progress,
                     who="the load", log_name="host kernel log (evidence/host-kmsg.log)")
    ev = out / "evidence"
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "host-kmsg.log").write_text("".join(line + "\n" for line in kmsg.lines))
    res.evidence.setdefault("kernel_log", str(ev / "host-kmsg.log"))


def cli_list(log: Path) -> None:
    """`racelab dev splat LOG`: the kernel splats in a saved console log, each under its kind."""
    found: list[Splat] = []
    parser = SplatParser(found.append, window=float("inf"))
    for line in log.read_text(errors="replace").replace("\r", "").split("\n"):
        parser.feed(line, 0.0)
    parser.close()
    for s in found:
        print(f"--- {splat_kind(s.text)}\n{s.text}")
    print(f"{len(found)} splat(s)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.splat ...` is `racelab dev splat ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.splat", argv)


if __name__ == "__main__":
    sys.exit(main())
