"""The orchestrator's view of an agent stream, with a fake Host standing in for the transport."""
import json
from contextlib import contextmanager

from lab import scenario as scen
from lab.agent import AgentSpec
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
    r = run_target(host, spec(), label="vm-0", kernel="k", on_event=lambda l, e: seen.append(e["type"]))
    assert r.infra_error is None
    assert r.packets == 5000 and r.load_seconds == 5.0
    assert r.by_kind == {"order": 6, "poison": 1}
    assert abs(r.first_violation_s - 0.25) < 1e-9
    assert "violation" in seen and host.argv[:3] == ["python3", "-m", "lab.agent"]


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
    r = run_target(ok, spec(), label="vm-0", kernel="k", on_event=lambda l, e: seen.append(e["type"]))
    assert r.iperf["bytes"] == 10**9 and not r.notes and "heartbeat" not in seen
    bad = FakeHost([{"type": "iperf", "error": "iperf3 moved no data", "bytes": 0},
                    {"type": "agent-done", "reason": "duration", "load_seconds": 5.0}])
    r = run_target(bad, spec(), label="vm-0", kernel="k")
    assert any("iperf3: iperf3 moved no data" in n for n in r.notes)


def test_a_guest_that_crashes_before_its_first_stats_line_still_has_an_exposure():
    """The reverted generic receive can oops within 0.3 s, before the checker's first
    stats line: the violations' receive counts and times are the exposure then."""
    from lab.fleet import crashed_of_splat
    host = FakeHost([
        {"type": "load-start", "at": 6.0},
        {"type": "violation", "kind": "order", "at": 6.3, "rx": 60},
        {"type": "violation", "kind": "order", "at": 6.4, "rx": 132},
        {"type": "violation", "kind": "order", "at": 6.35, "rx": 100},   # another socket's, older
    ])
    r = run_target(host, spec(), label="vm-0", kernel="k")
    assert r.infra_error and r.timeline == []
    assert r.packets == 132, "the largest receive count any violation carried"
    assert crashed_of_splat(r, ["[ 7.0] BUG: kernel NULL pointer dereference\n"], traced=False)
    assert r.load_seconds == 0.4 and r.packets == 132
