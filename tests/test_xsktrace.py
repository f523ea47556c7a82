"""csrc/xsktrace.c, the guest's trace scanner, against lab.evidence's analysis of the same raw trace.

No root, no VM: real raw traces from guests (tests/fixtures/trace/*raw*.trace.gz, unpacked: the
scanner reads plain files only) and synthetic ones built here with the ring-buffer layout
rawtrace._cpu_events() decodes (two CPUs interleaving, a page with the missed-events flag,
equal timestamps, time extends, padding)."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from lab import dataplane as dpbuild
from lab.agent import dataplane as dp
from lab import evidence
from lab.agent import tracer

FIXTURES = Path(__file__).parent / "fixtures" / "trace"
RAW_FIXTURES = sorted(FIXTURES.glob("*raw*.trace.gz"))
# what the scanner reports, named like Analysis.to_dict() (first_ts/last_ts: the Analysis' own)
FIELDS = ("receives", "failed_receives", "flushes", "window_hits", "unflushed_hits", "overlap_hits",
          "sockets", "cpus", "lost", "gaps", "retracted", "dropped", "kprobe_missed", "outcomes_traced",
          "trace_clock", "first_ts", "last_ts", "span_s", "first_hit_ts", "first_overlap_ts",
          "first_hit_s", "first_overlap_s", "violation_ts", "hits_before_violation",
          "overlaps_before_violation", "recorder_s")


@pytest.fixture(scope="module")
def xsktrace() -> Path:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("needs gcc and make: apt-get install build-essential")
    return dpbuild.build() / "xsktrace"


def scan(binary: Path, path: Path) -> dict:
    p = subprocess.run([str(binary), str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    return json.loads(lines[0])


def python_view(path: Path) -> dict:
    a = evidence.analyze_raw(path)
    return {**a.to_dict(), "first_ts": a.first_ts, "last_ts": a.last_ts,
            "marks_count": len(a.marks), "clock_marks": None}


def assert_same(binary: Path, path: Path) -> tuple[dict, dict]:
    c, p = scan(binary, path), python_view(path)
    differ = {k: (c.get(k), p[k]) for k in FIELDS if c.get(k) != p[k]}
    assert not differ, f"{path.name}: scanner vs Python (field: (C, Python)): {differ}"
    assert c["marks"] == p["marks_count"]
    assert c["violation"] == (p["violation_ts"] is not None)
    assert c["hits_upper_bound"] is False
    return c, p


def unpack(gz: Path, tmp_path: Path) -> Path:
    out = tmp_path / gz.name.removesuffix(".gz")
    out.write_bytes(gzip.decompress(gz.read_bytes()))
    return out


def test_the_scanner_is_built_and_shipped():
    assert "xsktrace" in dp.BINARIES      # lab.image ships every one of them into the guest
    assert "$(OUT)/xsktrace" in (dpbuild.source_dir() / "Makefile").read_text()


@pytest.mark.parametrize("gz", RAW_FIXTURES, ids=[p.name for p in RAW_FIXTURES])
def test_real_guest_traces_count_like_python(xsktrace, gz, tmp_path):
    assert_same(xsktrace, unpack(gz, tmp_path))


def test_the_fixtures_cover_clean_hits_and_a_violation(xsktrace, tmp_path):
    """The real traces above are not all alike: a clean fixed control and an affected kernel's
    flight recorder (hits, then the checker's violation marker) are among them."""
    fixed = scan(xsktrace, unpack(FIXTURES / "generic-fixed-6.1-vm-raw.trace.gz", tmp_path))
    assert fixed["receives"] > 5000 and fixed["overlap_hits"] == 0 and fixed["unflushed_hits"] == 0
    assert fixed["clock_marks"] >= 2 and fixed["span_s"] > 0.5 and not fixed["violation"]
    bad = scan(xsktrace, unpack(FIXTURES / "generic-reverted-6.1-vm-violation-raw.trace.gz", tmp_path))
    assert bad["violation"] and bad["overlap_hits"] > 0 and bad["unflushed_hits"] > 0
    assert bad["hits_before_violation"] == bad["unflushed_hits"] and bad["recorder_s"]


def test_a_truncated_trace_counts_its_whole_records(xsktrace, tmp_path):
    src = unpack(FIXTURES / "generic-fixed-6.1-vm-raw.trace.gz", tmp_path)
    cut = tmp_path / "cut.trace"
    data = src.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    c, p = assert_same(xsktrace, cut)
    assert c["tail"] is False and "without its tail record" in " ".join(p["analysis_notes"])


def test_not_a_raw_trace_is_refused(xsktrace, tmp_path):
    f = tmp_path / "text.trace"
    f.write_text("# tracer: nop\n")
    p = subprocess.run([str(xsktrace), str(f)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "not a racelab raw trace" in p.stderr
    p = subprocess.run([str(xsktrace)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "usage" in p.stderr


# ------------------------------------------------------------------ synthetic traces

S1, S2 = 0xFFFF888004A1C000, 0xFFFF888004A1D000
IDS = {"rcv": 547, "rcvret": 548, "flush": 550, "mark": 5}
COMMON = {"common_type": [0, 2, False], "common_flags": [2, 1, False],
          "common_preempt_count": [3, 1, False], "common_pid": [4, 4, True]}
GENERIC_RCV_LO, GENERIC_RCV_HI = 0xFFFFFFFF81A00000, 0xFFFFFFFF81A00100
HEAD = {"page_size": 4096, "cpus": [0, 1, 2], "clock": "counter",
        "callers": {"xsk_generic_rcv": [GENERIC_RCV_LO, GENERIC_RCV_HI]},
        "events": {str(IDS["rcv"]): {"name": "rcv", "fields": {**COMMON, "__probe_ip": [8, 8, False],
                                                                "xs": [16, 8, False]}},
                   str(IDS["rcvret"]): {"name": "rcvret", "fields": {
                       **COMMON, "__probe_func": [8, 8, False], "__probe_ret_ip": [16, 8, False],
                       "ret": [24, 4, True]}},
                   str(IDS["flush"]): {"name": "flush", "fields": {**COMMON, "__probe_ip": [8, 8, False],
                                                                    "xs": [16, 8, False]}},
                   str(IDS["mark"]): {"name": "mark", "fields": {**COMMON, "ip": [8, 8, False],
                                                                  "buf": [16, 0, True]}}}}
TAIL = {"kprobe_profile": {"rcv": [10, 0], "rcvret": [10, 0], "flush": [3, 0]},
        "stats": {"0": {"dropped events": "0"}, "1": {"dropped events": "0"}}}


def ev(kind: str, value=None, caller_ip: int = 0x1234) -> bytes:
    """One event's data (after the ring-buffer header), laid out as HEAD says."""
    common = struct.pack("<HBBi", IDS[kind], 0, 0, 1)
    if kind in ("rcv", "flush"):
        return common + struct.pack("<QQ", 0xFFFFFFFF81000000, value)
    if kind == "rcvret":
        return common + struct.pack("<QQi", 0xFFFFFFFF81000000, caller_ip, value) + b"\0" * 4
    if kind == "mark":
        return common + struct.pack("<Q", 0) + value.encode() + b"\n\0"
    raise ValueError(kind)


def page(ts0: int, events: list[tuple[int, bytes]], missed: int | None = None, padding: bool = False,
         absolute_at: int | None = None) -> bytes:
    """A ring-buffer page as trace_pipe_raw gives it: header (time stamp, commit), then events
    with time deltas (a time extend when the delta does not fit 27 bits; tl 0 with an explicit
    length for data longer than 112 bytes or not a multiple of 4)."""
    body, ts = b"", ts0
    for i, (t, data) in enumerate(events):
        if i == absolute_at:
            body += struct.pack("<II", 31 | ((t & ((1 << 27) - 1)) << 5), t >> 27)
            ts, delta = t, 0
        else:
            delta = t - ts
        if delta >= 1 << 27:
            body += struct.pack("<II", 30 | ((delta & ((1 << 27) - 1)) << 5), delta >> 27)
            delta = 0
        ts = t
        if len(data) % 4 == 0 and len(data) <= 112:
            body += struct.pack("<I", len(data) // 4 | delta << 5) + data
        else:
            padded = data + b"\0" * (-len(data) % 4)
            body += struct.pack("<II", delta << 5, len(padded) + 4) + padded
    if padding:
        body += struct.pack("<II", 29 | (1 << 5), 8) + b"\0" * 4     # padding with a length
        body += struct.pack("<I", 29)                              # the rest of the page
    commit = len(body)
    tail = b""
    if missed is not None:
        commit |= tracer._RB_MISSED_EVENTS | tracer._RB_MISSED_STORED
        tail = struct.pack("<Q", missed)
    return struct.pack("<Qq", ts0, commit) + body + tail


def write_trace(path: Path, pages: list[tuple[int, bytes]], head: dict | None = None,
                tail: dict | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(tracer.RAW_MAGIC)
        for tag, cpu, payload in [(b"HEAD", 0, json.dumps(head or HEAD).encode()),
                                  *[(b"PAGE", c, p) for c, p in pages],
                                  (b"TAIL", 0, json.dumps(TAIL if tail is None else tail).encode())]:
            f.write(tracer._REC.pack(tag, cpu, len(payload)) + payload)
    return path


def clock(ts: int, s: float) -> tuple[int, bytes]:
    return ts, ev("mark", f"{tracer.CLOCK_MARK} {s:.6f}")


def test_two_cpus_inside_one_socket_are_hits(xsktrace, tmp_path):
    """cpu1 receives into S while cpu0 is inside a receive into S (an overlap), and both succeed:
    cpu1's receive also interleaved with cpu0's unflushed one.  The scanner must see both."""
    t = write_trace(tmp_path / "overlap.trace", [
        (0, page(100, [clock(100, 1.0), (110, ev("rcv", S1)), (130, ev("rcvret", 0)),
                       clock(200, 1.1), (210, ev("flush", S1))])),
        (1, page(105, [(120, ev("rcv", S1)), (140, ev("rcvret", 0)), (220, ev("rcv", S2)),
                       (230, ev("rcvret", -105))])),
    ])
    c, p = assert_same(xsktrace, t)
    assert c["overlap_hits"] == 1 and c["unflushed_hits"] == 1 and c["failed_receives"] == 1
    assert c["sockets"] == 2 and c["cpus"] == [0, 1] and c["first_hit_ts"] == 120
    assert c["first_hit_s"] == p["first_hit_s"] is not None and c["span_s"] == p["span_s"] == 0.09


def test_a_lost_events_page_is_a_gap_and_withdraws_its_hits(xsktrace, tmp_path):
    """cpu0's second page says the ring buffer overwrote 5 events before it: the hits that relied on
    cpu0 after its last saved event are withdrawn (exactly, like the Python analysis)."""
    t = write_trace(tmp_path / "lost.trace", [
        (0, page(100, [(110, ev("rcv", S1))])),
        (1, page(105, [(120, ev("rcv", S1)), (140, ev("rcvret", 0))])),
        (0, page(150, [(160, ev("rcvret", 0)), (170, ev("rcv", S1))], missed=5)),
        (1, page(180, [(190, ev("rcv", S1)), (200, ev("rcvret", 0))])),
    ])
    c, _ = assert_same(xsktrace, t)
    assert c["lost"] == 5 and c["gaps"] == 1 and c["retracted"] == 2
    # after the gap: cpu1's receive at 190 began inside cpu0's (170), and cpu0's, closed at the
    # end of the trace, held S while cpu1's receive at 120 was still unflushed
    assert c["overlap_hits"] == 1 and c["unflushed_hits"] == 2


def test_a_lost_page_without_a_count_is_still_a_gap(xsktrace, tmp_path):
    body = page(100, [(110, ev("rcv", S1)), (120, ev("rcvret", 0))])
    commit = struct.unpack_from("<q", body, 8)[0] | tracer._RB_MISSED_EVENTS
    body = body[:8] + struct.pack("<q", commit) + body[16:]
    c, _ = assert_same(xsktrace, write_trace(tmp_path / "lost-unknown.trace", [(0, body)]))
    assert c["gaps"] == 1 and c["lost"] == 0


def test_equal_timestamps_merge_like_heapq(xsktrace, tmp_path):
    """cpu0's return and cpu1's receive share a time stamp: the lower CPU goes first (heapq.merge's
    order), so cpu1's receive follows a finished receive (an unflushed hit, no overlap).  The other
    order would make it an overlap too."""
    t = write_trace(tmp_path / "tie.trace", [
        (1, page(5, [(10, ev("rcv", S1)), (20, ev("rcvret", 0))])),
        (0, page(4, [(5, ev("rcv", S1)), (10, ev("rcvret", 0))])),
    ])
    c, _ = assert_same(xsktrace, t)
    assert c["overlap_hits"] == 0 and c["unflushed_hits"] == 1


def test_self_flushing_caller_time_extends_absolute_stamps_and_padding(xsktrace, tmp_path):
    big = 1 << 30
    t = write_trace(tmp_path / "decode.trace", [
        (0, page(10, [clock(10, 5.0), (20, ev("rcv", S1)),
                      (30, ev("rcvret", 0, caller_ip=GENERIC_RCV_LO + 8)),   # flushed by its caller
                      (big + 40, ev("rcv", S1)), (big + 50, ev("rcvret", 0)),
                      clock(big + 60, 6.0)], padding=True)),
        (1, page(15, [(35, ev("rcv", S1)), (36, ev("rcvret", 0)),
                      (big + 45, ev("rcv", S1)), (big + 55, ev("rcvret", 0)),
                      (big + 70, ev("mark", "racelab violation kind=order"))], absolute_at=2)),
    ])
    c, p = assert_same(xsktrace, t)
    # 35: cpu0's receive at 20 was flushed by xsk_generic_rcv: no hit; big+40: cpu1's from 35
    # unflushed; big+45: inside cpu0's
    assert c["overlap_hits"] == 1 and c["unflushed_hits"] == 2 and c["first_hit_ts"] == big + 40
    assert c["violation"] and c["violation_ts"] == big + 70 and c["recorder_s"] == p["recorder_s"] != {}
    assert c["last_ts"] == big + 70 and c["marks"] == 1 and c["clock_marks"] == 2


def test_tail_counts_and_clock(xsktrace, tmp_path):
    tail = {"kprobe_profile": {"rcv": [10, 2], "rcvret": [10, 1]},
            "stats": {"0": {"dropped events": "4"}, "1": {"dropped events": "x"}}}
    head = {**HEAD, "clock": "global"}
    c, _ = assert_same(xsktrace, write_trace(tmp_path / "tail.trace",
                                             [(0, page(1, [(2, ev("rcv", S1))]))], head=head, tail=tail))
    assert c["kprobe_missed"] == 3 and c["dropped"] == 4 and c["trace_clock"] == "global"
    head = {k: v for k, v in HEAD.items() if k != "clock"}
    c, _ = assert_same(xsktrace, write_trace(tmp_path / "noclock.trace", [], head=head, tail={}))
    assert c["trace_clock"] == "counter" and c["first_ts"] is None and c["cpus"] == []


# ------------------------------------------------------------------ the guest summary, on the host

def _agent_ev(trace: Path, **extra) -> dict:
    """The evidence event's fields the merge reads (what Tracer.collect() says), for a raw trace."""
    return {"available": True, "trace_path": str(trace), "measure": "overlap_hits", "note": "",
            "kprobe_missed": 0, "format": "raw", "recorder_wanted_s": tracer.RECORDER_MIN_S, **extra}


@pytest.mark.parametrize("gz", RAW_FIXTURES, ids=[p.name for p in RAW_FIXTURES])
def test_a_summary_merges_like_the_trace_it_describes(xsktrace, gz, tmp_path):
    """For every trace the guest would keep, the merged evidence (what summary.json, the verdicts and
    the report read) is the same from the scanner's summary as from the host's analysis."""
    trace = unpack(gz, tmp_path)
    g = tracer.guest_scan(trace, xsktrace)
    s = g["guest_analysis"]
    assert g["trace_needed"] == bool(tracer.transfer_reasons(s))
    host, guest = _agent_ev(trace), _agent_ev(trace)
    evidence.merge(host, evidence.analyze_file(trace))
    if g["trace_needed"]:     # and the host has something to show from it that no summary holds
        assert host["interleaving"] and host["examples"] + host["overlap_examples"], gz.name
        return
    host, guest = _agent_ev(trace), _agent_ev(trace)
    evidence.merge(host, evidence.analyze_file(trace))
    evidence.merge(guest, evidence.analysis_from_summary(s))
    assert guest == host
    assert evidence.recorder_check(guest, False) == evidence.recorder_check(host, False) == []


def test_what_the_guest_keeps_and_what_it_sends(xsktrace, tmp_path):
    clean = tracer.guest_scan(unpack(FIXTURES / "generic-fixed-6.1-vm-raw.trace.gz", tmp_path), xsktrace)
    assert clean["trace_needed"] is False and clean["trace_needed_why"] == []
    assert clean["guest_analysis"]["wall_seconds"] >= clean["guest_analysis"]["seconds"] >= 0
    bad = tracer.guest_scan(unpack(FIXTURES / "generic-reverted-6.1-vm-violation-raw.trace.gz", tmp_path),
                              xsktrace)
    assert bad["trace_needed"] and "window hits" in bad["trace_needed_why"]
    assert "checker marks (a violation)" in bad["trace_needed_why"]
    lost = write_trace(tmp_path / "lost.trace", [(0, page(1, [(2, ev("rcv", S1))], missed=3))])
    assert tracer.guest_scan(lost, xsktrace)["trace_needed_why"] == ["lost events"]


def test_a_missing_or_failing_scanner_sends_the_trace(xsktrace, tmp_path):
    trace = unpack(FIXTURES / "generic-fixed-6.1-vm-raw.trace.gz", tmp_path)
    g = tracer.guest_scan(trace, tmp_path / "nowhere" / "xsktrace")
    assert "trace_needed" not in g and "goes to the host" in g["guest_analysis_note"]
    text = tmp_path / "text.trace"
    text.write_text("# tracer: nop\n")
    g = tracer.guest_scan(text, xsktrace)
    assert "trace_needed" not in g and "xsktrace failed (xsktrace exit 2" in g["guest_analysis_note"]


def _result(trace: Path, g: dict):
    from lab.workload import TargetResult
    return TargetResult(label="vm-0", kernel="6.1.192", evidence=_agent_ev(trace, **g))


def test_fetch_evidence_keeps_a_clean_trace_in_the_guest(xsktrace, tmp_path):
    from lab.host import LocalHost
    from lab.workload import fetch_evidence

    guest = tmp_path / "guest"
    guest.mkdir()
    trace = unpack(FIXTURES / "generic-fixed-6.1-vm-raw.trace.gz", guest)
    res = _result(trace, tracer.guest_scan(trace, xsktrace))
    trace.unlink()          # the host never reads it: fetching it would fail now
    fetch_evidence(LocalHost(), res, tmp_path / "out")
    e = res.evidence
    assert e["analysed_in"] == "guest" and e["trace_file"] is None and "trace_path" not in e
    assert e["guest_trace_path"] == str(trace) and not (tmp_path / "out" / "evidence").exists()
    assert e["available"] and e["window_hits"] == 0 and e["receives"] == 6531 and e["span_s"] == 0.9925
    assert e["analysis_seconds"] == e["guest_analysis"]["seconds"] and res.notes == []


def test_fetch_evidence_moves_a_trace_with_hits(xsktrace, tmp_path):
    from lab.host import LocalHost
    from lab.workload import fetch_evidence

    trace = unpack(FIXTURES / "generic-reverted-6.1-vm-violation-raw.trace.gz", tmp_path)
    res = _result(trace, tracer.guest_scan(trace, xsktrace))
    res.by_kind = {"order": 1}
    fetch_evidence(LocalHost(), res, tmp_path / "out")
    e = res.evidence
    assert e["analysed_in"] == "host" and Path(e["trace_file"]).is_file()
    assert not trace.exists(), "on this machine (netns backend) the agent's trace file is removed"
    assert e["window_hits"] == e["guest_analysis"]["overlap_hits"] == 316
    assert e["interleaving_focus"] == "violation" and e["violation_mark"].startswith("racelab violation")


def test_a_late_cpu_is_covered_from_the_traces_start(xsktrace, tmp_path):
    """cpu1 first receives just before the marker: it was covered from the trace's start, as
    lab.evidence counts it (the gap case: test_evidence_recorder's short recorder)."""
    t = write_trace(tmp_path / "late.trace", [
        (0, page(10, [clock(10, 1.0), (20, ev("rcv", S1)), (30, ev("rcvret", 0)), (40, ev("flush", S1)),
                      clock(1010, 2.0)])),
        (1, page(990, [(995, ev("rcv", S1)), (996, ev("rcvret", 0)),
                       (1000, ev("mark", "racelab violation kind=order"))])),
    ])
    c, p = assert_same(xsktrace, t)
    assert c["recorder_s"] == p["recorder_s"] and set(c["recorder_s"]) == {"0", "1"}
    assert abs(c["recorder_s"]["1"] - c["recorder_s"]["0"]) < 1e-3 and c["recorder_s"]["1"] > 0.9
