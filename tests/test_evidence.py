import re
import struct
from pathlib import Path

import pytest

from lab import evidence

from lab.agent import tracer

FIX = Path(__file__).parent / "fixtures" / "trace"


def _blind(events, outcomes=False, callers=False):
    """Analyse events the way the old detector did: receive results (and callers) ignored."""
    an = evidence._Analyzer()
    for e in events:
        if e[2] == "rcvret":
            e = (e[0], e[1], e[2], e[3] if outcomes else None, e[4] if callers else None)
        an.feed(e)
    return an.finish()


# --- synthetic text traces ---------------------------------------------------------

def test_interleaving_is_flagged():
    a = evidence.analyze_file(FIX / "veth-interleaved.trace")
    assert a.receives == 5 and a.flushes == 2
    # ts 1003: CPU1 receives while CPU0 holds two unflushed receives into the same socket
    assert a.window_hits == 1
    assert a.examples[0]["cpu"] == 1 and a.examples[0]["unflushed_on"] == {0: 2}
    assert a.first_hit_ts == 1003
    assert a.marks and '"kind":"order"' in a.marks[0]
    # no return probe in this trace: outcomes unknown, so the count is not evidence
    assert not a.outcomes and any("outcomes not traced" in n for n in a.window_problems())
    assert a.to_dict()["window_available"] is False


def test_serialised_receives_are_clean():
    a = evidence.analyze_file(FIX / "veth-serialised.trace")
    assert a.receives == 5 and a.flushes == 3
    assert a.window_hits == 0 and a.cpus == {0, 1}
    # two sockets receiving on different CPUs at once is not the race
    assert a.sockets == 2


def test_out_of_order_lines_are_sorted_by_counter():
    lines = [
        "  a-1 [001] ..s1. 12: flush: (xsk_flush+0x0/0x60) xs=0x10",
        "  a-1 [001] ..s1. 10: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  b-2 [000] ..s1. 11: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
    ]
    assert evidence.analyze(lines).window_hits == 1
    assert evidence.analyze(sorted(lines, key=lambda line: int(line.split()[3][:-1]))).window_hits == 1


def test_clock_name_parsing():
    assert tracer._current_clock("local [counter] global uptime") == "counter"
    assert tracer._buffer_kb("7 (expanded: 1408)\n") == "1408"
    assert tracer._buffer_kb("2048\n") == "2048"


def test_flushall_clears_every_socket_of_its_cpu():
    lines = [
        "  a-1 [000] ..s1. 1: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 2: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x20",
        "  a-1 [000] ..s1. 3: flushall: (__xsk_map_flush+0x0/0x1)",
        "  b-2 [001] ..s1. 4: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x10",
        "  b-2 [001] ..s1. 5: rcv: (__xsk_rcv_zc+0x0/0x1) xs=0x20",
    ]
    assert evidence.analyze(lines).window_hits == 0
    assert evidence.analyze(lines[:2] + lines[3:]).window_hits == 2


def test_overlap_inside_receive_for_the_generic_race():
    lines = [
        "  a-1 [000] ..s1. 1: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  b-2 [001] ..s1. 2: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",     # CPU0 still inside: overlap
        "  a-1 [000] ..s1. 3: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  b-2 [001] ..s1. 4: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  a-1 [000] ..s1. 5: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",     # nobody inside: serialised
        "  a-1 [000] ..s1. 6: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  b-2 [001] ..s1. 7: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",     # CPU0's receives were flushed by its caller
        "  b-2 [001] ..s1. 8: rcvret: (xsk_generic_rcv+0x5/0x1 <- __xsk_rcv)",
        "  a-1 [000] ..s1. 9: rcv: (__xsk_rcv+0x0/0x1) xs=0x20",     # another socket: not the race
    ]
    a = evidence.analyze(lines)
    assert a.overlap_hits == 1 and a.receives == 5
    assert a.overlap_examples[0]["inside_on"] == {0: 1}
    # the only unflushed interleaving is the overlap itself (CPU0 inside its receive)
    assert a.window_hits == 1 and a.first_hit_ts == 2
    assert evidence.window_measure("generic-rx-race") == "overlap_hits"
    assert evidence.window_measure("veth-napi-race") == "unflushed_hits"


def test_events_before_every_cpu_has_data_are_ignored():
    # CPU0's buffer wrapped: its flush at ts 1 is gone, so CPU1's early events look unflushed
    lines = [
        "# entries-in-buffer/entries-written: 4/9   #P:2",
        "  b-2 [001] ..s1. 2: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 3: rcv: (__xsk_rcv+0x0/0x1) xs=0x10",
        "  a-1 [000] ..s1. 4: flushall: (__xsk_map_flush+0x0/0x1)",
        "  b-2 [001] ..s1. 5: flushall: (__xsk_map_flush+0x0/0x1)",
    ]
    a = evidence.analyze(lines)
    assert a.window_hits == 0 and a.skipped == 1 and a.lost == 5
    # nothing lost: everything counts
    assert evidence.analyze(lines[1:]).window_hits == 1


RCV = "  x-1 [{c:03d}] ..s1. {t}: rcv: (__xsk_rcv+0x0/0xd0) xs=0x10"
RET = "  x-1 [{c:03d}] ..s1. {t}: rcvret: (__xsk_map_redirect+0x74/0xf0 <- __xsk_rcv) ret={r}"
FLUSH = "  x-1 [{c:03d}] ..s1. {t}: flushall: (__xsk_map_flush+0x0/0xb0)"


def _rx(c, t, r):
    return [RCV.format(c=c, t=t), RET.format(c=c, t=t + 1, r=r)]


def test_failed_receives_hold_nothing():
    # CPU0's poll only drops (-ENOMEM: FILL ring empty): veth_poll() then skips
    # xdp_do_flush(), so no flush follows; CPU1 takes the NAPI next
    lines = _rx(0, 1, -12) + _rx(0, 3, -12) + _rx(1, 10, 0) + _rx(1, 12, 0) + [FLUSH.format(c=1, t=14)]
    a = evidence.analyze(lines)
    assert a.window_hits == 0 and a.failed == 2 and a.receives == 4 and a.outcomes
    # the same trace read without outcomes: two false hits, as the old detector reported
    assert evidence.analyze([re.sub(r" ret=-?\d+", "", line) for line in lines]).window_hits == 2


def test_successful_unflushed_receive_is_held():
    lines = _rx(0, 1, 0) + _rx(0, 3, -12) + _rx(1, 10, 0) + _rx(1, 12, -105)
    a = evidence.analyze(lines)
    # CPU1's first receive succeeded while CPU0 held one: a hit; its second failed: none
    assert a.window_hits == 1 and a.examples[0] == {"ts": 10, "cpu": 1, "socket": "0x10", "unflushed_on": {0: 1}}


def test_flush_inside_the_other_receive_still_counts():
    # the flush lands between CPU1's receive entry and return: the dangerous case
    lines = [RCV.format(c=0, t=1), RET.format(c=0, t=2, r=0), RCV.format(c=1, t=3),
             FLUSH.format(c=0, t=4), RET.format(c=1, t=5, r=0)]
    assert evidence.analyze(lines).window_hits == 1


def test_lost_events_line_withdraws_hits_that_relied_on_the_cpu():
    lines = _rx(0, 1, 0) + [
        "CPU:0 [LOST 7 EVENTS]",
        FLUSH.format(c=0, t=20)] + _rx(1, 10, 0)
    a = evidence.analyze(lines)
    # CPU0's flush may be among the lost events: CPU1's receive at ts 10 is not evidence
    assert a.window_hits == 0 and a.retracted == 1 and a.gaps == 1 and a.lost == 7


# --- real traces (fixtures) -----------------------------------------------------------

def test_real_fixed_kernel_trace_gives_no_false_hits():
    path = FIX / "veth-fixed-failed-receives.trace"
    a = evidence.analyze_file(path)
    assert a.receives == 320 and a.failed == 1 and a.window_hits == 0 and a.overlap_hits == 0
    # the old detector, which counted the failed receive as held: 319 false hits
    old = evidence.analyze([re.sub(r" ret=-?\d+", "", line) for line in path.read_text().splitlines()])
    assert old.window_hits == 319


def _napi_state(lines):
    """Per counter value: which CPUs are past napi_complete_done but before their flush."""
    ev = sorted((int(m.group(2)), int(m.group(1)), m.group(3)) for m in
                (re.search(r"\[(\d+)\]\s+\S+\s+(\d+):\s+(\w+):", line) for line in lines) if m)
    state, at = {}, {}
    for ts, cpu, kind in ev:
        if kind == "ncd":
            state[cpu] = "completed"
        elif kind in ("xdpflush", "flushall", "poll"):
            state[cpu] = None
        at[ts] = dict(state)
    return at


def test_real_reverted_kernel_trace_hits_are_the_fixed_ordering():
    lines = (FIX / "veth-reverted-napi.trace").read_text().splitlines()
    a = evidence.analyze(lines, max_examples=100)
    assert a.window_hits == 14 and a.failed == 120 and a.overlap_hits == 0
    # ground truth from the veth_poll / napi_complete_done / xdp_do_flush probes in the
    # fixture: every hit happens while its holder has completed NAPI but not flushed yet,
    # the order fa349e396e48 swapped
    at = _napi_state(lines)
    for ex in a.examples:
        for holder in ex["unflushed_on"]:
            assert at[ex["ts"]].get(holder) == "completed", ex


def test_real_raw_traces_veth():
    fixed = evidence.analyze_file(FIX / "veth-fixed-raw.trace.gz")
    assert fixed.format == "raw" and fixed.outcomes
    assert fixed.receives == 1559 and fixed.failed == 282 and fixed.window_hits == 0
    assert fixed.gaps == 0 and fixed.kprobe_missed == 0
    assert fixed.span_s is not None and 0.3 < fixed.span_s < 0.4
    rt = evidence.read_raw(FIX / "veth-fixed-raw.trace.gz")
    assert _blind(evidence.raw_events(rt)).window_hits > 0      # what the old detector saw
    rev = evidence.analyze_file(FIX / "veth-reverted-raw.trace.gz")
    assert rev.window_hits == 56 and rev.first_hit_ts == 37919 and rev.overlap_hits == 0


def test_real_raw_traces_generic():
    fixed = evidence.analyze_file(FIX / "generic-fixed-raw.trace.gz")
    assert fixed.receives > 1000 and fixed.flushes == 0
    assert fixed.overlap_hits == 0 and fixed.window_hits == 0
    # xsk_generic_rcv() flushes its receive itself: without that rule every receive would stay held
    rt = evidence.read_raw(FIX / "generic-fixed-raw.trace.gz")
    assert _blind(evidence.raw_events(rt), outcomes=True).window_hits > 0
    rev = evidence.analyze_file(FIX / "generic-reverted-raw.trace.gz")
    assert rev.overlap_hits == 183 and rev.window_hits == 49


# --- raw format ---------------------------------------------------------------------------

IDS = {"rcv": 547, "rcvret": 548, "flushall": 549, "mark": 5}
FIELDS = {
    "rcv": {"__probe_ip": [8, 8, False], "xs": [16, 8, False]},
    "rcvret": {"__probe_func": [8, 8, False], "__probe_ret_ip": [16, 8, False], "ret": [24, 4, True]},
    "flushall": {"__probe_ip": [8, 8, False]},
    "mark": {"ip": [8, 8, False], "buf": [16, 0, True]},
}


def _payload(kind, arg=None):
    p = struct.pack("<HBBi", IDS[kind], 0, 1, 99) + struct.pack("<Q", 0xffffffff81000000)
    if kind == "rcv":
        p += struct.pack("<Q", arg)
    elif kind == "rcvret":
        p += struct.pack("<Qi", arg[1], arg[0])
    elif kind == "mark":
        p += arg.encode() + b"\n\0"
    return p


def _event(delta, payload, long_form=False):
    payload += b"\0" * (-len(payload) % 4)
    if long_form or len(payload) > 112:
        return struct.pack("<II", delta << 5, len(payload) + 4) + payload
    return struct.pack("<I", (len(payload) // 4) | (delta << 5)) + payload


def _page(ts, body, missed=None):
    commit = len(body)
    tail = b""
    if missed is not None:
        commit |= 1 << 31
        if missed >= 0:
            commit |= 1 << 30
            tail = struct.pack("<Q", missed)
    return struct.pack("<Qq", ts, commit) + body + tail


def _raw(pages, callers=None):
    head = {"page_size": 4096, "cpus": [0, 1], "callers": callers or {},
            "events": {str(IDS[k]): {"name": k, "fields": FIELDS[k]} for k in IDS}}
    out = tracer.RAW_MAGIC
    for tag, cpu, data in [(b"HEAD", 0, evidence.json.dumps(head).encode())] + pages + \
            [(b"TAIL", 0, b'{"kprobe_profile": {"rcv": [9, 2]}}')]:
        out += struct.pack("<4sII", tag, cpu, len(data)) + data
    return out


def test_raw_decoder(tmp_path):
    body0 = (_event(0, _payload("mark", "racelab-clock 10.0"))
             + _event(5, _payload("rcv", 0x10))                       # ts 105
             + struct.pack("<II", 30 | (3 << 5), 1)                   # time extend: +3 + (1 << 27)
             + _event(2, _payload("rcvret", (0, 0)), long_form=True)  # ts 105 + 3 + 2**27 + 2
             + struct.pack("<II", 29 | (1 << 5), 12) + b"\0" * 8      # a discarded event (array[0] counts itself)
             + _event(1, _payload("mark", "racelab-clock 11.0")))
    body0 += struct.pack("<I", 29) + b"\xee" * 12                     # padding to the end of the page
    p = tmp_path / "t.raw"
    p.write_bytes(_raw([(b"PAGE", 0, _page(100, body0))]))
    rt = evidence.read_raw(p)
    ev = list(evidence.raw_events(rt))
    big = 105 + 3 + (1 << 27) + 2
    assert [(e[0], e[2]) for e in ev] == [(100, "mark"), (105, "rcv"), (big, "rcvret"), (big + 1, "mark")]
    assert ev[1][3] == 0x10 and ev[2][3] == 0 and ev[0][3] == "racelab-clock 10.0\n"
    a = evidence.analyze_file(p)
    assert a.receives == 1 and a.kprobe_missed == 2 and a.span_s == 1.0


def test_raw_missed_events_withdraw_hits(tmp_path):
    cpu0_a = _page(10, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0))))
    cpu1 = _page(20, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0))))
    # CPU0 lost 5 events (its flush among them, perhaps) before ts 30
    cpu0_b = _page(30, _event(0, _payload("flushall")), missed=5)
    p = tmp_path / "t.raw"
    p.write_bytes(_raw([(b"PAGE", 0, cpu0_a), (b"PAGE", 1, cpu1), (b"PAGE", 0, cpu0_b)]))
    a = evidence.analyze_file(p)
    assert a.window_hits == 0 and a.retracted == 1 and a.lost == 5 and a.gaps == 1
    p.write_bytes(_raw([(b"PAGE", 0, cpu0_a), (b"PAGE", 1, cpu1)]))
    assert evidence.analyze_file(p).window_hits == 1


def test_raw_caller_ranges(tmp_path):
    # two receives returning into xsk_generic_rcv (ret_ip inside its range): flushed there
    page0 = _page(0, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0x1050))))
    page1 = _page(5, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0x1050))))
    p = tmp_path / "t.raw"
    p.write_bytes(_raw([(b"PAGE", 0, page0), (b"PAGE", 1, page1)], callers={"xsk_generic_rcv": [0x1000, 0x1100]}))
    assert evidence.analyze_file(p).window_hits == 0
    p.write_bytes(_raw([(b"PAGE", 0, page0), (b"PAGE", 1, page1)]))
    assert evidence.analyze_file(p).window_hits == 1


def test_trim_and_dump(tmp_path):
    out = tmp_path / "cut.trace"
    assert evidence.trim(FIX / "veth-reverted-raw.trace.gz", out, 37900, 37940) > 0
    a = evidence.analyze_file(out)
    assert 0 < a.receives < 100 and a.first_hit_ts == 37919
    import io
    buf = io.StringIO()
    evidence.dump(out, around=37919, count=3, out=buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 6 and "37919: rcv: xs=0x" in lines[3]


# --- the Tracer against a stand-in tracefs -----------------------------------------------------

FORMAT = """name: {name}
ID: {id}
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

{fields}
print fmt: "x"
"""
FIELD_TEXT = {
    "rcv": ("\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
            "\tfield:u64 xs;\toffset:16;\tsize:8;\tsigned:0;\n"),
    "rcvret": ("\tfield:unsigned long __probe_func;\toffset:8;\tsize:8;\tsigned:0;\n"
               "\tfield:unsigned long __probe_ret_ip;\toffset:16;\tsize:8;\tsigned:0;\n"
               "\tfield:s32 ret;\toffset:24;\tsize:4;\tsigned:1;\n"),
    "flushall": "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n",
    "mark": ("\tfield:unsigned long ip;\toffset:8;\tsize:8;\tsigned:0;\n"
             "\tfield:char buf[];\toffset:16;\tsize:0;\tsigned:1;\n"),
}


def _fake_tracefs(root: Path, pages: dict[int, bytes]) -> None:
    (root / "options").mkdir()
    for name, text in (("trace_clock", "local [global] counter\n"), ("buffer_size_kb", "7 (expanded: 1408)\n"),
                       ("options/overwrite", "0\n"),
                       ("tracing_on", "1\n"), ("kprobe_events", ""), ("trace", ""), ("trace_marker", ""),
                       ("kprobe_profile", "  rcv  40  0\n  rcvret  40  1\n")):
        (root / name).write_text(text)
    (root / "events" / "header_page").parent.mkdir(parents=True)
    (root / "events" / "header_page").write_text(
        "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
        "\tfield: char data;\toffset:16;\tsize:4080;\tsigned:1;\n")
    for role in ("rcv", "rcvret", "flushall", "flush", "mark"):
        d = root / "events" / ("ftrace/print" if role == "mark" else f"racelab/{role}")
        d.mkdir(parents=True)
        (d / "enable").write_text("0\n")
        (d / "format").write_text(FORMAT.format(name=role, id=IDS.get(role, 550), fields=FIELD_TEXT.get(role, "")))
    for c in (0, 1):
        d = root / "per_cpu" / f"cpu{c}"
        d.mkdir(parents=True)
        (d / "trace_pipe_raw").write_bytes(pages.get(c, b""))
        (d / "stats").write_text("entries: 0\noverrun: 0\n")


def _tracer(tmp_path, monkeypatch, syms, scenario="veth-napi-race", pages=None):
    root = tmp_path / "tracefs"
    root.mkdir()
    _fake_tracefs(root, pages or {})
    monkeypatch.setattr(tracer, "trace_out", lambda: str(tmp_path / "out.trace"))
    monkeypatch.setattr(tracer, "_kallsyms", lambda names: ({s: 0x1000 * (i + 1) for i, s in enumerate(syms)},
                                                           [0x1000 * (i + 1) for i in range(len(syms))] + [0x9000]))
    monkeypatch.setattr(tracer.os, "cpu_count", lambda: 2)
    t = tracer.Tracer(evidence.trace_options(scenario))
    t.root = root
    return t, root


def test_tracer_streams_and_restores(tmp_path, monkeypatch):
    page = _page(1, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (-12, 0))))
    t, root = _tracer(tmp_path, monkeypatch, ["__xsk_rcv", "__xsk_map_flush", "xsk_generic_rcv"], pages={1: page})
    with t:
        assert (root / "trace_clock").read_text() == "counter\n"
        assert (root / "buffer_size_kb").read_text() == "4096\n"
        assert (root / "events/racelab/rcvret/enable").read_text() == "1\n"
        # a flight recorder needs overwrite on (the stand-in starts with it off)
        assert (root / "options/overwrite").read_text() == "1\n"
        ev = t.collect()
    probes = (root / "kprobe_events").read_text().splitlines()
    assert probes[:3] == ["p:racelab/rcv __xsk_rcv xs=%di:x64", "r:racelab/rcvret __xsk_rcv ret=$retval:s32",
                          "p:racelab/flushall __xsk_map_flush"]
    assert "-:racelab/rcv" in probes and "-:racelab/flushall" in probes
    # restored on exit
    assert (root / "trace_clock").read_text() == "global\n"
    assert (root / "buffer_size_kb").read_text() == "1408\n"
    assert (root / "tracing_on").read_text() == "1\n"
    assert (root / "options/overwrite").read_text() == "0\n"
    assert ev["available"] and ev["format"] == "raw" and ev["measure"] == "unflushed_hits" and ev["note"] == ""
    a = evidence.analyze_file(Path(ev["trace_path"]))
    assert a.receives == 1 and a.failed == 1 and a.kprobe_missed == 1
    rt = evidence.read_raw(Path(ev["trace_path"]))
    assert rt.header["callers"] == {"xsk_generic_rcv": [0x3000, 0x9000]}
    assert rt.header["clock"] == "counter"
    # the stand-in's kprobe_profile has a missed return: not evidence
    assert ev["kprobe_missed"] == 1
    evidence.merge(ev, a)
    assert not ev["available"] and "kprobes missed 1" in ev["note"] and "window_hits" not in ev


def test_tracer_names_a_missing_flush_probe(tmp_path, monkeypatch):
    t, _ = _tracer(tmp_path, monkeypatch, ["__xsk_rcv"])
    with t:
        ev = t.collect()
    # veth needs the flush: unavailable, and the note says why
    assert not ev["available"] and "no flush probe" in ev["note"]
    assert any("none of xsk_flush, __xsk_map_flush" in m for m in ev["missing"])
    (tmp_path / "g").mkdir()
    t, _ = _tracer(tmp_path / "g", monkeypatch, ["__xsk_rcv"], scenario="generic-rx-race")
    with t:
        ev = t.collect()
    # the generic race's overlap measure needs only the receive probe
    assert ev["available"] and "none of xsk_flush" in ev["note"]


def test_tracer_without_a_receive_probe(tmp_path, monkeypatch):
    t, root = _tracer(tmp_path, monkeypatch, ["__xsk_map_flush"])
    with t:
        ev = t.collect()
    assert not ev["available"] and "rcv: none of __xsk_rcv" in ev["note"]
    assert (root / "kprobe_events").read_text() == ""     # nothing set up, nothing to undo


@pytest.mark.parametrize("name", ["veth-interleaved.trace", "veth-fixed-raw.trace.gz"])
def test_cli_analyze(name, capsys):
    assert evidence.main(["analyze", str(FIX / name)]) == 0
    assert '"unflushed_hits"' in capsys.readouterr().out


def test_streamer_cap_keeps_the_last_events(tmp_path):
    # past the cap the streamer stops reading: the ring buffer keeps the last
    # events (its reader then sees a missed-events page) and finish() saves them
    root = tmp_path / "tracefs"
    root.mkdir()
    first = _page(1, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0))))
    last = _page(50, _event(0, _payload("flushall")), missed=9)
    _fake_tracefs(root, {0: first + b"\0" * (4096 - len(first)) + last})
    head = {"page_size": 4096, "events": {str(IDS[k]): {"name": k, "fields": FIELDS[k]} for k in IDS}}
    s = tracer._Streamer(root, tmp_path / "out.trace", [0, 1], head, cap_bytes=1, page_size=4096)
    s.drain()
    assert s.pages == 1 and s.capped_at is not None
    s.drain()
    assert s.pages == 1                       # capped: nothing more until finish()
    s.finish({"kprobe_profile": {}})
    assert s.pages == 2
    a = evidence.analyze_file(tmp_path / "out.trace")
    assert a.receives == 1 and a.flushes == 1 and a.gaps == 1 and a.lost == 9


# --- when the window count is not evidence ---------------------------------------------------

def _merged(lines_or_path, **agent):
    """What fetch_evidence() makes of a trace: the agent's evidence merged with the analysis."""
    ev = {"available": True, "measure": "unflushed_hits", "note": "", **agent}
    a = (evidence.analyze_file(lines_or_path) if isinstance(lines_or_path, Path)
         else evidence.analyze(lines_or_path))
    evidence.merge(ev, a)
    return ev, a


def test_a_clean_complete_trace_is_evidence_both_ways():
    ev, _ = _merged(FIX / "veth-reverted-napi.trace")
    assert ev["available"] and ev["window_hits"] == 14 and ev["window_problems"] == []
    ev, _ = _merged(FIX / "veth-fixed-failed-receives.trace")
    assert ev["available"] and ev["window_hits"] == 0


def test_a_trace_without_return_probe_is_no_window_evidence():
    # recorded without the kretprobe: CPU1's receive looks like a hit, but a
    # failed receive on CPU0 would look the same
    ev, a = _merged(FIX / "veth-interleaved.trace")
    assert a.window_hits == 1 and not a.outcomes
    assert not ev["available"] and "window_hits" not in ev and ev["unflushed_hits"] == 1
    assert "window not measured: receive outcomes not traced (no return probe)" in ev["note"]


def test_tracer_without_a_return_probe_sets_nothing_up(tmp_path, monkeypatch):
    t, root = _tracer(tmp_path, monkeypatch, ["__xsk_rcv", "__xsk_map_flush"])
    real = t._w

    def no_kretprobes(name, value, append=False):
        if name == "kprobe_events" and value.startswith("r:"):
            raise OSError(22, "Invalid argument")
        real(name, value, append)

    monkeypatch.setattr(t, "_w", no_kretprobes)
    with t:
        assert t.root is None          # torn down at once: no probe slows the receive path
        ev = t.collect()
    assert not ev["available"]
    assert "no return probe on __xsk_rcv" in ev["note"]
    assert "cannot kretprobe __xsk_rcv (Invalid argument)" in ev["note"]
    # the entry probe it did register is gone again, and the clock and overwrite are restored
    events = (root / "kprobe_events").read_text().splitlines()
    assert events[0].startswith("p:racelab/rcv ") and "-:racelab/rcv" in events
    assert (root / "trace_clock").read_text() == "global\n"
    assert (root / "options/overwrite").read_text() == "0\n"
    assert not (tmp_path / "out.trace").exists()


def test_kprobe_misses_make_the_window_unavailable():
    lines = (FIX / "veth-reverted-napi.trace").read_text().splitlines()
    # as collect() saves a text trace: clock and kprobe_profile on top
    ev, a = _merged(["# racelab trace_clock: counter", "# racelab kprobe_profile: rcv 320 0",
                     "# racelab kprobe_profile: rcvret 320 3"] + lines)
    assert a.window_hits == 14 and a.kprobe_missed == 3 and a.clock == "counter"
    assert not ev["available"] and "window_hits" not in ev and "kprobes missed 3 hit(s)" in ev["note"]
    # misses the agent read (kprobe_profile at collect time) count even if the file lacks them
    ev, _ = _merged(lines, kprobe_missed=2, note="earlier note")
    assert not ev["available"] and ev["note"].startswith("earlier note; window not measured: kprobes missed 2")
    ev, _ = _merged(lines, kprobe_missed=0)
    assert ev["available"] and ev["window_hits"] == 14


def test_text_trace_in_another_clock_is_read_and_named():
    lines = (FIX / "veth-reverted-napi.trace").read_text().splitlines()
    # the same trace as the `global` clock prints it: "SECONDS.MICROS:"
    secs = [re.sub(r"(\]\s+\S+\s+)(\d+):", lambda m: f"{m.group(1)}{int(m.group(2)) // 10**6}."
                   f"{int(m.group(2)) % 10**6:06d}:", line) for line in lines]
    assert secs != lines
    counter = evidence.analyze(lines)
    a = evidence.analyze(secs)
    # every event read (nothing dropped), in the same order
    assert (a.receives, a.failed, a.flushes, a.window_hits) == (counter.receives, counter.failed,
                                                               counter.flushes, counter.window_hits)
    assert a.receives > 100 and a.clock.startswith("in seconds (0.6379")
    ev, _ = _merged(secs)
    assert not ev["available"] and "window_hits" not in ev
    assert "trace clock in seconds (0.6379" in ev["note"] and "not counter" in ev["note"]
    # a clock named by collect()'s header line, with integer timestamps
    ev, _ = _merged(["# racelab trace_clock: x86-tsc"] + lines)
    assert not ev["available"] and "trace clock x86-tsc, not counter" in ev["note"]
    # the counter clock named: evidence, and no "not recorded" note
    ev, a = _merged(["# racelab trace_clock: counter"] + lines)
    assert ev["available"] and not any("not recorded" in n for n in a.notes)


def test_unreadable_lines_are_counted_not_dropped():
    lines = _rx(0, 1, 0) + ["  x-1 [001] ..s1. 7: rcv (garbled" ] + _rx(1, 10, 0)
    ev, a = _merged(lines)
    assert a.unparsed == 1 and any("garbled" in n for n in a.notes)
    assert not ev["available"] and "1 trace line(s) not read as events" in ev["note"]


def _raw_with(tmp_path, header=None, tail=None):
    page = _page(1, _event(0, _payload("rcv", 0x10)) + _event(1, _payload("rcvret", (0, 0))))
    p = tmp_path / "t.raw"
    h = {"page_size": 4096, "cpus": [0, 1], "callers": {},
         "events": {str(IDS[k]): {"name": k, "fields": FIELDS[k]} for k in IDS}, **(header or {})}
    out = tracer.RAW_MAGIC
    for tag, cpu, d in [(b"HEAD", 0, evidence.json.dumps(h).encode()), (b"PAGE", 0, page),
                        (b"TAIL", 0, evidence.json.dumps(tail or {}).encode())]:
        out += struct.pack("<4sII", tag, cpu, len(d)) + d
    p.write_bytes(out)
    return p


def test_raw_trace_clock_and_dropped_events(tmp_path):
    ev, a = _merged(_raw_with(tmp_path, tail={"stats": {"0": {"dropped events": "0"}}}))
    assert ev["available"] and a.clock == "counter" and a.dropped == 0
    ev, a = _merged(_raw_with(tmp_path, header={"clock": "global"}))
    assert not ev["available"] and "trace clock global, not counter" in ev["note"]
    # overwrite was off: a full buffer refused events and marked no page
    ev, a = _merged(_raw_with(tmp_path, tail={"stats": {"0": {"dropped events": "0"}, "1": {"dropped events": "17"}}}))
    assert a.dropped == 17 and not ev["available"] and "17 event(s) dropped" in ev["note"]


def test_tracer_text_trace_names_clock_and_misses(tmp_path, monkeypatch):
    t, root = _tracer(tmp_path, monkeypatch, ["__xsk_rcv", "__xsk_map_flush"])
    t.opts = {**t.opts, "stream": False}
    with t:
        (root / "trace").write_text((FIX / "veth-reverted-napi.trace").read_text())   # what the kernel recorded
        ev = t.collect()
    assert ev["format"] == "text" and ev["kprobe_missed"] == 1
    text = Path(ev["trace_path"]).read_text().splitlines()
    assert text[:3] == ["# racelab trace_clock: counter", "# racelab kprobe_profile: rcv 40 0",
                        "# racelab kprobe_profile: rcvret 40 1"]
    a = evidence.analyze_file(Path(ev["trace_path"]))
    assert a.kprobe_missed == 1 and a.window_hits == 14
    evidence.merge(ev, a)
    assert not ev["available"] and "kprobes missed 1" in ev["note"]
