"""The agent's wait for a child's ready line (the checker, the amplifier), with real processes."""

from __future__ import annotations

import json
import queue
import sys

import pytest

from lab.agent import agent


def _child(code: str) -> tuple[agent.Child, queue.Queue]:
    out: queue.Queue = queue.Queue()
    return agent.Child("checker", [sys.executable, "-c", code], out), out


def test_ready_after_other_lines_passes_every_line_on(capsys):
    c, out = _child("import json\nprint(json.dumps({'type': 'note', 'text': 'x'}))\n"
                    "print('not json')\nprint(json.dumps({'type': 'ready', 't': 0.0}))\n"
                    "import time; time.sleep(5)")
    try:
        agent._wait_ready(c, out, 0.0, timeout=20)
    finally:
        c.stop(1)
    emitted = [json.loads(x)["type"] for x in capsys.readouterr().out.splitlines()]
    assert emitted == ["note", "ready"]


def test_a_checker_that_exits_before_ready_is_named_with_its_stderr(capsys):
    c, out = _child("import sys; sys.stderr.write('bind: Device or resource busy\\n'); sys.exit(3)")
    with pytest.raises(agent.Stop, match="exited before ready: bind: Device or resource busy"):
        agent._wait_ready(c, out, 0.0, timeout=20)
    err = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert err[-1]["type"] == "agent-error" and err[-1]["returncode"] == 3


def test_a_silent_checker_times_out():
    c, out = _child("import time; time.sleep(30)")
    try:
        with pytest.raises(agent.Stop, match="not ready within 1 s"):
            agent._wait_ready(c, out, 0.0, timeout=1.0)
    finally:
        c.stop(1)


def test_the_amplifier_wait_sees_its_own_types():
    c, out = _child("import json\nprint(json.dumps({'type': 'stats', 'hits': [1]}))\n"
                    "print(json.dumps({'type': 'ready', 'probes': []}))")
    seen: list = []
    try:
        ev = agent._wait_line(c, out, "ready", 20, on_event=seen.append)
    finally:
        c.stop(1)
    assert ev == {"type": "ready", "probes": []} and [e["type"] for e in seen] == ["stats", "ready"]
