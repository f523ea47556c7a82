"""The orchestrator's view of an agent stream, with a fake Host standing in for the transport."""
import json
from contextlib import contextmanager

from lab import scenario as scen
from lab.agent.agent import AgentSpec
from lab.workload import agent_spec, run_target


class FakeProc:
    def __init__(self, lines):
        self._lines = lines

    def lines(self):
        yield from self._lines

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0

    def stderr_text(self):
        return ""

    def terminate(self):
        pass


class FakeHost:
    name = "fake"
    python = "python3"
    lab_root = "/opt/racelab"
    bin_dir = "/opt/racelab/bin"
    agent_python = ("python3", "-S")
    agent_path = "/opt/racelab:/opt/racelab/site"

    def __init__(self, events):
        self.lines = [json.dumps(e) if isinstance(e, dict) else e for e in events]
        self.argv = None

    @contextmanager
    def spawn(self, argv, env=None):
        self.argv = argv
        yield FakeProc(self.lines)


def spec():
    s = scen.load("generic-rx-race")
    return agent_spec(s, duration=5, seed=1, bin_dir="/b", stop_on_first=False)


def test_agent_spec_round_trips():
    sp = spec()
    assert AgentSpec.from_json(sp.to_json()) == sp
    assert sp.checker.xdp == "generic" and sp.sender.senders == 2


def test_stream_is_aggregated():
    host = FakeHost([
        {"type": "topology", "at": 0.1},
        {"type": "ready", "at": 0.5},
        {"type": "load-start", "at": 1.0},
        "garbage that is not json",
        {"type": "violation", "kind": "order", "at": 1.25, "queue": 0, "cpu": 1},
        {"type": "violation", "kind": "poison", "at": 1.5},
        {"type": "stats", "rx": 1000, "at": 1.6, "violations": 2, "by_kind": {"order": 1, "poison": 1}},
        # the checker counted more than it printed
        {"type": "done", "rx": 5000, "at": 6.0, "violations": 7, "by_kind": {"order": 6, "poison": 1}},
        {"type": "agent-done", "reason": "duration", "load_seconds": 5.0, "at": 6.1},
    ])
    seen = []
    r = run_target(host, spec(), label="vm-0", kernel="k", on_event=lambda _label, e: seen.append(e["type"]))
    assert r.infra_error is None
    assert r.packets == 5000 and r.load_seconds == 5.0
    assert r.by_kind == {"order": 6, "poison": 1}
    assert abs(r.first_violation_s - 0.25) < 1e-9
    assert "violation" in seen and host.argv[:4] == ["python3", "-S", "-m", "lab.agent"]


def test_stream_without_agent_done_is_infrastructure_loss():
    host = FakeHost([{"type": "load-start", "at": 1.0}, {"type": "stats", "rx": 10, "at": 2.0}])
    r = run_target(host, spec(), label="vm-1", kernel="k")
    assert r.infra_error and "without a result" in r.infra_error


def test_agent_error_is_infrastructure():
    host = FakeHost([{"type": "agent-done", "reason": "error", "error": "checker exited before ready"}])
    r = run_target(host, spec(), label="vm-1", kernel="k")
    assert "checker exited" in r.infra_error


class HangingProc(FakeProc):
    """Prints its lines, then hangs (a paused guest) until given up on."""

    def __init__(self, lines):
        super().__init__(lines)
        import threading
        self.given_up = threading.Event()
        self.how = None

    def lines(self):
        yield from self._lines
        self.given_up.wait(30)

    def abandon(self):
        self.how = "abandon"
        self.given_up.set()

    def terminate(self):
        self.how = "terminate"
        self.given_up.set()


class HangingHost(FakeHost):
    def __init__(self, events, proc_class=HangingProc):
        super().__init__(events)
        self.proc = proc_class(self.lines)

    @contextmanager
    def spawn(self, argv, env=None):
        yield self.proc


def test_a_silent_guest_is_infrastructure_loss_and_is_abandoned():
    import time
    host = HangingHost([{"type": "load-start", "at": 1.0}, {"type": "stats", "rx": 10, "at": 1.5}])
    t0 = time.monotonic()
    r = run_target(host, spec(), label="vm-0", kernel="k", alive=lambda: True, silence=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10
    assert r.infra_error == "LostVM: vm-0: guest stopped answering (no output for 0.5 s)"
    assert host.proc.how == "abandon"      # an SSH channel is closed, not asked to kill
    assert r.packets == 10                 # what it said before is kept, but the row sees infra


def test_silence_is_measured_between_lines_not_from_the_start():
    import threading
    import time

    class Slow(HangingProc):
        def lines(self):
            for line in self._lines:     # one line every 0.2 s: never 0.5 s of silence
                time.sleep(0.2)
                yield line

    events = [{"type": "stats", "rx": i, "at": i} for i in range(8)]
    events.append({"type": "agent-done", "reason": "duration", "load_seconds": 1.0})
    host = HangingHost(events, Slow)
    r = run_target(host, spec(), label="vm-0", kernel="k", silence=0.5)
    assert r.infra_error is None and host.proc.how is None
    assert threading.active_count() < 50


def test_a_local_process_without_abandon_is_terminated():
    class NoAbandon(HangingProc):
        abandon = None

    host = HangingHost([{"type": "stats", "rx": 1, "at": 1}], NoAbandon)
    r = run_target(host, spec(), label="local", kernel="k", silence=0.3)
    assert host.proc.how == "terminate" and "stopped answering" in r.infra_error


def test_iperf_report_is_kept_and_its_failure_noted_and_heartbeats_are_not_events():
    ok = FakeHost([{"type": "heartbeat"}, {"type": "load-start", "at": 1.0},
                   {"type": "iperf", "bytes": 10**9, "bits_per_second": 1.6e9, "at": 6.0},
                   {"type": "agent-done", "reason": "duration", "load_seconds": 5.0}])
    seen = []
    r = run_target(ok, spec(), label="vm-0", kernel="k", on_event=lambda _label, e: seen.append(e["type"]))
    assert r.iperf["bytes"] == 10**9 and not r.notes and "heartbeat" not in seen
    bad = FakeHost([{"type": "iperf", "error": "iperf3 moved no data", "bytes": 0},
                    {"type": "agent-done", "reason": "duration", "load_seconds": 5.0}])
    r = run_target(bad, spec(), label="vm-0", kernel="k")
    assert any("iperf3: iperf3 moved no data" in n for n in r.notes)


def test_a_guest_that_crashes_before_its_first_stats_line_still_has_an_exposure():
    """The reverted generic receive can oops within 0.3 s, before the checker's first
    stats line: the violations' receive counts and times are the exposure then."""
    from lab.splat import crashed_of_splat
    host = FakeHost([
        {"type": "load-start", "at": 6.0},
        {"type": "violation", "kind": "order", "at": 6.3, "rx": 60},
        {"type": "violation", "kind": "order", "at": 6.4, "rx": 132},
        {"type": "violation", "kind": "order", "at": 6.35, "rx": 100},   # another socket's, older
    ])
    r = run_target(host, spec(), label="vm-0", kernel="k")
    assert r.infra_error and r.timeline == []
    assert r.packets == 132, "the largest receive count any violation carried"
    import time

    from lab.splat import Splat
    oops = Splat("[ 7.0] BUG: kernel NULL pointer dereference", seen_at=time.monotonic(), after_load=True)
    assert crashed_of_splat(r, [oops], traced=False)
    assert r.load_seconds == 0.4 and r.packets == 132


def test_time_to_first_violation_runs_from_the_senders_ready_line():
    """load-start goes out before xsksend is even started: the senders' ready is the origin,
    load start the second figure."""
    host = FakeHost([
        {"type": "load-start", "at": 1.0},
        {"type": "sender", "sender_type": "ready", "at": 1.4, "senders": 2},
        {"type": "violation", "kind": "order", "at": 1.65, "rx": 40, "onset": True},
        {"type": "stats", "rx": 1000, "at": 2.0, "by_kind": {"order": 1}},
        {"type": "agent-done", "reason": "duration", "load_seconds": 1.0, "at": 2.1},
    ])
    r = run_target(host, spec(), label="vm-0", kernel="k")
    assert r.first_violation_s == 0.25 and r.first_violation_origin == "senders ready"
    assert r.first_violation_from_load_start_s == 0.65 and r.senders_ready_s == 0.4
    assert not r.notes


def test_a_guest_dead_before_its_senders_spoke_falls_back_to_load_start_and_says_so():
    host = FakeHost([
        {"type": "load-start", "at": 6.0},
        {"type": "violation", "kind": "order", "at": 6.3, "rx": 60},
    ])
    r = run_target(host, spec(), label="vm-0", kernel="k")
    assert r.first_violation_s == 0.3 == r.first_violation_from_load_start_s
    assert r.first_violation_origin == "load start"
    assert any("measured from load start" in n for n in r.notes)


def test_onsets_come_from_the_checker_and_each_violation_says_whether_it_is_one():
    events = [{"type": "load-start", "at": 0.0}]
    events += [{"type": "violation", "kind": "order", "at": 0.1, "rx": 10 + i, "onset": i == 0}
               for i in range(5)]
    events += [{"type": "violation", "kind": "late", "at": 0.11, "rx": 20, "onset": False},
               {"type": "agent-done", "reason": "error", "error": "guest gone"}]
    r = run_target(FakeHost(events), spec(), label="vm-0", kernel="k")
    assert r.by_kind == {"order": 5, "late": 1} and r.onsets() == {"order": 1, "late": 0}
    # the checker's totals win over the events it printed (it stops printing after 1,000)
    stats = {"type": "done", "at": 1.0, "rx": 9000, "by_kind": {"order": 769, "late": 0},
             "onsets_by_kind": {"order": 1, "late": 0}}
    r = run_target(FakeHost(events[:2] + [stats, events[-1]]), spec(), label="vm-0", kernel="k")
    assert r.by_kind["order"] == 769 and r.onsets() == {"order": 1}
    # a kind the checker has no onset count for (a console splat) counts each one
    r.by_kind["kernel-splat"] = 1
    assert r.onsets() == {"order": 1, "kernel-splat": 1}


def _flow(points, load_seconds=60.0, **kw):
    from lab.workload import TargetResult
    t = TargetResult(label="vm-0", kernel="k", load_seconds=load_seconds, reason="duration",
                     packets=max([rx for _, rx in points] or [0]), **kw)
    t.rx_points = list(points)
    return t


def test_exposure_is_the_time_the_receive_count_rose():
    steady = _flow([(i * 0.5, 1000 * i) for i in range(1, 121)])
    assert steady.exposure_s() == 60.0 and steady.lost_reason() is None
    # a 20 s gap in the middle is not exposure, and the final line after the load is clipped
    gap = _flow([(i * 0.5, 1000 * min(i, 40) + 1000 * max(0, i - 80)) for i in range(1, 121)]
                + [(75.0, 200_000)])
    assert gap.exposure_s() == 40.0
    assert _flow([]).exposure_s() == 0.0


def test_a_target_that_checked_nothing_is_lost_not_clean():
    assert _flow([]).lost_reason() == "no packets reached the checker"
    t = _flow([(i * 0.5, 1000 * i) for i in range(1, 121)],
              senders={"sender_type": "done", "errors": 12, "error": "Message too long"})
    assert "12 send error(s) (Message too long)" in t.lost_reason()
    early = _flow([(i * 0.5, 1000 * min(i, 20)) for i in range(1, 121)])
    assert early.lost_reason() == "traffic stopped early: no packet after 10.0 s of a 60.0 s load"
    # back-pressure is normal, and a violation is evidence whatever the load did
    assert _flow([(60.0, 10**6)], senders={"errors": 0, "enobufs": 5000}).lost_reason() is None
    assert _flow([], by_kind={"kernel-splat": 1}).lost_reason() is None


class EndlessProc(FakeProc):
    """An agent that never ends: it keeps printing stats (or, quiet=True, prints nothing)
    until it is given up on, and its wait() times out like a real process's."""

    def __init__(self, quiet=False):
        super().__init__([])
        import threading
        self.quiet = quiet
        self.stopped = threading.Event()
        self.how = None

    def lines(self):
        import time
        i = 0
        while not self.stopped.is_set():
            if self.quiet:
                self.stopped.wait(0.05)
                continue
            i += 1
            yield json.dumps({"type": "stats", "rx": i, "at": i * 0.01})
            time.sleep(0.01)

    def poll(self):
        return None

    def wait(self, timeout=None):
        import subprocess
        raise subprocess.TimeoutExpired("agent", timeout)

    def terminate(self):
        self.how = self.how or "terminate"
        self.stopped.set()

    def abandon(self):
        self.how = self.how or "abandon"
        self.stopped.set()


class EndlessHost(FakeHost):
    def __init__(self, proc):
        super().__init__([])
        self.proc = proc

    @contextmanager
    def spawn(self, argv, env=None):
        yield self.proc


def _short_spec():
    import dataclasses
    return dataclasses.replace(spec(), duration=0.2)


def test_an_agent_that_overruns_its_deadline_is_stopped_and_the_run_inconclusive():
    from lab.session import rows_from_targets
    from lab.verdict import INCONCLUSIVE
    for quiet in (False, True):
        host = EndlessHost(EndlessProc(quiet=quiet))
        r = run_target(host, _short_spec(), label="local", kernel="k", deadline_slack=0.3)
        assert r.infra_error == "agent overran its deadline (0.5 s after its start) and was stopped"
        assert host.proc.how == "abandon"
        row = rows_from_targets("k", [r], 1.0, 0.95, vms=0)
        assert row.verdict == INCONCLUSIVE and "overran its deadline" in row.infra_errors[0]


def test_cancel_asks_the_agent_to_stop_and_keeps_its_counts():
    import threading

    class Stoppable(EndlessProc):
        def lines(self):
            yield json.dumps({"type": "load-start", "at": 0.0})
            yield from super().lines()
            # what the agent says while it winds down after SIGTERM
            yield json.dumps({"type": "agent-done", "reason": "interrupted"})

    cancel = threading.Event()
    host = EndlessHost(Stoppable())
    threading.Timer(0.3, cancel.set).start()
    r = run_target(host, spec(), label="local", kernel="k", cancel=cancel)
    assert host.proc.how == "terminate"    # asked to stop, not abandoned: it says its last lines
    assert r.interrupted and r.infra_error == "interrupted" and r.reason == "interrupted"
    assert r.packets > 0 and r.exposure_s() > 0 and r.lost_reason() is None


def test_the_checker_and_the_load_are_wired_to_devices_the_topology_builds():
    import copy
    base = scen.load("generic-rx-race")
    for mode in ("rxdrop", "forward"):
        data = copy.deepcopy(base.data)
        data["checker"]["mode"], data["load"]["iperf3"] = mode, mode == "forward"
        spec = agent_spec(scen.Scenario(name=base.name, path=base.path, data=data), duration=1, seed=1,
                          bin_dir="/b", stop_on_first=True)
        ends = {(v.a_ns, v.a): (v.a_mac, v.a_addr) for v in spec.topology.veths}
        ends |= {(v.b_ns, v.b): (v.b_mac, v.b_addr) for v in spec.topology.veths}
        assert (spec.checker.ns, spec.checker.dev) in ends and (spec.sender.ns, spec.sender.dev) in ends
        target = [addr for mac, addr in ends.values() if mac == spec.sender.dst_mac]
        assert target and target[0].split("/")[0] == spec.sender.dst_ip, mode
        assert ends[(spec.sender.ns, spec.sender.dev)][1].split("/")[0] == spec.sender.src_ip
        if mode == "forward":
            assert (spec.checker.ns, spec.checker.peer_dev) in ends
            assert spec.iperf.server_ip == spec.sender.dst_ip and spec.iperf.client_ns == spec.sender.ns


def test_each_agent_event_is_read_into_its_typed_record():
    from lab import workload as w
    v = {"type": "violation", "at": 2.5, "kind": "order", "rx": 7, "onset": False}
    assert w.parse_event(v) == w.Violation(2.5, "order", 7, False, v)
    done = {"type": "done", "at": 4, "rx": 9, "by_kind": {"order": 3}}
    assert w.parse_event(done) == w.Stats(4.0, 9, None, {"order": 3}, None, True, done)
    assert w.parse_event({"type": "stats", "rx": 1, "foreign": 2, "by_kind": "junk"}).by_kind is None
    assert w.parse_event({"type": "load-start", "at": 1}) == w.LoadStart(1.0)
    assert w.parse_event({"type": "sender", "at": 1, "sender_type": "ready"}).ready
    assert w.parse_event({"type": "note", "text": "t", "knob": "/proc/x", "applied": 1}) == \
        w.Note(0.0, "t", "/proc/x", True)
    assert w.parse_event({"type": "amplifier", "at": 3, "target": "vm-0", "phase": "p", "hits": 4}) == \
        w.Amplifier(3.0, {"hits": 4})
    assert w.parse_event({"type": "iperf", "error": "no data"}).error == "no data"
    assert w.parse_event({"type": "agent-error", "what": "checker", "stderr": ["a", "b"]}) == \
        w.AgentError(0.0, "checker", ("a", "b"))
    assert w.parse_event({"type": "agent-done", "reason": "duration", "load_seconds": 5}) == \
        w.AgentDone(0.0, "duration", 5.0, "None")
    assert w.parse_event({"type": "topology", "at": 0.2}) == w.OtherEvent(0.2, "topology")


def test_every_event_type_the_agent_writes_has_its_record():
    """A new event type in lab/agent/agent.py must be given a record here, or be named as one
    run_target keeps nothing of."""
    import re
    from pathlib import Path

    from lab import workload as w
    written = set(re.findall(r'"type": "([a-z-]+)"', (Path(w.__file__).parent / "agent" / "agent.py").read_text()))
    assert {"load-start", "agent-done", "agent-error", "note", "iperf", "evidence"} <= written
    for typ in written - {"heartbeat"}:     # heartbeats never reach parse_event (run_target drops them)
        record = w.parse_event({"type": typ})
        assert not isinstance(record, w.OtherEvent) or typ in {"topology"}, typ


def test_the_reducer_folds_a_stream_into_a_result():
    from lab import workload as w
    res = w.TargetResult(label="vm-0", kernel="k")
    state = w._Reduction(res)
    for ev in ({"type": "load-start", "at": 10.0},
               {"type": "sender", "at": 10.5, "sender_type": "ready"},
               {"type": "violation", "at": 11.0, "kind": "order", "rx": 100},
               {"type": "violation", "at": 11.1, "kind": "order", "rx": 120, "onset": False},
               {"type": "stats", "at": 12.0, "rx": 500, "by_kind": {"order": 5}, "onsets_by_kind": {"order": 2}},
               {"type": "agent-done", "at": 13.0, "reason": "first-violation", "load_seconds": 3.0}):
        state.apply(w.parse_event(ev))
    assert state.done and state.last_rx == 500 and res.reason == "first-violation"
    assert res.first_violation_s == 0.5 and res.first_violation_origin == "senders ready"
    assert res.first_violation_from_load_start_s == 1.0 and res.senders_ready_s == 0.5
    assert res.by_kind == {"order": 5} and res.onsets_by_kind == {"order": 2}   # the checker's counts win
    assert res.timeline == [(2.0, 500, 5)] and res.last_heard_s == 3.0 and len(res.violations) == 2
