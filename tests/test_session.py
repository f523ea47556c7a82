"""The live progress line of a run (lab.session.Progress)."""
from lab.session import Progress


def test_progress_line_sums_packets_and_violations_and_announces_the_first(capsys):
    p = Progress(enabled=True)
    p.on_event("vm-0", {"type": "stats", "rx": 1000, "violations": 0})
    p.on_event("vm-1", {"type": "stats", "rx": 500, "violations": 0})
    p.on_event("vm-1", {"type": "violation", "kind": "order", "queue": 0, "cpu": 1})
    line = p.line()
    assert "targets 2" in line and "packets 1,500" in line and "violations 1" in line
    err = capsys.readouterr().err
    assert "packets 1,000" in err                       # printed as it goes
    assert "first violation on vm-1: order (queue 0, cpu 1)" in err


def test_progress_can_be_silenced(capsys):
    p = Progress(enabled=False)
    p.on_event("vm-0", {"type": "violation", "kind": "poison"})
    p.close()
    assert capsys.readouterr().err == ""
