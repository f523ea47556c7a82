"""`racelab selftest`: its plan covers every kind, an injection case ends at its violation."""
import subprocess
import sys

import pytest

from lab import dataplane, selftest
from lab.agent.dataplane import INJECT_KINDS


def test_the_plan_has_every_kind_in_both_xdp_modes_and_a_clean_control_each():
    plan = selftest.plan_cases(["generic", "native"], list(INJECT_KINDS))
    assert "late" in INJECT_KINDS
    for xdp in ("generic", "native"):
        assert {k for x, m, k in plan if x == xdp and m == "rxdrop"} == {"", *INJECT_KINDS}
        assert {k for x, m, k in plan if x == xdp and m == "forward"} == {"", *selftest.FORWARD_KINDS}
    assert len(plan) == len(set(plan))


def _child():
    """A process standing in for the agent: exits 7 on SIGUSR1."""
    return subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
                             "print('up', flush=True)\ntime.sleep(30)"], stdout=subprocess.PIPE, text=True)


def test_an_injection_case_is_stopped_at_its_own_kind_only():
    p = _child()
    try:
        assert p.stdout.readline().strip() == "up"
        stop = selftest._StopAtKind("late")
        stop("x", {"type": "violation", "kind": "order"})     # before load-start: no pid yet
        stop("x", {"type": "load-start", "pid": p.pid})
        stop("x", {"type": "violation", "kind": "order"})     # another kind: keep going
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(0.5)
        stop("x", {"type": "violation", "kind": "late"})
        assert p.wait(10) == 7 and stop.sent
        stop("x", {"type": "violation", "kind": "late"})      # once only; the process is gone
    finally:
        p.kill()
        p.wait()


@pytest.mark.root
def test_selftest_passes_and_an_injection_case_ends_early(capsys):
    rc = selftest.run_all(xdp_modes=["generic"], kinds=["order", "late"], seconds=3.0, jobs=3)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("ok ")]
    assert len(lines) == 3, out
    # the load ran to 3 s for the clean control only; each injection stopped at its violation
    assert all("packets" in ln for ln in lines)
    bd = str(dataplane.build())
    c = selftest.run_one(bd, "generic", "order", 40.0, seed=5)
    assert c.ok and c.seconds < 20.0, ("stopped at its violation, not after 40 s", c)
