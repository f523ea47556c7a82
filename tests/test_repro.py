"""repro's early stop of a clean control (lab.repro.ControlStop), its verdict line,
and the per-phase breakdown of a run; the agent's graceful stop on a real netns load."""
import dataclasses
import math
import signal
import threading
import time

import pytest

from lab import fleet, repro, scenario
from lab import verdict as v
from lab.workload import TargetResult

AFF, CTL = "6.1.192+revert-generic-rx", "6.1.192"


class FakeHost:
    def __init__(self):
        self.calls = []

    def cmd(self, argv, check=True, timeout=None):
        self.calls.append(list(argv))


def affected_result(onsets=10, seconds=2.0, packets=20_000, label=f"{AFF}/vm-0"):
    r = TargetResult(label=label, kernel=AFF, packets=packets, load_seconds=seconds, reason="first-violation")
    r.by_kind = {"order": onsets}
    r.onsets_by_kind = {"order": onsets}
    r.rx_points = [(seconds, packets)]
    r.first_violation_s = 0.3
    return r


def clean_result(label=f"{AFF}/vm-0"):
    r = TargetResult(label=label, kernel=AFF, packets=50_000, load_seconds=30.0, reason="duration")
    r.rx_points = [(t / 2, 1000 * t) for t in range(1, 61)]
    return r


def stop(vms=1, miss=1e-3):
    return repro.ControlStop(affected=(AFF,), controls=(CTL,), vms=vms, confidence=0.95, miss=miss)


def stream(cs, host, seconds, label=f"{CTL}/vm-0", pid=4242, start=10.0, step=0.5, rx_from=0):
    """The control's agent: load-start, then a stats line every step with rx rising."""
    cs.on_event(CTL, label, {"type": "load-start", "at": start, "pid": pid}, host)
    n = int(seconds / step)
    for i in range(1, n + 1):
        cs.on_event(CTL, label, {"type": "stats", "at": start + i * step, "rx": rx_from + 1000 * i}, host)


def lower_rate(onsets, seconds):
    return v.poisson_interval(onsets, seconds, 0.95)[0]


def test_the_control_stops_once_an_affected_like_kernel_would_have_shown_an_onset():
    cs, host = stop(), FakeHost()
    cs.target_done(AFF, affected_result(onsets=10, seconds=2.0))
    rate = lower_rate(10, 2.0)
    assert cs.rate == pytest.approx(rate)
    need = -math.log(1e-3) / rate            # exp(-rate * t) <= 1e-3
    stream(cs, host, need - 0.5)
    assert host.calls == [], "not clean long enough yet"
    cs.on_event(CTL, f"{CTL}/vm-0", {"type": "stats", "at": 10.0 + need + 0.5, "rx": 10**7}, host)
    assert host.calls == [["kill", "-USR1", "4242"]]
    cs.on_event(CTL, f"{CTL}/vm-0", {"type": "stats", "at": 10.0 + need + 1.0, "rx": 10**7 + 1}, host)
    assert len(host.calls) == 1, "one stop request"


def test_a_control_already_clean_long_enough_stops_when_the_affected_kernel_reproduces():
    cs, host = stop(), FakeHost()
    stream(cs, host, 60.0)
    assert host.calls == [], "the affected kernel has not reproduced: the control keeps running"
    cs.target_done(AFF, affected_result(onsets=10, seconds=2.0))
    assert host.calls == [["kill", "-USR1", "4242"]]


def test_no_stop_while_the_affected_kernel_has_not_reproduced_or_did_not():
    cs, host = stop(), FakeHost()
    stream(cs, host, 120.0)
    assert host.calls == []
    cs.target_done(AFF, clean_result())
    stream(cs, host, 120.0, start=200.0, rx_from=10**6)
    assert cs.rate == 0 and host.calls == [], "no rate to test against: the control runs its budget"


def test_a_control_that_saw_a_violation_or_no_traffic_is_never_stopped():
    cs, host = stop(), FakeHost()
    cs.target_done(AFF, affected_result(onsets=50, seconds=1.0))
    cs.on_event(CTL, f"{CTL}/vm-0", {"type": "load-start", "at": 0.0, "pid": 7}, host)
    for i in range(1, 200):     # the receive count never rises: no exposure
        cs.on_event(CTL, f"{CTL}/vm-0", {"type": "stats", "at": i * 0.5, "rx": 0}, host)
    assert host.calls == []
    cs.on_event(CTL, f"{CTL}/vm-0", {"type": "violation", "at": 100.0, "kind": "order"}, host)
    stream(cs, host, 100.0, start=101.0, rx_from=1)
    assert host.calls == []


def test_with_several_guests_every_one_has_started_and_their_clean_time_adds_up():
    cs, host = stop(vms=2), FakeHost()
    cs.target_done(AFF, affected_result(onsets=20, seconds=2.0, label=f"{AFF}/vm-0"))
    assert cs.rate is None, "one of two affected guests done: no rate yet"
    cs.target_done(AFF, affected_result(onsets=20, seconds=2.0, label=f"{AFF}/vm-1"))
    need = -math.log(1e-3) / cs.rate
    stream(cs, host, need * 0.6, label=f"{CTL}/vm-0", pid=11)
    assert host.calls == [], "the other guest has not started its load"
    stream(cs, host, need * 0.6, label=f"{CTL}/vm-1", pid=12)
    assert sorted(host.calls) == [["kill", "-USR1", "11"], ["kill", "-USR1", "12"]]


def test_the_rows_say_why_the_control_ended():
    cs, host = stop(), FakeHost()
    cs.target_done(AFF, affected_result(onsets=10, seconds=2.0))
    stream(cs, host, 20.0)
    cs.on_event(CTL, f"{CTL}/vm-0", {"type": "agent-done", "at": 31.0, "reason": "stopped"}, host)
    row = v.decide(CTL, vms=1, packets=100_000, seconds=14.0, wall=30, by_kind={}, first_violation_s=None)
    cs.annotate(row)
    info = row.extra["control_stop"]
    assert info["stopped_early"] and info["miss"] == 1e-3
    assert info["text"].startswith("clean for 14 s: an affected-like kernel (>= ")
    assert info["text"].endswith("onsets/s at 95%) would show one with probability > 0.999")
    assert info["text"] in v.verdict_text(row)
    assert row.verdict == v.NOT_REPRODUCED, "an early stop is a normal clean result"
    aff = v.decide(AFF, vms=1, packets=1, seconds=1, wall=1, by_kind={"order": 1}, first_violation_s=0.1)
    cs.annotate(aff)
    assert "control_stop" not in aff.extra


def test_a_control_that_ran_its_budget_says_what_was_wanted():
    cs = stop()
    cs.target_done(AFF, affected_result(onsets=1, seconds=2.0))   # a weak rate: ~0.013/s
    row = v.decide(CTL, vms=1, packets=100_000, seconds=60.0, wall=70, by_kind={}, first_violation_s=None)
    cs.annotate(row)
    info = row.extra["control_stop"]
    assert not info["stopped_early"]
    assert info["needed_s"] > 60
    assert info["text"].startswith("ran its whole budget (60 s clean, ")
    p = v.detection_probability(cs.rate, 60.0)
    assert f"probability {p:.3f}"[:-1] in info["text"]


def test_clean_enough_is_the_miss_probability_rule():
    assert v.clean_enough(1.0, -math.log(1e-3) + 1e-9, 1e-3)
    assert not v.clean_enough(1.0, -math.log(1e-3) - 0.01, 1e-3)
    assert not v.clean_enough(0.0, 1e9, 1e-3), "no rate, no early stop"
    assert v.miss_probability(2.0, 3.0) == pytest.approx(math.exp(-6))


def test_the_miss_is_a_scenario_field_and_zero_turns_the_stop_off():
    s = scenario.load("generic-rx-race")
    assert s["run"]["control_miss"] == 1e-3
    exp = {AFF: "reproduced", CTL: "clean"}
    assert repro.ControlStop.for_repro(s, exp, vms=1).miss == 1e-3
    assert repro.ControlStop.for_repro(scenario.load("generic-rx-race", {"run.control_miss": 0}), exp, 1) is None
    assert repro.ControlStop.for_repro(s, {AFF: "reproduced"}, 1) is None, "no control"
    assert repro.ControlStop.for_repro(s, {CTL: "clean"}, 1) is None, "nothing to test against"
    with pytest.raises(Exception, match="control_miss"):
        scenario.load("generic-rx-race", {"run.control_miss": 0.5})


@pytest.mark.parametrize("fixed", [False, True])
def test_an_explicit_duration_wins_over_the_early_stop(monkeypatch, fixed):
    from lab.config import RunConfig

    seen = {}

    class Spec:
        def __init__(self, name):
            self.affected = ("generic-rx-race",) if "revert" in name else ()

    monkeypatch.setattr(fleet, "resolve_kernels", lambda names: [Spec(n) for n in names])
    monkeypatch.setattr(fleet, "run_vm", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    s = scenario.load("generic-rx-race")
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", duration=25.0)
    repro.run_repro(cfg, budget_given=fixed, fixed_duration=fixed, progress=False)
    assert seen["cfg"].duration == 25.0 if fixed else s.budget()
    assert (seen["control"] is None) == fixed


def test_phases_of_a_fleet_and_of_the_run():
    each = {"k/vm-0": {"load_started": 105.0, "load": 20.0, "returned": 131.0},
            "k/vm-1": {"load_started": 106.0, "load": 21.0, "returned": 129.0}}
    ph = fleet._phases(100.0, 103.0, 131.5, 134.0, each)
    assert ph == {"boot": 3.0, "setup": 3.0, "load": 21.0, "evidence": 6.0, "teardown": 2.5}

    class KR:
        def __init__(self, name, wall, phases):
            self.name, self.wall, self.phases = name, wall, phases

    runs = [KR("a", 10.0, {"boot": 1.0, "load": 2.0}), KR("b", 30.0, ph)]
    rp = fleet.run_phases(runs, build_check=0.5, report=0.25, wall=31.0)
    assert rp["slowest_kernel"] == "b" and rp["load"] == 21.0 and rp["build_check"] == 0.5
    assert rp["report"] == 0.25 and rp["by_kernel"]["a"] == {"boot": 1.0, "load": 2.0}
    for k in ("build_check", "boot", "setup", "load", "evidence", "teardown", "report", "wall"):
        assert isinstance(rp[k], float), k


@pytest.mark.root
def test_sigusr1_ends_a_real_load_gracefully(tmp_path):
    """The agent on this machine's kernel (netns, AF_XDP): a stop request ends the load as
    if its duration had elapsed; the result is a normal clean one over the time it ran."""
    from lab import dataplane
    from lab.host import LocalHost
    from lab.session import preflight_netns, rows_from_targets
    from lab.workload import agent_spec, run_target

    preflight_netns()
    bin_dir = str(dataplane.build())
    s = scenario.load("generic-rx-race", {"load.senders": 1, "load.rate": 100000})
    spec = agent_spec(s, duration=60.0, seed=3, bin_dir=bin_dir, stop_on_first=False, inject="")
    host = LocalHost(bin_dir)
    timer: list[threading.Timer] = []

    def on_event(label, ev):
        if ev.get("type") == "load-start":
            assert isinstance(ev.get("pid"), int)
            t = threading.Timer(3.0, lambda: host.cmd(["kill", f"-{int(signal.SIGUSR1)}", str(ev["pid"])]))
            timer.append(t)
            t.start()

    res = run_target(host, spec, label="local/stop", kernel="host", on_event=on_event)
    for t in timer:
        t.cancel()
    assert res.reason == "stopped", res
    assert res.infra_error is None and not res.interrupted
    assert 2.0 < res.load_seconds < 15.0, "the load ended on the request, long before its 60 s"
    assert res.packets > 0 and res.final, "the checker's final counters came through"
    row = rows_from_targets("host", [res], 10.0, 0.95, vms=0)
    assert row.verdict == v.NOT_REPRODUCED and row.seconds > 1.0


@pytest.mark.root
def test_a_held_load_goes_on_after_its_first_violation_until_released(tmp_path):
    """stop_grace < 0 (repro.HOLD), on this machine's kernel with an injected fault: the load
    and the checker go on after the first violation, and SIGUSR1 ends them, the row
    keeping its first violation."""
    from lab import dataplane
    from lab.host import LocalHost
    from lab.workload import agent_spec, run_target

    bin_dir = str(dataplane.build())
    s = scenario.load("generic-rx-race", {"load.senders": 1, "load.rate": 100000})
    spec = agent_spec(s, duration=60.0, seed=3, bin_dir=bin_dir, stop_on_first=True, inject="duplicate",
                      stop_grace=repro.HOLD)
    host = LocalHost(bin_dir)
    seen: dict = {"violations": []}
    timer: list[threading.Timer] = []

    def on_event(label, ev):
        if ev.get("type") == "load-start":
            seen["pid"] = ev["pid"]
        elif ev.get("type") == "violation":
            seen["violations"].append(time.monotonic())
            if not timer:   # released 6 s after the first violation, as ControlStop would
                t = threading.Timer(6.0, lambda: host.cmd(["kill", "-USR1", str(seen["pid"])]))
                timer.append(t)
                t.start()

    t0 = time.monotonic()
    res = run_target(host, spec, label="local/hold", kernel="host", on_event=on_event)
    for t in timer:
        t.cancel()
    assert res.reason == "first-violation" and res.infra_error is None, res
    first = seen["violations"][0]
    at_first = max((rx for t, rx in res.rx_points if t <= res.first_violation_from_load_start_s), default=0)
    assert res.load_seconds > 5.0 and res.packets > at_first + 1000, \
        "the load and the checker went on after the first violation"
    assert 5.0 < time.monotonic() - first < 20.0 and time.monotonic() - t0 < 40, \
        "held past its first violation, ended by the request, not by the 60 s duration"
    assert res.first_violation_s is not None and res.onsets_by_kind.get("duplicate", 0) >= 1


def test_a_held_affected_guest_keeps_measuring_and_is_released_once_the_control_stops():
    """One onset gives a weak bound (a control would want ~10 min of it); with the affected
    guest's load held after its first violation, its later onsets tighten the bound while
    the control runs, the control stops far sooner, and only then is the affected released."""
    cs, aff, ctl = stop(), FakeHost(), FakeHost()
    A, C = f"{AFF}/vm-0", f"{CTL}/vm-0"
    cs.on_event(AFF, A, {"type": "load-start", "at": 0.0, "pid": 100}, aff)
    cs.on_event(CTL, C, {"type": "load-start", "at": 0.0, "pid": 200}, ctl)
    one_onset_need = v.budget_for(lower_rate(1, 2.0), 1e-3)
    assert one_onset_need > 500
    stopped_at = None
    t = 0.0
    while t < 120 and not aff.calls:
        t += 0.5
        cs.on_event(AFF, A, {"type": "stats", "at": t, "rx": int(1000 * t)}, aff)
        if t >= 2 and t % 2 == 0:      # an onset every 2 s from t = 2
            cs.on_event(AFF, A, {"type": "violation", "at": t, "kind": "poison", "onset": True}, aff)
            cs.on_event(AFF, A, {"type": "violation", "at": t, "kind": "order", "onset": False}, aff)
        assert aff.calls == [], "the affected guest is held while the control still runs"
        cs.on_event(CTL, C, {"type": "stats", "at": t, "rx": int(1000 * t)}, ctl)
        if ctl.calls and stopped_at is None:
            stopped_at = t
    assert ctl.calls == [["kill", "-USR1", "200"]]
    assert stopped_at is not None and stopped_at < 60 < one_onset_need
    onsets = int(stopped_at // 2)
    assert cs.rate == pytest.approx(lower_rate(onsets, stopped_at), rel=0.1), "the live rate, in VM-seconds"
    assert aff.calls == [["kill", "-USR1", "100"]], "released once no control needs the rate"


def test_a_held_guest_is_released_after_its_grace_once_the_control_is_done_by_itself():
    cs, aff, ctl = stop(), FakeHost(), FakeHost()
    A, C = f"{AFF}/vm-0", f"{CTL}/vm-0"
    cs.on_event(AFF, A, {"type": "load-start", "at": 0.0, "pid": 100}, aff)
    cs.on_event(CTL, C, {"type": "load-start", "at": 0.0, "pid": 200}, ctl)
    cs.on_event(CTL, C, {"type": "violation", "at": 0.5, "kind": "order"}, ctl)   # the control too
    cs.on_event(AFF, A, {"type": "violation", "at": 1.0, "kind": "order"}, aff)
    for i in range(3, 12):
        cs.on_event(AFF, A, {"type": "stats", "at": i * 0.5, "rx": 1000 * i}, aff)
    assert aff.calls == [], f"{repro.AFFECTED_GRACE_S} s after the first violation first"
    for i in range(12, 20):
        cs.on_event(AFF, A, {"type": "stats", "at": i * 0.5, "rx": 1000 * i}, aff)
        cs.on_event(CTL, C, {"type": "stats", "at": i * 0.5, "rx": 1000 * i}, ctl)
    assert aff.calls == [["kill", "-USR1", "100"]] and ctl.calls == [["kill", "-USR1", "200"]], \
        "no clean control left to need a rate: both held guests go"


def test_repro_holds_the_load_only_where_a_control_needs_the_rate(monkeypatch):
    seen = {}
    monkeypatch.setattr(fleet, "resolve_kernels", lambda names: [
        type("K", (), {"affected": ("generic-rx-race",) if "+" in n else ()})() for n in names])
    monkeypatch.setattr(fleet, "run_vm", lambda cfg, **kw: seen.update(cfg=cfg, control=kw["control"]))
    from lab.config import RunConfig
    s = scenario.load("generic-rx-race")
    base = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", kernels=(AFF, CTL), duration=60.0)
    repro.run_repro(base, budget_given=False, progress=False)
    assert seen["control"] is not None and seen["cfg"].stop_grace == repro.HOLD
    repro.run_repro(dataclasses.replace(base, kernels=(AFF,)), budget_given=False, progress=False)
    assert seen["control"] is None and seen["cfg"].stop_grace == repro.AFFECTED_GRACE_S


def test_a_burst_of_onsets_keeps_the_bound_it_gave_though_the_held_load_goes_quiet():
    """The generic race's onsets come in a burst, then seldom: the rate measured at the grace
    (what a run ending there would have said) stands; the longer, quieter look cannot weaken it."""
    cs, aff, ctl = stop(), FakeHost(), FakeHost()
    A, C = f"{AFF}/vm-0", f"{CTL}/vm-0"
    cs.on_event(AFF, A, {"type": "load-start", "at": 0.0, "pid": 100}, aff)
    cs.on_event(CTL, C, {"type": "load-start", "at": 0.0, "pid": 200}, ctl)
    t = 0.0
    while not ctl.calls and t < 60:
        t += 0.5
        if t <= 1.0:
            for _ in range(3):
                cs.on_event(AFF, A, {"type": "violation", "at": t, "kind": "order", "onset": True}, aff)
        cs.on_event(AFF, A, {"type": "stats", "at": t, "rx": int(1000 * t)}, aff)
        cs.on_event(CTL, C, {"type": "stats", "at": t, "rx": int(1000 * t)}, ctl)
    at_grace = lower_rate(6, 0.5 + repro.AFFECTED_GRACE_S)
    assert ctl.calls and t <= v.budget_for(at_grace, 1e-3) + 1.0, (t, cs.rate)
    assert cs.rate >= at_grace * 0.99 > lower_rate(6, t)
