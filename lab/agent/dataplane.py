"""The C data plane's argv and output: how xskcheck/xsksend/xskamp/xsktrace are run and read.

The binaries live in csrc/ (see the comments at the top of each file); lab.dataplane
builds them on the host.  This half runs wherever they run (the agent, in the guest).

Output protocol (JSON lines on the checker's stdout), parsed by parse_event():

    ready      t=0.0 once the sockets are bound and XDP is attached
    violation  kind, dev, queue, cpu, addr, expected, actual, rx, onset, detail
    stats      rx tx fill comp foreign ours violations by_kind onsets onsets_by_kind
               skipped rx_dropped ...
    done       the final stats, plus reason and printed
onset: this violation starts a new fault (its socket had been quiet for a while
before it); the others are echoes of one (a lost FILL descriptor, a stale slot).
The sender prints ready, stats (sent, enobufs, errors, error) and done (the same,
plus per_sender).  enobufs is back-pressure, normal on veth; errors is any other
send error, a load that did not run as asked.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.agent.run import BadInput

# One detector per kind; the names are the checker's (csrc/xskcheck.c kind_name[]).
VIOLATION_KINDS: tuple[str, ...] = (
    "order",      # RX order differs from FILL order (per FILL ring)
    "poison",     # an RX slot the kernel never wrote (our poison still in it)
    "duplicate",  # the same frame outstanding twice / twice in one RX batch
    "offset",     # addr % frame_size != XDP_PACKET_HEADROOM + umem headroom
    "over-held",  # the application holds more frames than the UMEM has
    "meta",       # the app's stamp in a frame it owns changed, or no XDP metadata
    "length",     # desc.len != the length the XDP program saw
    "state",      # per-frame state machine FILL->RX->FILL|TX->COMP->FILL|TX broken
    "sequence",   # a flow's sequence number did not increase
    "checksum",   # payload checksum wrong, or the frame truncated
    "late",       # a frame passed over when FILL order resynchronised arrived after all
)
# Every detector has a fault the checker commits on purpose (--inject KIND).
INJECT_KINDS: tuple[str, ...] = VIOLATION_KINDS
# The sender can commit these two itself (xsksend --inject KIND).
SENDER_INJECT_KINDS: tuple[str, ...] = ("sequence", "checksum")

EVENT_TYPES: tuple[str, ...] = ("ready", "violation", "stats", "done")
BINARIES: tuple[str, ...] = ("xskcheck", "xsksend", "xskamp", "xsktrace")
# xskamp's busy-wait loops (csrc/xskamp.c): auto tries bpf_loop() (Linux 5.17) first.
AMPLIFIER_LOOPS: tuple[str, ...] = ("auto", "bpf_loop", "bounded")
AMPLIFIER_MAX_PROBES = 16
AMPLIFIER_MAX_DELAY_NS = 1_000_000   # more is a stall of the receive path, not a window

# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Event:
    """One JSON line from xskcheck or xsksend."""

    type: str                        # ready | violation | stats | done (others passed through)
    t: float                         # seconds since the checker's ready line (sender: its start)
    kind: str | None = None          # violation kind (one of VIOLATION_KINDS), else None
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the whole line

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def queue(self) -> int | None:
        return _int_or_none(self.data.get("queue"))

    @property
    def cpu(self) -> int | None:
        return _int_or_none(self.data.get("cpu"))

    @property
    def addr(self) -> int | None:
        return _int_or_none(self.data.get("addr"))

    @property
    def detail(self) -> str:
        return str(self.data.get("detail", ""))

    @property
    def rx(self) -> int:
        return _int_or_none(self.data.get("rx")) or 0

    @property
    def violations(self) -> int:
        return _int_or_none(self.data.get("violations")) or 0

    @property
    def onset(self) -> bool:
        """A violation that starts a fault (True when the line does not say)."""
        return self.data.get("onset", True) is not False

    @property
    def onsets(self) -> int:
        return _int_or_none(self.data.get("onsets")) or 0

    @property
    def by_kind(self) -> dict[str, int]:
        bk = self.data.get("by_kind")
        if not isinstance(bk, Mapping):
            return {}
        return {str(k): int(v) for k, v in bk.items() if isinstance(v, int) and not isinstance(v, bool)}


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_event(line: str | bytes) -> Event | None:
    """One output line -> Event, or None for anything that is not one of ours."""
    if isinstance(line, bytes):
        line = line.decode(errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    typ, t = obj.get("type"), obj.get("t", 0.0)
    if not isinstance(typ, str) or not typ:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    kind = obj.get("kind")
    if typ == "violation":
        if not isinstance(kind, str) or not kind:
            return None
    else:
        kind = None
    return Event(type=typ, t=float(t), kind=kind, data=types.MappingProxyType(obj))


# ---------------------------------------------------------------- argv

_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IPV4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


def _cpus_arg(cpus: Sequence[int] | str | None, problems: list[str]) -> str | None:
    if cpus is None:
        return None
    if isinstance(cpus, str):
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpus):
            problems.append(f"cpus: bad CPU list {cpus!r} (e.g. '0,1' or '0-3')")
        return cpus
    lst = list(cpus)
    if not lst or any(not isinstance(c, int) or c < 0 for c in lst):
        problems.append(f"cpus: need non-negative integers, got {lst!r}")
    return ",".join(str(c) for c in lst)


def _check(problems: list[str], ok: bool, msg: str) -> None:
    if not ok:
        problems.append(msg)


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise BadInput(f"bad {what} options:\n  " + "\n  ".join(problems),
                       hint=f"see `{what} --help`")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def checker_argv(bin_dir: str | os.PathLike[str], *, dev: str, mode: str = "rxdrop",
                 xdp: str = "generic", peer_dev: str | None = None, queues: int = 1,
                 frame_size: int = 2048, headroom: int = 0, frames: int = 256,
                 shared_umem: bool = False, ring: int | None = None, batch: int = 64,
                 duration: float = 0.0, stats_ms: int = 500, checks: str = "all",
                 inject: str | None = None, stop_on_first: bool = False,
                 trace_marker: bool = False, cpus: Sequence[int] | str | None = None,
                 seed: int | None = None, busy_poll: bool = False,
                 busy_poll_usec: int | None = None, idle_us: int | None = None,
                 spin: int | None = None, sockets_per_queue: int = 1,
                 pick: str = "cpu") -> list[str]:
    """argv for xskcheck; every bad option is reported at once (BadInput).

    sockets_per_queue > 1: that many rxdrop sockets bound to each queue with
    XDP_SHARED_UMEM, sharing the queue's buffer pool (one FILL ring); the XDP
    program picks one by CPU (pick="cpu") or round-robin (pick="rr").
    """
    p: list[str] = []
    _check(p, bool(_IFNAME.match(dev or "")), f"dev: bad interface name {dev!r}")
    _check(p, mode in ("rxdrop", "forward"), f"mode: rxdrop or forward, got {mode!r}")
    _check(p, xdp in ("native", "generic"), f"xdp: native or generic, got {xdp!r}")
    if mode == "forward":
        _check(p, bool(peer_dev and _IFNAME.match(peer_dev)), "peer_dev: forward mode needs a peer device")
    elif peer_dev is not None:
        p.append("peer_dev: only with mode='forward'")
    _check(p, 1 <= queues <= 64, f"queues: 1..64, got {queues}")
    _check(p, 1 <= sockets_per_queue <= 8, f"sockets_per_queue: 1..8, got {sockets_per_queue}")
    _check(p, pick in ("cpu", "rr"), f"pick: cpu or rr, got {pick!r}")
    if sockets_per_queue > 1:
        _check(p, mode == "rxdrop", "sockets_per_queue: several sockets on one queue need mode='rxdrop'")
        _check(p, queues * sockets_per_queue <= 128,
               f"sockets_per_queue: queues x sockets_per_queue at most 128, got {queues * sockets_per_queue}")
        _check(p, inject != "late", "inject: 'late' needs sockets_per_queue=1 (several sockets keep no FILL FIFO)")
    _check(p, frame_size in (2048, 4096), f"frame_size: 2048 or 4096, got {frame_size}")
    _check(p, 0 <= headroom < frame_size - 256, f"headroom: 0..{frame_size - 257}, got {headroom}")
    nsock = queues * (2 if mode == "forward" else 1)
    _check(p, nsock <= frames <= 1 << 20, f"frames: {nsock}..{1 << 20} (one per socket at least), got {frames}")
    if ring is not None:
        _check(p, ring >= 1 and ring & (ring - 1) == 0, f"ring: a power of two, got {ring}")
    _check(p, 1 <= batch <= 1024, f"batch: 1..1024, got {batch}")
    _check(p, duration >= 0, f"duration: >= 0 seconds (0 = until stopped), got {duration}")
    _check(p, 10 <= stats_ms <= 3_600_000, f"stats_ms: 10..3600000, got {stats_ms}")
    _check(p, checks in ("all", "none"), f"checks: all or none, got {checks!r}")
    if inject is not None:
        _check(p, inject in INJECT_KINDS, f"inject: one of {', '.join(INJECT_KINDS)}; got {inject!r}")
        _check(p, checks == "all", "inject: needs checks='all'")
    if idle_us is not None:
        _check(p, 0 <= idle_us <= 100_000, f"idle_us: 0..100000 (0 = block in poll()), got {idle_us}")
    cpu_list = _cpus_arg(cpus, p)
    _raise(p, "xskcheck")

    argv = [os.fspath(Path(bin_dir) / "xskcheck"), "--dev", dev, "--mode", mode, "--xdp", xdp,
            "--queues", str(queues), "--frame-size", str(frame_size), "--headroom", str(headroom),
            "--frames", str(frames), "--batch", str(batch), "--duration", _num(duration),
            "--stats-ms", str(stats_ms), "--checks", checks]
    if peer_dev is not None:
        argv += ["--peer-dev", peer_dev]
    if shared_umem:
        argv.append("--shared-umem")
    if ring is not None:
        argv += ["--ring", str(ring)]
    if inject is not None:
        argv += ["--inject", inject]
    if stop_on_first:
        argv.append("--stop-on-first")
    if trace_marker:
        argv.append("--trace-marker")
    if cpu_list is not None:
        argv += ["--cpus", cpu_list]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if busy_poll_usec is not None:
        argv += ["--busy-poll-usec", str(busy_poll_usec)]
    elif busy_poll:
        argv.append("--busy-poll")
    if idle_us is not None:
        argv += ["--idle-us", str(idle_us)]
    if spin is not None:
        argv += ["--spin", str(spin)]
    if sockets_per_queue != 1:
        argv += ["--sockets-per-queue", str(sockets_per_queue), "--pick", pick]
    return argv


def sender_argv(bin_dir: str | os.PathLike[str], *, dev: str, dst_mac: str, src_ip: str,
                dst_ip: str, senders: int = 1, cpus: Sequence[int] | str | None = None,
                burst: int = 32, gap_ns: int = 0, size: int = 64, duration: float = 0.0,
                rate: float = 0, flow_base: int = 0, seed: int | None = None,
                inject: str | None = None, stats_ms: int | None = None) -> list[str]:
    """argv for xsksend; every bad option is reported at once (BadInput)."""
    p: list[str] = []
    _check(p, bool(_IFNAME.match(dev or "")), f"dev: bad interface name {dev!r}")
    _check(p, bool(_MAC.match(dst_mac or "")), f"dst_mac: like 02:00:00:00:00:01, got {dst_mac!r}")
    for name, ip in (("src_ip", src_ip), ("dst_ip", dst_ip)):
        m = _IPV4.match(ip or "")
        _check(p, m is not None and all(int(x) <= 255 for x in m.groups()), f"{name}: an IPv4 address, got {ip!r}")
    _check(p, 1 <= senders <= 256, f"senders: 1..256, got {senders}")
    _check(p, 1 <= burst <= 1024, f"burst: 1..1024, got {burst}")
    _check(p, gap_ns >= 0, f"gap_ns: >= 0, got {gap_ns}")
    _check(p, 64 <= size <= 1514, f"size: 64..1514 bytes (Ethernet frame), got {size}")
    _check(p, duration >= 0, f"duration: >= 0 seconds, got {duration}")
    _check(p, rate >= 0, f"rate: >= 0 packets/s (0 = as fast as possible), got {rate}")
    _check(p, 0 <= flow_base <= 0xFFFFFFFF, f"flow_base: a u32, got {flow_base}")
    if inject is not None:
        _check(p, inject in SENDER_INJECT_KINDS,
               f"inject: one of {', '.join(SENDER_INJECT_KINDS)}; got {inject!r}")
    if stats_ms is not None:
        _check(p, 10 <= stats_ms <= 3_600_000, f"stats_ms: 10..3600000, got {stats_ms}")
    cpu_list = _cpus_arg(cpus, p)
    _raise(p, "xsksend")

    argv = [os.fspath(Path(bin_dir) / "xsksend"), "--dev", dev, "--dst-mac", dst_mac,
            "--src-ip", src_ip, "--dst-ip", dst_ip, "--senders", str(senders),
            "--burst", str(burst), "--gap-ns", str(gap_ns), "--size", str(size),
            "--duration", _num(duration), "--rate", _num(rate), "--flow-base", str(flow_base)]
    if cpu_list is not None:
        argv += ["--cpus", cpu_list]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if inject is not None:
        argv += ["--inject", inject]
    if stats_ms is not None:
        argv += ["--stats-ms", str(stats_ms)]
    return argv


_PROBE = re.compile(r"^([A-Za-z0-9_.]{1,127})(?:\+(0[xX][0-9a-fA-F]+|[0-9]+))?$")


def parse_probe(spec: str) -> tuple[str, int] | None:
    """"SYM", "SYM+123" or "SYM+0x7a" -> (SYM, offset); None if malformed.
    The same grammar as xskamp's --probe (SYM alone is SYM+0)."""
    m = _PROBE.match(spec) if isinstance(spec, str) else None
    if m is None:
        return None
    digits = m.group(2) or "0"
    off = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits)   # "010" is ten, not eight
    return (m.group(1), off) if off <= 0xFFFFF else None


def probe_name(sym: str, off: int) -> str:
    """The form xskamp reports a probe in: SYM+0xOFF."""
    return f"{sym}+{off:#x}"


def amplifier_argv(bin_dir: str | os.PathLike[str], *, probes: Sequence[str], delay_ns: int = 0,
                   loop: str = "auto", stats_ms: int = 1000, duration: float = 0.0,
                   gate: str = "", holds: Sequence[str] = (), hold_ns: int = 0) -> list[str]:
    """argv for xskamp; every bad option is reported at once (BadInput).
    probes: SYM+OFF each (OFF decimal or 0x hex), at most 16, no two the same;
    delay_ns: the BPF busy-wait per hit (0: the kprobe's trap alone);
    gate: wait only while another CPU is inside this function ("" = every hit);
    holds: SYM+OFF probes that wait hold_ns (0: delay_ns) on every hit, never gated."""
    p: list[str] = []
    if isinstance(probes, str):
        p.append(f"probes: a list of SYM+OFF, got the string {probes!r}")
        probes = [probes]
    lst = list(probes)
    _check(p, 1 <= len(lst) <= AMPLIFIER_MAX_PROBES,
           f"probes: 1..{AMPLIFIER_MAX_PROBES} of them, got {len(lst)}")
    seen: dict[str, str] = {}
    for spec in lst:
        parsed = parse_probe(spec)
        if parsed is None:
            p.append(f"probes: bad probe {spec!r} (SYM+OFF, OFF decimal or 0x hex up to 0xfffff, "
                     "e.g. __xsk_rcv_zc+0x7a)")
            continue
        name = probe_name(*parsed)
        if name in seen:
            p.append(f"probes: {spec!r} is the same probe as {seen[name]!r}")
        seen[name] = spec
    _check(p, isinstance(delay_ns, int) and not isinstance(delay_ns, bool)
           and 0 <= delay_ns <= AMPLIFIER_MAX_DELAY_NS,
           f"delay_ns: an integer 0..{AMPLIFIER_MAX_DELAY_NS} (0 = the probe's trap only), got {delay_ns!r}")
    _check(p, loop in AMPLIFIER_LOOPS, f"loop: one of {', '.join(AMPLIFIER_LOOPS)}; got {loop!r}")
    _check(p, 10 <= stats_ms <= 3_600_000, f"stats_ms: 10..3600000, got {stats_ms}")
    _check(p, duration >= 0, f"duration: >= 0 seconds (0 = until stopped), got {duration}")
    _check(p, gate == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,126}", gate) is not None,
           f"gate: a function name (e.g. veth_poll) or \"\", got {gate!r}")
    _check(p, not gate or delay_ns > 0, "gate: needs delay_ns > 0 (it gates the delay)")
    hl = [holds] if isinstance(holds, str) else list(holds)
    for spec in hl:
        parsed = parse_probe(spec)
        if parsed is None:
            p.append(f"holds: bad probe {spec!r} (SYM+OFF, e.g. xdp_do_flush)")
            continue
        name = probe_name(*parsed)
        if name in seen:
            p.append(f"holds: {spec!r} is the same probe as {seen[name]!r}")
        seen[name] = spec
    _check(p, len(lst) + len(hl) <= AMPLIFIER_MAX_PROBES,
           f"probes and holds: at most {AMPLIFIER_MAX_PROBES} in all, got {len(lst) + len(hl)}")
    _check(p, isinstance(hold_ns, int) and not isinstance(hold_ns, bool)
           and 0 <= hold_ns <= AMPLIFIER_MAX_DELAY_NS,
           f"hold_ns: an integer 0..{AMPLIFIER_MAX_DELAY_NS} (0 = delay_ns), got {hold_ns!r}")
    _check(p, not hl or hold_ns > 0 or delay_ns > 0, "holds: need hold_ns or delay_ns > 0 (a hold is a wait)")
    _raise(p, "xskamp")

    argv = [os.fspath(Path(bin_dir) / "xskamp")]
    for spec in lst:
        argv += ["--probe", spec]
    argv += ["--delay-ns", str(delay_ns), "--loop", loop, "--stats-ms", str(stats_ms),
             "--duration", _num(duration)]
    if gate:
        argv += ["--gate", gate]
    for spec in hl:
        argv += ["--hold", spec]
    if hl and hold_ns:
        argv += ["--hold-ns", str(hold_ns)]
    return argv
