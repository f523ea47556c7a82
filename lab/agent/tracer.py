"""The ftrace flight recorder: kprobes on the AF_XDP receive and flush paths, streamed to a file.

Tracer (runs in the agent, next to the kernel under test) puts kprobes on the
AF_XDP RX producer (entry with the socket, and a return probe with its
result) and on the flush path, with the `counter` trace clock (a global
atomic counter: monotonic across CPUs even under TCG, where `global` gave
false interleavings).  A thread streams every CPU's ring buffer
(per_cpu/cpuN/trace_pipe_raw, binary pages: cheap, no formatting in the
guest) into one file, so the analysis sees the whole run, not only the last
megabytes a ring buffer keeps; pages the reader could not save in time carry
the ring buffer's "missed events" flag and are reported as lost.  The
checker writes its own events into the same buffer through trace_marker and
turns tracing off at the first violation, so the stream ends just after the
corruption: a flight recorder.  The Tracer also writes a clock mark
(`racelab-clock <monotonic seconds>`) a few times a second, which maps the
counter to seconds.

In a guest, collect() also runs csrc/xsktrace (guest_scan) on the streamed
trace, so that a trace with nothing the host must see stays in the guest.
The file format defined here (RAW_MAGIC, records, marks) is read back on the
host by lab.evidence, which analyses it.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lab.agent.run import RacelabError, run


# Probe candidates in order of preference; resolved against the running kernel.
# __xsk_rcv first: copy mode always passes through it (FILL consumption and RX
# reservation both happen inside it), and its return probe gives the outcome
# and closes the "inside the receive" interval of the generic-receive race.
RECEIVE_CANDIDATES = ("__xsk_rcv", "__xsk_rcv_zc", "xskq_prod_reserve_desc")
FLUSH_CANDIDATES = ("xsk_flush", "__xsk_map_flush")
# Callers of the receive that flush the socket themselves before returning.
SELF_FLUSHING_CALLERS = ("xsk_generic_rcv",)
GROUP = "racelab"
def trace_out() -> str:
    """Where this agent's trace is saved: one file per process, so two agents on one
    machine (netns runs side by side) never write into one; fetch_evidence removes it."""
    return f"/tmp/racelab-trace-{os.getpid()}.txt"
RAW_MAGIC = b"RACELAB-FTRACE-RAW 1\n"
SCANNER = "xsktrace"                   # csrc/xsktrace.c: the raw trace's counts, where the trace is
SCAN_TIMEOUT_S = 120.0                 # generous: it runs under TCG emulation in the guest
CLOCK_MARK = "racelab-clock"
_REC = struct.Struct("<4sII")             # tag, cpu, length
_RB_MISSED_EVENTS = 1 << 31
_RB_MISSED_STORED = 1 << 30
VIOLATION_MARK = "racelab violation"   # what xskcheck writes to trace_marker at a violation
RECORDER_MIN_S = 0.5                   # the flight recorder must cover this much on every CPU
INTERLEAVING_BEFORE = 160              # events kept before the first violation (or first hit)
INTERLEAVING_AFTER = 24                # ... and after it


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


def _kallsyms(names: Iterable[str]) -> tuple[dict[str, int], list[int]]:
    """Addresses of the text symbols in names, and every text address (sorted)."""
    wanted = set(names)
    found: dict[str, int] = {}
    addrs: list[int] = []
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tT":
                    a = int(parts[0], 16)
                    addrs.append(a)
                    if parts[2] in wanted:
                        found.setdefault(parts[2], a)
    except (OSError, ValueError):
        pass
    addrs.sort()
    return found, addrs


def _symbol_ranges(found: dict[str, int], addrs: list[int], names: Iterable[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for n in names:
        a = found.get(n)
        if not a:
            continue
        i = bisect.bisect_right(addrs, a)
        out[n] = [a, addrs[i] if i < len(addrs) else a + 4096]
    return out


def _parse_format(text: str) -> tuple[int, str, dict[str, tuple[int, int, bool]]]:
    """An events/*/*/format file: (id, name, {field: (offset, size, signed)})."""
    m_id = re.search(r"^ID:\s*(\d+)", text, re.M)
    m_name = re.search(r"^name:\s*(\S+)", text, re.M)
    fields: dict[str, tuple[int, int, bool]] = {}
    for m in re.finditer(r"field:([^;]*);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);", text):
        name = m.group(1).split()[-1].split("[")[0]
        fields[name] = (int(m.group(2)), int(m.group(3)), m.group(4) == "1")
    return (int(m_id.group(1)) if m_id else -1, m_name.group(1) if m_name else "", fields)


def _mem_total_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 1024


class _Streamer(threading.Thread):
    """Copies every CPU's trace_pipe_raw pages into one file, and writes clock marks."""

    def __init__(self, root: Path, out: Path, cpus: list[int], header: dict[str, Any],
                 cap_bytes: int, page_size: int, mark_every: float = 0.02, recorder_s: float = 0.0,
                 buffer_kb: int = 0) -> None:
        super().__init__(name="racelab-trace-stream", daemon=True)
        self.root, self.out, self.cpus = root, out, cpus
        self.recorder_s, self.buffer_kb = recorder_s, buffer_kb
        self.cpu_bytes: dict[int, int] = {c: 0 for c in cpus}
        self.t0 = time.monotonic()
        self.resized_kb = 0
        self.cap_bytes, self.page_size, self.mark_every = cap_bytes, page_size, mark_every
        self.stop_ev = threading.Event()
        self.fds: dict[int, int] = {}
        self.error = ""
        for c in cpus:
            try:
                self.fds[c] = os.open(root / "per_cpu" / f"cpu{c}" / "trace_pipe_raw",
                                      os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                self.error = f"cpu{c} not streamed: {e.strerror}"
        if not self.fds:
            raise OSError(f"no per_cpu/*/trace_pipe_raw: {self.error}")
        try:
            self.marker: int | None = os.open(root / "trace_marker", os.O_WRONLY)
        except OSError:
            self.marker = None
        self.f = open(out, "wb")  # noqa: SIM115 - closed by close(), which ends the recording
        self.f.write(RAW_MAGIC)
        self._record(b"HEAD", 0, json.dumps(header).encode())
        self.bytes = 0
        self.pages = 0
        self.capped_at: float | None = None

    def _record(self, tag: bytes, cpu: int, payload: bytes) -> None:
        self.f.write(_REC.pack(tag, cpu, len(payload)))
        self.f.write(payload)

    def mark(self) -> None:
        if self.marker is not None:
            try:
                os.write(self.marker, f"{CLOCK_MARK} {time.monotonic():.6f}\n".encode())
            except OSError:
                pass

    def drain(self, force: bool = False) -> None:
        for c, fd in self.fds.items():
            while force or self.bytes < self.cap_bytes:
                try:
                    b = os.read(fd, self.page_size)
                except BlockingIOError:
                    break
                except OSError as e:
                    self.error = f"cpu{c}: {e}"
                    break
                if len(b) < 16:
                    break
                commit = int.from_bytes(b[8:16], "little")
                size = commit & ~(_RB_MISSED_EVENTS | _RB_MISSED_STORED) & 0xFFFFFFFF
                end = 16 + size + (8 if commit & _RB_MISSED_STORED else 0)
                try:
                    self._record(b"PAGE", c, b[:end])
                except OSError as e:     # e.g. /tmp full: keep the ring buffer as the recorder
                    self.error = f"writing the trace: {e.strerror}"
                    self.cap_bytes = self.bytes
                    self.capped_at = time.monotonic()
                    return
                self.bytes += end
                self.pages += 1
                self.cpu_bytes[c] = self.cpu_bytes.get(c, 0) + end
            if not force and self.bytes >= self.cap_bytes and self.capped_at is None:
                # from here the ring buffers keep the last events: a flight recorder
                self.capped_at = time.monotonic()
                self._size_recorder()

    def _size_recorder(self) -> None:
        """Grow the ring buffers to hold recorder_s at the busiest CPU's measured rate (x2 for
        bursts), within an eighth of the guest's memory: the recorder is the buffers from now."""
        elapsed = max(1e-3, time.monotonic() - self.t0)
        rate = max(self.cpu_bytes.values(), default=0) / elapsed
        want = int(2 * rate * self.recorder_s) >> 10
        limit = (_mem_total_mb() << 10) // 8 // max(1, len(self.cpus))
        kb = min(want, limit)
        if kb > self.buffer_kb:
            try:
                fd = os.open(self.root / "buffer_size_kb", os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, f"{kb}\n".encode())
                finally:
                    os.close(fd)
                self.resized_kb = kb
            except OSError as e:
                self.error = self.error or f"recorder not resized to {kb} KB per CPU: {e.strerror}"

    def run(self) -> None:
        try:
            while not self.stop_ev.wait(self.mark_every):
                self.mark()
                if self.capped_at is None:
                    self.drain()
        except Exception as e:  # noqa: BLE001 - reported by collect(), never kills the agent
            self.error = f"stream thread: {type(e).__name__}: {e}"

    def halt(self) -> None:
        self.stop_ev.set()
        if self.ident is not None:
            self.join(5)

    def finish(self, tail: dict[str, Any]) -> None:
        self.halt()
        try:
            self.drain(force=True)
            self._record(b"TAIL", 0, json.dumps(tail).encode())
        except OSError as e:
            self.error = self.error or f"writing the trace: {e.strerror}"
        self.close()

    def close(self) -> None:
        for fd in list(self.fds.values()) + ([self.marker] if self.marker is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
        self.marker = None
        if not self.f.closed:
            self.f.close()


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
        self._streamer: _Streamer | None = None
        self._callers: dict[str, list[int]] = {}

    def _w(self, name: str, value: str, append: bool = False) -> None:
        assert self.root is not None
        # raw os.write: Python's "a" mode seeks, which tracefs files refuse (EINVAL)
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(self.root / name, flags)
        try:
            os.write(fd, (value + "\n").encode())
        finally:
            os.close(fd)

    def _r(self, name: str) -> str:
        assert self.root is not None
        return (self.root / name).read_text()

    def _add_probe(self, role: str, kind: str, sym: str, fetch: str) -> bool:
        try:
            self._w("kprobe_events", f"{kind}:{GROUP}/{role} {sym}{fetch}", append=True)
        except OSError as e:
            self.missing.append(f"{role}: cannot {'kretprobe' if kind == 'r' else 'kprobe'} {sym} ({e.strerror})")
            return False
        self.probes[role] = sym     # registered: _cleanup removes it even if enabling fails
        self._w(f"events/{GROUP}/{role}/enable", "1")
        return True

    def __enter__(self) -> Tracer:
        if self.root is None and mount_tracefs():
            self._mounted = True
            self.root = tracefs()
        if self.root is None:
            self.note = "no tracefs with kprobe_events (CONFIG_KPROBE_EVENTS, tracefs mounted?)"
            return self
        found, addrs = _kallsyms(RECEIVE_CANDIDATES + FLUSH_CANDIDATES + SELF_FLUSHING_CALLERS)
        self._callers = _symbol_ranges(found, addrs, SELF_FLUSHING_CALLERS)
        rcv = next((s for s in RECEIVE_CANDIDATES if s in found), None)
        flush = next((s for s in FLUSH_CANDIDATES if s in found), None)
        for role, sym, cands in (("rcv", rcv, RECEIVE_CANDIDATES), ("flush", flush, FLUSH_CANDIDATES)):
            if sym is None:
                self.missing.append(f"{role}: none of {', '.join(cands)} is probeable in this kernel")
        if rcv is None:
            self.note = "; ".join(self.missing)
            self.root = None
            return self
        try:
            self._saved["trace_clock"] = _current_clock(self._r("trace_clock"))
            self._saved["buffer_size_kb"] = _buffer_kb(self._r("buffer_size_kb"))
            self._saved["options/overwrite"] = self._r("options/overwrite").strip()
            self._saved["tracing_on"] = self._r("tracing_on").strip()
            self._w("tracing_on", "0")
            self._w("trace", "")
            self._w("buffer_size_kb", str(self.opts.get("buffer_kb", 4096)))
            # Overwrite on, in both recorder modes.  Off, a full ring buffer drops
            # the newest events and marks nothing on the pages (only the per-CPU
            # "dropped events" count): a streamed reader that falls behind would
            # leave gaps the analysis cannot see, and a capped stream or the text
            # trace would keep the first events instead of the last.  On, an
            # overwritten page flags "missed events" on the next page read, which
            # the analysis turns into a gap and withdraws the hits that needed it.
            self._w("options/overwrite", "1")
            self._w("trace_clock", "counter")
            clock = _current_clock(self._r("trace_clock"))
            if clock != "counter":
                raise OSError(f"trace_clock is {clock or '?'} after selecting counter")
            # first argument (the xdp_sock) is in %di on x86_64
            self._add_probe("rcv", "p", rcv, " xs=%di:x64")
            self._add_probe("rcvret", "r", rcv, " ret=$retval:s32")
            if flush == "__xsk_map_flush":
                # flushes every socket on its CPU's list: "flushall", no socket
                self._add_probe("flushall", "p", flush, "")
            elif flush is not None:
                self._add_probe("flush", "p", flush, " xs=%di:x64")
            why = self._unmeasurable()
            if why:
                # probes that cannot measure the window only slow the receive path
                # (a kprobe there is itself a delay that changes the race): none
                self.note = "; ".join([why, *self.missing])
                self._cleanup()
                self.root = None
                return self
            if self.opts.get("stream", True):
                self._start_stream()
            self._w("tracing_on", "1")
        except OSError as e:
            self.note = f"tracing set-up failed: {e}"
            self._cleanup()
            self.root = None
        if self.root is not None and self.missing:
            self.note = "; ".join(self.missing)
        return self

    def _unmeasurable(self) -> str:
        """Why the registered probes cannot measure this scenario's window ("" if they can)."""
        if "rcvret" not in self.probes:
            # without the outcome a failed receive (no FILL entry, RX ring full)
            # counts as a held slot, and "inside a receive" never closes at its
            # return: a fixed kernel would show hits
            return (f"no return probe on {self.probes.get('rcv', '?')}: receive outcomes unknown, "
                    f"so the window is not measured")
        if str(self.opts.get("window") or "unflushed_hits") == "unflushed_hits" \
                and not ({"flush", "flushall"} & set(self.probes)):
            return "no flush probe in this kernel: the unflushed-receive window cannot be measured"
        return ""

    def _start_stream(self) -> None:
        assert self.root is not None
        events: dict[str, Any] = {}
        for path in [f"events/{GROUP}/{r}/format" for r in self.probes] + ["events/ftrace/print/format"]:
            try:
                eid, name, fields = _parse_format(self._r(path))
            except OSError:
                continue
            events[str(eid)] = {"name": "mark" if path.startswith("events/ftrace/") else name,
                                "fields": fields}
        page_size = 4096
        try:
            hp = _parse_format(self._r("events/header_page"))[2]
            if "data" in hp:
                page_size = hp["data"][0] + hp["data"][1]
        except OSError:
            pass
        cpus = list(range(os.cpu_count() or 1))
        max_mb = int(self.opts.get("max_mb") or min(512, _mem_total_mb() // 4))
        header = {"page_size": page_size, "events": events, "cpus": cpus,
                  "clock": _current_clock(self._r("trace_clock")),
                  "probes": self.probes, "callers": self._callers, "max_mb": max_mb}
        try:
            self._streamer = _Streamer(self.root, Path(trace_out()), cpus, header, max_mb << 20, page_size,
                                       recorder_s=float(self.opts.get("recorder_s", RECORDER_MIN_S)),
                                       buffer_kb=int(self.opts.get("buffer_kb", 4096)))
        except OSError as e:
            self.missing.append(f"stream: {e}; keeping the ring buffer only")
            self._streamer = None
            return
        self._streamer.start()

    def _cleanup(self) -> None:
        if self._streamer is not None:
            self._streamer.halt()
            self._streamer.close()
            self._streamer = None
        if self.root is None:
            if self._mounted:
                import subprocess
                subprocess.run(["umount", "/sys/kernel/tracing"], capture_output=True)
            return
        try:
            self._w("tracing_on", "0")
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
        for name in ("trace_clock", "buffer_size_kb", "options/overwrite", "tracing_on"):
            if self._saved.get(name):
                try:
                    self._w(name, self._saved[name])
                except OSError:
                    pass
        if self._mounted:
            import subprocess
            subprocess.run(["umount", "/sys/kernel/tracing"], capture_output=True)

    def _profile(self) -> dict[str, list[int]]:
        """Our probes' rows of kprobe_profile: event -> [hits, misses].  The misses
        column of a return probe includes the returns lost to maxactive."""
        assert self.root is not None
        prof: dict[str, list[int]] = {}
        try:
            for line in self._r("kprobe_profile").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] in self.probes:
                    prof[parts[0]] = [int(parts[-2]), int(parts[-1])]
        except (OSError, ValueError):
            pass
        return prof

    def _tail(self) -> dict[str, Any]:
        assert self.root is not None
        tail: dict[str, Any] = {"kprobe_profile": self._profile(), "stats": {}}
        for c in range(os.cpu_count() or 1):
            try:
                st = dict(line.split(":", 1) for line in self._r(f"per_cpu/cpu{c}/stats").splitlines() if ":" in line)
                tail["stats"][str(c)] = {k.strip(): v.strip() for k, v in st.items()}
            except OSError:
                pass
        return tail

    def collect(self, scanner: str | Path | None = None) -> dict[str, Any]:
        """Stop tracing, save the trace to a file, and describe it.  scanner: the xsktrace binary;
        given, a streamed trace is counted here and, when the host need not see it, described by
        the scanner's summary instead of moved (see guest_scan)."""
        if self.root is None or not self.probes:
            return {"available": False, "note": self.note or "tracing unavailable", "missing": self.missing}
        # trace_options() names the window from the scenario file (a guest has none)
        measure = str(self.opts.get("window") or "unflushed_hits")
        self._w("tracing_on", "0")
        t = time.monotonic()
        info: dict[str, Any] = {}
        if self._streamer is not None:
            s = self._streamer
            s.finish(self._tail())
            self._streamer = None
            info = {"format": "raw", "bytes": s.bytes, "pages": s.pages}
            if s.resized_kb:
                info["recorder_buffer_kb"] = s.resized_kb
            if s.capped_at is not None:
                info["capped_mb"] = s.cap_bytes >> 20
                self.note = "; ".join(filter(None, [self.note, (
                    f"trace stream capped at {s.cap_bytes >> 20} MB: then only the ring buffer's last "
                    f"events (a gap in between, withdrawn hits counted)")]))
            if s.error:
                info["stream_error"] = s.error
                self.note = "; ".join(filter(None, [self.note, f"trace stream: {s.error}"]))
        else:
            # the `trace` file names neither its clock nor the probes' misses: say both
            with open(self.root / "trace") as src, open(trace_out(), "w") as dst:
                dst.write(f"{_TEXT_CLOCK} {_current_clock(self._r('trace_clock'))}\n")
                for ev, (hits, missed) in self._profile().items():
                    dst.write(f"{_TEXT_PROFILE} {ev} {hits} {missed}\n")
                for line in src:
                    dst.write(line)
            info = {"format": "text"}
        if scanner is not None and info.get("format") == "raw":
            info.update(guest_scan(Path(trace_out()), Path(scanner)))
        prof = self._profile()
        return {"available": True, "trace_path": trace_out(), "probes": self.probes,
                "measure": measure, "missing": self.missing, "note": self.note,
                "kprobe_profile": prof, "kprobe_missed": sum(m for _, m in prof.values()),
                "cpus": os.cpu_count(), "save_seconds": round(time.monotonic() - t, 3),
                "recorder_wanted_s": float(self.opts.get("recorder_s", RECORDER_MIN_S)), **info}

    def __exit__(self, *exc: object) -> None:
        self._cleanup()


def _current_clock(text: str) -> str:
    """The selected clock of trace_clock ("local [counter] global" -> counter); a
    lone name is taken as selected (what a stand-in file holds after a write)."""
    m = re.search(r"\[([\w-]+)\]", text)
    if m:
        return m.group(1)
    words = text.split()
    return words[0] if len(words) == 1 else ""


def _buffer_kb(text: str) -> str:
    """buffer_size_kb reads "7 (expanded: 1408)" before first use: restore the expanded size."""
    m = re.search(r"expanded:\s*(\d+)", text)
    return m.group(1) if m else text.split()[0] if text.split() else ""


# what collect() puts at the top of a text trace it saves
_TEXT_CLOCK = "# racelab trace_clock:"
_TEXT_PROFILE = "# racelab kprobe_profile:"


# --- the trace counted where it was written (csrc/xsktrace.c) ------------------------

def scan(path: Path, binary: Path, timeout: float = SCAN_TIMEOUT_S) -> dict[str, Any]:
    """xsktrace's summary of a raw trace (one JSON object); OSError/ValueError when it cannot give one."""
    try:
        p = run([binary, path], check=False, timeout=timeout)
    except RacelabError as e:            # missing, or timed out
        raise OSError(f"{binary.name}: {e}") from e
    if p.returncode != 0:
        raise OSError(f"{binary.name} exit {p.returncode}: {(p.stderr or '').strip()[-300:]}")
    out = json.loads(p.stdout)
    if not isinstance(out, dict) or out.get("scanner") != SCANNER:
        raise ValueError(f"{binary.name} printed no summary: {p.stdout[:200]!r}")
    return out


def transfer_reasons(s: dict[str, Any]) -> list[str]:
    """Why the host must have the trace itself, given its scanner summary (empty: it need not).
    The host reads what the summary does not hold: the interleaving and examples of a hit, the
    flight recorder before a violation, marks' texts, the withdrawals after a gap."""
    why: list[str] = []
    if s.get("violation") or s.get("marks"):
        why.append("checker marks (a violation)")
    if s.get("overlap_hits") or s.get("unflushed_hits") or s.get("hits_upper_bound"):
        why.append("window hits")
    if s.get("lost") or s.get("gaps") or s.get("retracted"):
        why.append("lost events")
    if s.get("dropped"):
        why.append("dropped events")
    if not s.get("tail"):
        why.append("no tail record")
    return why


def guest_scan(path: Path, binary: Path) -> dict[str, Any]:
    """Count the trace where it is (the agent's side): the evidence fields to add.  The trace
    stays here (trace_needed false) only when the summary is all the host would learn from it."""
    t = time.monotonic()
    if not os.access(binary, os.X_OK):
        return {"guest_analysis_note": f"no {binary}: the trace goes to the host for its analysis"}
    try:
        s = scan(path, binary)
    except (OSError, ValueError) as e:
        return {"guest_analysis_note": f"{SCANNER} failed ({e}): the trace goes to the host for its analysis"}
    s["wall_seconds"] = round(time.monotonic() - t, 3)
    why = transfer_reasons(s)
    return {"guest_analysis": s, "trace_needed": bool(why), "trace_needed_why": why}


