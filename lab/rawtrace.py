"""The raw trace file read back: ring-buffer pages to events, in counter order.

lab.agent.tracer writes it in the guest: RAW_MAGIC, then records (tag, cpu, length):
HEAD (JSON: the events' formats, the callers' address ranges, the clock), PAGE (one
per_cpu/cpuN/trace_pipe_raw page, as the kernel's ring buffer laid it out) and TAIL
(JSON: the kprobe profile, the per-CPU stats).  Decoding the pages is this module's;
what the events mean (the interleaving analysis) is lab.evidence's.

Events are tuples (ts, cpu, kind, a, b), as lab.evidence documents them.
"""

from __future__ import annotations

import gzip
import heapq
import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.agent.tracer import _RB_MISSED_EVENTS, _RB_MISSED_STORED, _REC, RAW_MAGIC


@dataclass
class RawTrace:
    header: dict[str, Any]
    tail: dict[str, Any]
    pages: dict[int, list[tuple[int, int]]]     # cpu -> [(offset, length)] in file order
    buf: Any                                     # mmap or bytes


def read_raw(path: Path) -> RawTrace:
    if str(path).endswith(".gz"):
        with gzip.open(path, "rb") as g:
            buf: Any = g.read()
    else:
        with open(path, "rb") as f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:           # empty file
                buf = b""
    if buf[:len(RAW_MAGIC)] != RAW_MAGIC:
        raise ValueError(f"{path}: not a racelab raw trace")
    off = len(RAW_MAGIC)
    header: dict[str, Any] = {}
    tail: dict[str, Any] = {}
    pages: dict[int, list[tuple[int, int]]] = {}
    n = len(buf)
    while off + _REC.size <= n:
        tag, cpu, length = _REC.unpack_from(buf, off)
        off += _REC.size
        if off + length > n:
            break                    # truncated: keep what is whole
        if tag == b"PAGE":
            pages.setdefault(cpu, []).append((off, length))
        elif tag == b"HEAD":
            header = json.loads(bytes(buf[off:off + length]))
        elif tag == b"TAIL":
            tail = json.loads(bytes(buf[off:off + length]))
        off += length
    return RawTrace(header, tail, pages, buf)


def _decoders(header: dict[str, Any]) -> dict[int, tuple[str, Any]]:
    """event id -> (kind, field getter)"""
    out: dict[int, tuple[str, Any]] = {}
    callers = {k: tuple(v) for k, v in header.get("callers", {}).items()}
    for sid, spec in header.get("events", {}).items():
        name, fields = spec["name"], {k: tuple(v) for k, v in spec["fields"].items()}
        if name in ("rcv", "flush") and "xs" in fields:
            o = fields["xs"][0]
            out[int(sid)] = (name, lambda d, p, o=o: struct.unpack_from("<Q", d, p + o)[0])
        elif name == "rcvret":
            ro = fields["ret"][0] if "ret" in fields else None
            ipo = fields["__probe_ret_ip"][0] if "__probe_ret_ip" in fields else None

            def ret_getter(d: Any, p: int, ro: int | None = ro, ipo: int | None = ipo) -> tuple[Any, Any]:
                ret = struct.unpack_from("<i", d, p + ro)[0] if ro is not None else None
                caller = None
                if ipo is not None and callers:
                    ip = struct.unpack_from("<Q", d, p + ipo)[0]
                    caller = next((k for k, (lo, hi) in callers.items() if lo <= ip < hi), None)
                return ret, caller
            out[int(sid)] = (name, ret_getter)
        elif name == "mark" and "buf" in fields:
            o = fields["buf"][0]
            out[int(sid)] = (name, lambda d, p, n, o=o: bytes(d[p + o:p + n]).split(b"\0", 1)[0]
                             .decode(errors="replace"))
        else:
            out[int(sid)] = (name, None)
    return out


def _cpu_events(rt: RawTrace, cpu: int, dec: dict[int, tuple[str, Any]],
                pages: list[tuple[int, int]] | None = None) -> Iterator[tuple[Any, ...]]:
    d = rt.buf
    u32 = struct.Struct("<I").unpack_from
    u16 = struct.Struct("<H").unpack_from
    page_hdr = struct.Struct("<Qq").unpack_from
    for off, length in rt.pages.get(cpu, []) if pages is None else pages:
        ts, commit = page_hdr(d, off)
        size = commit & ~(_RB_MISSED_EVENTS | _RB_MISSED_STORED) & 0xFFFFFFFF
        if commit & _RB_MISSED_EVENTS:
            missed = -1
            if commit & _RB_MISSED_STORED and 16 + size + 8 <= length:
                missed = struct.unpack_from("<Q", d, off + 16 + size)[0]
            yield (ts, cpu, "lost", missed, None)
        p = off + 16
        end = p + min(size, length - 16)
        while p + 4 <= end:
            h = u32(d, p)[0]
            tl, delta = h & 31, h >> 5
            if tl == 29:                           # padding
                if delta == 0:
                    break                          # the rest of the page
                p += 4 + u32(d, p + 4)[0]
                continue
            if tl == 30:                           # time extend
                ts += delta + (u32(d, p + 4)[0] << 27)
                p += 8
                continue
            if tl == 31:                           # absolute time stamp
                abs_ts = delta + (u32(d, p + 4)[0] << 27)
                ts = abs_ts | (ts & ~((1 << 59) - 1))
                p += 8
                continue
            ts += delta
            if tl == 0:
                n = u32(d, p + 4)[0] - 4
                q = p + 8
            else:
                n = tl * 4
                q = p + 4
            p = q + n
            eid = u16(d, q)[0]
            kd = dec.get(eid)
            if kd is None:
                continue
            kind, get = kd
            if get is None:
                yield (ts, cpu, kind, None, None)
            elif kind == "rcvret":
                r, c = get(d, q)
                yield (ts, cpu, kind, r, c)
            elif kind == "mark":
                yield (ts, cpu, kind, get(d, q, n), None)
            else:
                yield (ts, cpu, kind, get(d, q), None)


def raw_events(rt: RawTrace) -> Iterator[tuple[Any, ...]]:
    """Every CPU's events, merged in counter order."""
    dec = _decoders(rt.header)
    return heapq.merge(*(_cpu_events(rt, c, dec) for c in sorted(rt.pages)), key=lambda e: e[0])


def trim(path: Path, out: Path, lo: int, hi: int) -> int:
    """Write the pages of a raw trace that hold events in [lo, hi] to out (a
    smaller raw trace, e.g. the flight recorder around a hit); returns pages kept."""
    rt = read_raw(path)
    dec = _decoders(rt.header)
    kept = 0
    opener: Any = gzip.open if str(out).endswith(".gz") else open
    with opener(out, "wb") as f:
        f.write(RAW_MAGIC)
        head = json.dumps(rt.header).encode()
        f.write(_REC.pack(b"HEAD", 0, len(head)) + head)
        for cpu, pages in sorted(rt.pages.items()):
            for off, length in pages:
                ts = [e[0] for e in _cpu_events(rt, cpu, dec, [(off, length)]) if e[2] != "lost"]
                if ts and ts[-1] >= lo and ts[0] <= hi:
                    f.write(_REC.pack(b"PAGE", cpu, length) + bytes(rt.buf[off:off + length]))
                    kept += 1
        tail = json.dumps({**rt.tail, "trimmed": [lo, hi]}).encode()
        f.write(_REC.pack(b"TAIL", 0, len(tail)) + tail)
    return kept


def _open_text(path: Path) -> Any:
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", errors="replace")
    return open(path, errors="replace")


def is_raw(path: Path) -> bool:
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            return f.read(len(RAW_MAGIC)) == RAW_MAGIC
    except OSError:
        return False
