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
