"""Kernel-side evidence in real guests (issue 8, part 1).

veth NAPI race: on 6.1.192 with fa349e396e48 reverted the interleaving
detector must see the window (a successful receive on one CPU while another
CPU holds successful receives it has not flushed) within 60 s at 4 vCPUs;
on 6.1.192 as shipped it must see none over the same load, with the whole
run analysed (nothing lost, receive outcomes traced).

generic-rx race: the overlap measure is > 0 with bf0bdd1343ef/a1356ac7749c
reverted and 0 on 6.1.192.

Kernels and the image come from the cache (built on a cold machine by the
first test that needs them).  Both kernels of a test boot at once.
"""
import random

import pytest

from lab import fleet
from lab import scenario as scen
from lab.config import RunConfig
from lab.verdict import NOT_REPRODUCED, REPRODUCED, WINDOW_HIT, verdict_text

pytestmark = [pytest.mark.vm, pytest.mark.slow]


KEYS = ("receives", "failed_receives", "unflushed_hits", "overlap_hits", "first_hit_s", "first_overlap_s",
        "span_s", "lost", "gaps", "kprobe_missed", "bytes", "note")


def _run(name, kernels, duration, tmp_path, overrides=None, stop_grace=None):
    s = scen.load(name, overrides)
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", kernels=tuple(kernels),
                    duration=duration, vms=1, seed=random.SystemRandom().randrange(1 << 31),
                    stop_on_first=stop_grace is not None, stop_grace=stop_grace or 0.0,
                    evidence=("trace",), out=str(tmp_path),
                    overrides=tuple(f"{k}={v}" for k, v in (overrides or {}).items()))
    outcome = fleet.run_vm(cfg, progress=False)
    ev = {}
    for t in outcome.targets:
        assert t.infra_error is None, f"{t.label}: {t.infra_error}"
        ev[t.kernel] = {**t.evidence, "crashed": t.reason == "guest-crashed"}
        print(t.kernel, f"{t.packets} packets in {t.load_seconds:.1f}s",
              {k: t.evidence.get(k) for k in KEYS})
    rows = {r.kernel: r for r in outcome.rows}
    return ev, rows


def _complete(e, duration):
    """The analysis covered the run: raw stream, outcomes traced, nothing lost or missed."""
    assert e.get("available"), e.get("note")
    assert e["trace_format"] == "raw" and e["outcomes_traced"], e
    assert e["lost"] == 0 and e["gaps"] == 0 and e["kprobe_missed"] == 0, e
    assert e["span_s"] is not None and e["span_s"] > 0.8 * duration, e


def test_veth_window_hit_on_reverted_and_none_on_fixed(tmp_path):
    rev, fixed, duration = "6.1.192+revert-veth-napi", "6.1.192", 30.0
    # the kernel's own window, unamplified: a run-time amplifier (the scenario's
    # default) sits inside the receive and slows it to a fraction of the load
    ev, rows = _run("veth-napi-race", [rev, fixed], duration, tmp_path, {"vm.vcpus": 4, "amplifier.method": "off"})
    r, f = ev[rev], ev[fixed]
    for e in (r, f):
        assert e["measure"] == "unflushed_hits"
    _complete(f, duration)
    if rows[rev].corruption.count:
        # corruption reached user space (it can, unamplified, with the scenario's defaults):
        # the flight recorder stopped at the first violation, and the window came before it
        # (first_hit_s counts from the trace's start, first_violation_s from the load's: 1 s slack)
        _complete(r, 0.0)
        assert r["first_hit_s"] is not None and r["first_hit_s"] <= rows[rev].first_violation_s + 1.0, r
    else:
        _complete(r, duration)
        # the window without corruption is a verdict of its own: never the fixed kernel's word
        assert rows[rev].verdict == WINDOW_HIT, rows[rev]
    # reverted: the window within the run
    assert r["window_hits"] > 0, r
    assert r["first_hit_s"] is not None and r["first_hit_s"] < 60, r
    assert rows[rev].window.available and rows[rev].window.count == r["window_hits"]
    # fixed: none, over enough receives that the reverted kernel's rate per receive would
    # have given at least 20 hits (P(0) <= e^-20 were the fixed kernel as racy).  Not a ratio
    # of throughputs: on a loaded host one run moved 117,760 receives and the other 282,368.
    assert f["window_hits"] == 0 and f["overlap_hits"] == 0, f["examples"]
    expected_hits = f["receives"] * r["window_hits"] / r["receives"]
    assert f["receives"] > 50_000 and expected_hits >= 20, (f["receives"], r["receives"], r["window_hits"])
    assert rows[fixed].window.available and rows[fixed].window.count == 0
    assert rows[fixed].verdict == NOT_REPRODUCED and "0 window hits" in verdict_text(rows[fixed])


# With the gated delay alone this failed more often than not: poison at 2.8 s with 0 unflushed
# hits in the 8,698 receives before it, and a boot with no window hit at all in 594,689
# receives.  The flushing CPU's side of the window was a few instructions wide, so the
# corrupting interleaving was rare and the measure (a receive while another CPU holds
# unflushed ones) seldom saw one before the marker.  The scenario's hold at xdp_do_flush()
# keeps that CPU's receives unflushed while the other CPU receives: with it, 28, 18, 408 and
# 27 hits before the first violation in four runs (repro, CI).  The print below records both
# measures on every run.
def test_veth_flight_recorder_holds_the_marker_and_the_window_before_it(tmp_path):
    """A corrupting run (the scenario's run-time amplifier): the checker's marker is in the
    trace, with at least one window hit and >= 500 ms on every CPU before it."""
    rev = "6.1.192+revert-veth-napi"
    ev, rows = _run("veth-napi-race", [rev], 45.0, tmp_path, stop_grace=0.5)
    e, row = ev[rev], rows[rev]
    print(rev, {k: e.get(k) for k in ("hits_before_violation", "overlaps_before_violation", "unflushed_hits",
                                     "overlap_hits", "receives", "first_hit_s", "first_overlap_s",
                                     "recorder_min_s")}, row.first_violation_s)
    assert row.verdict == REPRODUCED, f"no corruption in 45 s with the amplifier: {row}"
    assert e.get("available"), e.get("note")
    assert e["violation_ts"] is not None and e["violation_mark"].startswith("racelab violation"), e["marks"]
    assert e["hits_before_violation"] >= 1, e
    assert e["recorder_problems"] == [], e["recorder_problems"]
    assert e["recorder_min_s"] >= 0.5, e["recorder_s"]
    assert e["interleaving_focus"] == "violation" and e["interleaving"][-1][2] == "mark"


def test_generic_overlap_on_reverted_and_none_on_fixed(tmp_path):
    rev, fixed, duration = "6.1.192+revert-generic-rx", "6.1.192", 20.0
    # the reverted kernel's unlocked receive also corrupts the pool's free list, and
    # a guest left racing for the whole run can oops in __xsk_rcv_zc: end each run
    # half a second after its first violation (the fixed one runs to the end)
    ev, rows = _run("generic-rx-race", [rev, fixed], duration, tmp_path / "0", stop_grace=0.5)
    f = ev[fixed]
    assert not f["crashed"]
    if f.get("gaps") or f.get("lost"):
        # a ring buffer the stream could not drain in time (a loaded host) marks a gap: the
        # analysis says so and withdraws what relied on it; for this test's completeness,
        # the fixed kernel runs once more
        print(f"{fixed}: {f.get('gaps')} gap(s) in its trace; running it again")
        more, _ = _run("generic-rx-race", [fixed], duration, tmp_path / "fixed-again", stop_grace=0.5)
        f = more[fixed]
    _complete(f, duration)
    assert f["overlap_hits"] == 0 and f["unflushed_hits"] == 0 and f["receives"] > 50_000, f
    # the oops can still come before user space sees a violation: the guest's
    # flight recorder dies with it.  That run is a reproduction by kernel splat
    # (say so, and check it), then the reverted kernel runs again for its trace.
    r = ev[rev]
    for attempt in range(1, 4):
        if not r["crashed"]:
            break
        assert rows[rev].verdict == REPRODUCED and rows[rev].by_kind.get("kernel-splat"), rows[rev]
        print(f"attempt {attempt}: {rev} crashed of a kernel splat; running it again")
        more, rows = _run("generic-rx-race", [rev], duration, tmp_path / str(attempt), stop_grace=0.5)
        r = more[rev]
    assert not r["crashed"], f"{rev} crashed in every attempt: no trace survived"
    assert r["measure"] == f["measure"] == "overlap_hits"
    # the checker stops tracing at its first violation (a flight recorder): the
    # reverted trace is short, but the overlap is there before it
    assert r.get("available") and r["overlap_hits"] > 0 and r["window_hits"] == r["overlap_hits"], r
