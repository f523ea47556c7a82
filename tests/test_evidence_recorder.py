"""The flight recorder of a corrupting run: its marker, the window before it, its span.

The regression fixture is a recorded corrupting run (veth-napi-race, 6.1.192 with
fa349e396e48 reverted, run-time amplifier, TCG): the checker saw a poison violation
17.2 s into the load, but its marker never reached the trace (xskcheck turned
tracing off before writing it), and the recorder's last 0.68 s hold no window hit.
"""
from pathlib import Path

from lab import evidence
from lab.agent import tracer

FIX = Path(__file__).parent / "fixtures" / "trace"
CORRUPTING = FIX / "veth-corrupting-no-marker-raw.trace.gz"


def _ev(a):
    ev = {"available": True, "recorder_wanted_s": 0.5}
    evidence.merge(ev, a)
    return ev


def _clocked(events, marks_every=10, seconds_per_tick=0.001):
    """Counter events with clock marks every marks_every ticks (1 ms a tick by default)."""
    last = max(e[0] for e in events)
    marks = [(t, 0, "mark", f"{tracer.CLOCK_MARK} {t * seconds_per_tick:.6f}", None)
             for t in range(0, last + marks_every, marks_every)]
    return sorted(events + marks, key=lambda e: (e[0], e[2] != "mark"))


def _feed(events):
    an = evidence._Analyzer()
    for e in events:
        an.feed(e)
    return an.finish()


XS = 0xffff888003e1c000


def _racy(start, stop):
    """cpu0 receives and holds; cpu1 receives into the same socket before cpu0 flushes: a hit."""
    return [(start, 0, "rcv", XS, None), (start + 1, 0, "rcvret", 0, None),
            (start + 2, 1, "rcv", XS, None), (start + 3, 1, "rcvret", 0, None),
            (start + 4, 0, "flush", XS, None), (start + 5, 1, "flush", XS, None)][:stop]


def test_recorded_corrupting_run_without_its_marker_is_named():
    a = evidence.analyze_file(CORRUPTING)
    assert a.receives > 3000 and a.lost == 0 and not a.window_problems()
    # the regression: corruption was seen, the trace shows neither the marker nor the window
    assert a.window_hits == 0 and a.violation_ts is None and a.marks == []
    ev = _ev(a)
    problems = evidence.recorder_check(ev, saw_violation=True)
    assert len(problems) == 1 and "holds no violation marker" in problems[0]
    assert ev["recorder_problems"] == problems
    # the same trace of a run the checker saw nothing in: nothing to say
    assert evidence.recorder_check(_ev(evidence.analyze_file(CORRUPTING)), saw_violation=False) == []


def test_a_recorder_with_the_marker_and_the_window_before_it():
    events = [e for k in range(0, 2000, 10) for e in _racy(k, 6)]
    events.append((2000, 1, "mark", "racelab violation kind=poison dev=veth0 queue=0 addr=4096", None))
    a = _feed(_clocked(events))
    assert a.violation_ts == 2000 and a.violation_mark.startswith("racelab violation kind=poison")
    assert a.hits_before_violation == a.window_hits == 200
    # both CPUs traced from t=0: 2 s before the marker at 1 ms a tick
    assert a.recorder_s == {0: 2.0, 1: 2.0}
    ev = _ev(a)
    assert evidence.recorder_check(ev, saw_violation=True) == []
    assert ev["hits_before_violation"] == 200 and ev["recorder_min_s"] == 2.0
    # the interleaving kept ends at the marker (tracing stops there) and is bounded
    il = ev["interleaving"]
    assert ev["interleaving_focus"] == "violation" and il[-1][2] == "mark"
    assert len(il) == tracer.INTERLEAVING_BEFORE
    assert {e[1] for e in il} == {0, 1} and {"rcv", "rcvret", "flush"} <= {e[2] for e in il}


def test_a_short_recorder_is_named_per_cpu():
    events = [e for k in range(0, 1000, 10) for e in _racy(k, 6)]
    # cpu1 lost events at 990: its recorder restarts there, 10 ms before the marker
    events.append((990, 1, "lost", 50, None))
    events.append((1000, 1, "mark", "racelab violation kind=order dev=veth0 queue=0 addr=0", None))
    ev = _ev(_feed(_clocked(events)))
    problems = evidence.recorder_check(ev, saw_violation=True)
    assert len(problems) == 1 and "cpu1 10 ms" in problems[0] and "cpu0" not in problems[0], problems
    assert ">= 500 ms" in problems[0]


def test_a_cpu_that_starts_receiving_late_was_recorded_all_along():
    # cpu0 receives from t=0; cpu1's first receive is 10 ms before the marker.  Its ring
    # buffer lost nothing, so the recorder covered it (idle) from the trace's start.
    events = [e for k in range(0, 1000, 3) for e in ((k, 0, "rcv", XS, None), (k + 1, 0, "rcvret", 0, None),
                                                      (k + 2, 0, "flush", XS, None))]
    events += _racy(990, 6)[2:4] + [(996, 1, "flush", XS, None)]
    events.append((1000, 1, "mark", "racelab violation kind=order dev=veth0 queue=0 addr=0", None))
    ev = _ev(_feed(_clocked(events)))
    assert ev["recorder_s"] == {"0": 1.0, "1": 1.0}
    assert evidence.recorder_check(ev, saw_violation=True) == []


def test_a_clean_run_keeps_the_first_window_hit_interleaving():
    events = [(k, 0, "rcv", XS, None) for k in range(0, 300, 3)]
    events = [e for k in range(0, 300, 3) for e in ((k, 0, "rcv", XS, None), (k + 1, 0, "rcvret", 0, None),
                                                     (k + 2, 0, "flush", XS, None))]
    events += _racy(400, 6)
    a = _feed(_clocked(events))
    assert a.window_hits == 1 and a.violation_ts is None and a.interleaving_focus == "window hit"
    # what led to it and what followed: the hit's receive on cpu1 is in it
    assert (402, 1, "rcv") in {tuple(e[:3]) for e in a.interleaving}
    assert a.interleaving[-1][0] == 405
    # a serialised run has no hit and keeps nothing
    assert _feed(_clocked(events[:-6])).interleaving == []


def test_the_report_draws_the_interleaving_per_cpu(capsys):
    import xml.etree.ElementTree as ET

    from lab import report
    events = [e for k in range(0, 1000, 10) for e in _racy(k, 6)]
    events.append((1000, 1, "mark", "racelab violation kind=poison dev=veth0 queue=0 addr=4096", None))
    ev = _ev(_feed(_clocked(events)))
    lanes = report.interleaving_lanes(ev, width=30)
    assert len(lanes) == 4 and lanes[1].startswith("  cpu0") and lanes[2].startswith("  cpu1")
    # the marker is the last event, on cpu1's lane, and the pointer is under it
    assert lanes[2].endswith("!") and lanes[1].endswith(".") and "^ the marker" in lanes[3]
    assert lanes[3].index("^") == len(lanes[2]) - 1
    assert set(lanes[1][9:]) <= set("RrF.") and "R" in lanes[1]
    report.print_interleavings([{"label": "vm-0", "kernel": "k", "evidence": ev}])
    out = capsys.readouterr().out
    assert "vm-0: interleaving before the first violation (100 window hit(s) before it)" in out
    svg = report._svg_interleaving({"label": "vm-0", "kernel": "k", "evidence": ev})
    root = ET.fromstring(svg[svg.index("<svg"):])
    rects = [r for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(rects) == len(ev["interleaving"])
    red = [r for r in rects if r.get("fill") == "#c0392b"]
    assert len(red) == 1 and "racelab violation" in red[0].find("{http://www.w3.org/2000/svg}title").text
    # nothing traced, nothing drawn
    assert report.interleaving_lanes({}) == [] and report._svg_interleaving({"evidence": {}}) == ""
