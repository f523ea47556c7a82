"""Live output: the one progress display (lab.progress) on a TTY and in a log, a kernel build's
percentage and ETA from a comparable build, a run's live line fed from several guest threads,
a fleet that says it is booting, a matrix that says when each cell starts and ends."""
import io
import json
import logging
import sys
import threading
import time

import pytest

from lab import progress, session
from lab.kernels import kbuild
from lab.run import BuildFailed


class FakeTTY(io.StringIO):
    """A terminal that keeps what was written to it."""

    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def messages(caplog):
    return [r.getMessage() for r in caplog.records]


def cleared(out, text):
    """text was shown on the terminal and the display's line is erased after its last showing."""
    return text in out and "\x1b[2K" in out[out.rindex(text):] and out.endswith("\x1b[2K")


# ------------------------------------------------------------------ the display


def test_plain_lines_come_at_most_every_interval_the_first_at_once(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="racelab"):
        d = progress.Display(True, every=10.0, stream=io.StringIO(), clock=clock)
        assert not d.tty
        d.update("a")
        clock.t += 9
        d.update("b")                          # too soon
        clock.t += 1
        d.update(lambda: "c")
        d.update(lambda: pytest.fail("a line that is not shown is never made"))
        d.close()
        d.update("after close")
    assert messages(caplog) == ["a", "c"]


def test_quiet_or_disabled_shows_nothing(caplog, capsys):
    t = FakeTTY()
    with caplog.at_level(logging.WARNING, logger="racelab"):   # -q
        d = progress.Display(True, stream=t)
        d.update("x")
        d.note("y")
        d.close()
    with caplog.at_level(logging.INFO, logger="racelab"):
        d = progress.Display(False, stream=t)
        d.update("x")
        d.note("y")
        d.close()
    assert t.getvalue() == "" and messages(caplog) == []
    assert capsys.readouterr() == ("", "")


def test_on_a_tty_the_line_is_redrawn_log_records_go_above_it_and_it_is_cleared(caplog, capsys):
    t = FakeTTY()
    h = logging.StreamHandler(t)                # as setup_logging's handler on stderr
    logging.getLogger().addHandler(h)
    try:
        with caplog.at_level(logging.INFO, logger="racelab"), progress.Display(True, stream=t) as d:
            assert d.tty
            d.update("packets 1")
            assert h.stream is not t            # through rich while the line is up
            logging.getLogger("racelab").info("a record")
            print('{"json": "document"}')     # stdout is left alone (--json)
            d.update("packets 2")
    finally:
        logging.getLogger().removeHandler(h)
    out = t.getvalue()
    assert "\r\x1b[2Ka record\n" in out        # the line erased, the record, then the line again
    assert cleared(out, "packets 2") and "\x1b[?25h" in out   # and the cursor back
    assert h.stream is t
    assert capsys.readouterr().out == '{"json": "document"}\n' and "json" not in out


def test_ctrl_c_stops_the_display_and_clears_its_line(caplog):
    t = FakeTTY()
    with (caplog.at_level(logging.INFO, logger="racelab"), pytest.raises(KeyboardInterrupt),
          progress.Display(True, stream=t) as d):
        d.update("packets 1")
        raise KeyboardInterrupt
    with caplog.at_level(logging.INFO, logger="racelab"):
        assert d.closed and cleared(t.getvalue(), "packets 1")
        d.update("a guest thread's late event")  # never brings the display back
    assert progress._active is None             # so the next display can start
    assert "late" not in t.getvalue()


def test_a_second_display_while_one_is_up_shows_plain_lines(caplog):
    with caplog.at_level(logging.INFO, logger="racelab"), progress.Display(True, stream=FakeTTY()) as first:
        first.update("the first")
        with progress.Display(True, stream=FakeTTY()) as second:
            second.update("the second")
            assert not second.tty
    assert messages(caplog) == ["the second"]


def tree(build, name, full_steps=None):
    d = build / name
    d.mkdir(parents=True)
    if full_steps is not None:
        (d / "state.json").write_text(json.dumps({"full_steps": full_steps}))
    return d


def test_a_first_build_is_estimated_from_a_comparable_tree(tmp_path):
    b = tmp_path / "build"
    tree(b, "debsrc-linux-source-6.1-6.1.192-3", 1828)
    tree(b, "debsrc-linux-source-6.12-6.11.0-1", 2600)
    new12 = tree(b, "debsrc-linux-source-6.12-6.12.117-1~deb12u1")
    new7 = tree(b, "debsrc-linux-source-7.0-7.0.1-1")
    # the same series first, then any other tree
    assert kbuild.estimate_steps(new12, fresh=True) == kbuild.Estimate(
        2600, "a full build of debsrc-linux-source-6.12-6.11.0-1")
    assert kbuild.estimate_steps(new7, fresh=True).steps in (1828, 2600)
    # its own last full build beats any other
    (new12 / "state.json").write_text(json.dumps({"full_steps": 2000}))
    assert kbuild.estimate_steps(new12, fresh=True) == kbuild.Estimate(2000, "this tree's last full build")
    # an incremental build has no model
    assert kbuild.estimate_steps(new12, fresh=False) is None
    assert kbuild.estimate_steps(tree(tmp_path / "lonely", "x"), fresh=True) is None


def steps(p, n):
    for i in range(n):
        p.line(f"  CC      kernel/f{i}.o\n")


def test_the_build_line_has_a_percentage_and_an_eta(caplog):
    with caplog.at_level(logging.INFO, logger="racelab"):
        p = kbuild.Progress("6.12.117", True, estimate=kbuild.Estimate(200, "a full build of X"), every=0.0)
        p.start -= 50              # 50 s in
        steps(p, 50)
        p.line("  LD      vmlinux.o\n")
    assert "~200 steps expected (from a full build of X)" in caplog.text
    text = p.text()
    assert "51 steps of ~200 (~26%)" in text
    # 51 steps in ~50 s: ~149 left at ~1/s
    eta = p.eta()
    assert 120 < eta < 170, eta
    assert "ETA ~2m" in text
    p.done()


def test_a_build_past_its_estimate_stays_below_100_percent():
    p = kbuild.Progress("k", False, estimate=kbuild.Estimate(10, "x"))
    p.start -= 10
    steps(p, 30)
    assert p.fraction() == 0.99 and p.eta() == 0 and "past the estimate" in p.text()


def test_without_a_model_only_steps_and_time():
    p = kbuild.Progress("k", False)
    steps(p, 25)
    assert p.fraction() is None and p.eta() is None
    assert p.text().startswith("[kernel] k: 25 steps, 0m0")
    p.line("  not a step\n")
    assert p.steps == 25


def test_a_build_off_a_tty_logs_a_line_every_interval(caplog):
    with caplog.at_level(logging.INFO, logger="racelab"):
        p = kbuild.Progress("k", True, estimate=kbuild.Estimate(100, "x"), every=30.0)
        clock = Clock()
        p.display.clock = clock
        steps(p, 10)
        clock.t += 30
        steps(p, 1)
        p.done()
    lines = [m for m in messages(caplog) if "steps" in m]
    assert lines[0] == "[kernel] k: ~100 steps expected (from x)"
    assert len(lines) == 3 and lines[1].startswith("[kernel] k: 1 steps of ~100 (~1%), 0m")
    assert lines[2].startswith("[kernel] k: 11 steps of ~100 (~11%)")


def test_a_failed_make_leaves_no_bar_on_the_terminal(tmp_path, monkeypatch, caplog):
    t = FakeTTY()
    monkeypatch.setattr(sys, "stderr", t)
    (tmp_path / "Makefile").write_text("bzImage:\n\t@echo '  CC      a.o'\n\t@echo '  CC      b.o'\n\t@false\n")
    with caplog.at_level(logging.INFO, logger="racelab"):
        p = kbuild.Progress("k", True, estimate=kbuild.Estimate(10, "x"))
        with open(tmp_path / "log", "w") as logf, pytest.raises(BuildFailed):
            kbuild.make(tmp_path, ["bzImage"], logf, p)
    assert p.steps == 2 and p.display.closed
    assert cleared(t.getvalue(), "[kernel] k")
    assert progress._active is None


def test_a_run_line_sums_packets_and_violations_and_says_each_first_violation_once(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="racelab"):
        p = session.Progress(enabled=True, every=0.0)
        p.on_event("vm-0", {"type": "stats", "rx": 1000, "violations": 0})
        p.on_event("vm-1", {"type": "stats", "rx": 500, "violations": 0})
        p.on_event("vm-1", {"type": "violation", "kind": "order", "queue": 0, "cpu": 1})
        p.on_event("vm-1", {"type": "violation", "kind": "order", "queue": 0, "cpu": 1})
        p.close()
    line = p.line()
    assert "targets 2" in line and "packets 1,500" in line and "violations 2" in line
    msgs = messages(caplog)
    assert "targets 1  packets 1,000  violations 0" in msgs[0]        # said as it goes
    assert [m for m in msgs if m.startswith("first")] == ["first violation on vm-1: order (queue 0, cpu 1)"]
    assert capsys.readouterr() == ("", "")                           # a log line, never stdout


def test_a_run_line_can_be_silenced(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="racelab"):
        p = session.Progress(enabled=False)
        p.on_event("vm-0", {"type": "violation", "kind": "poison"})
        p.close()
    assert messages(caplog) == [] and capsys.readouterr() == ("", "")


def test_several_guest_threads_feed_one_run_line(caplog, monkeypatch):
    # each thread feeds many targets of its own, so that new targets appear while the other
    # threads sum them up, and says each one's violations as they come
    t = FakeTTY()
    monkeypatch.setattr(sys, "stderr", t)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                # threads switch as often as they can
    n, labels, per = 8, 40, 5
    start = threading.Barrier(n)
    errors = []

    def guest(i):
        start.wait()
        try:
            for k in range(per):
                for j in range(labels):
                    p.on_event(f"vm-{i}-{j}", {"type": "violation", "kind": "order", "queue": j, "cpu": i})
                    p.on_event(f"vm-{i}-{j}", {"type": "stats", "rx": k + 1, "violations": 0})
        except Exception as e:                 # a thread's error would be lost otherwise
            errors.append(e)
    try:
        with caplog.at_level(logging.INFO, logger="racelab"):
            p = session.Progress(True)
            threads = [threading.Thread(target=guest, args=(i,)) for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            p.close()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    total = n * labels * per
    assert p.line().endswith(f"targets {n * labels}  packets {total:,}  violations {total:,}")
    firsts = sorted(m for m in messages(caplog) if m.startswith("first violation on"))
    assert firsts == sorted(f"first violation on vm-{i}-{j}: order (queue {j}, cpu {i})"
                            for i in range(n) for j in range(labels))
    assert cleared(t.getvalue(), "targets") and progress._active is None


def test_a_matrix_says_when_each_cell_starts_and_ends_with_a_tally(monkeypatch, tmp_path, caplog):
    from lab import fleet, image
    from lab import matrix as m
    from lab import verdict as v

    monkeypatch.setattr(fleet, "preflight_vm", lambda: None)
    monkeypatch.setattr(fleet, "build_kernels", lambda names, progress=True: [None] * len(names))
    monkeypatch.setattr(image, "ensure_image", lambda progress=True: None)
    running, most = [0], [0]
    lock = threading.Lock()

    def run_cell(cell, **kw):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        bad = cell.kernel.endswith("revert-generic-rx") and cell.scenario == "veth-napi-race"
        cell.row = v.decide(cell.kernel, vms=1, packets=1000, seconds=5, wall=6,
                            by_kind={"order": 1} if bad else {}, first_violation_s=None)
        cell.outcome = m.cell_outcome(cell.expected, cell.row)
        with lock:
            running[0] -= 1
        return cell
    monkeypatch.setattr(m, "run_cell", run_cell)
    kernels = ["6.1.192", "6.1.192+revert-generic-rx"]
    with caplog.at_level(logging.INFO, logger="racelab"):
        cells = m.run_matrix(kernels, ["veth-napi-race"], budget=5, vms=1, jobs=2, out=tmp_path, uris=["u"], seed=1)
    assert most[0] == 2                      # two cells at once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[matrix]")]
    starts = [x for x in lines if x.startswith("[matrix] start")]
    dones = [x for x in lines if x.startswith("[matrix] done")]
    assert len(starts) == 2 and len(dones) == 2
    assert "veth-napi-race on 6.1.192 (cell 1/2, u)" in starts[0]
    assert "[1/2 done:" in dones[0] and "[2/2 done: 1 pass, 1 fail, 0 missed, 0 error;" in dones[1]
    assert {c.outcome for c in cells} == {m.PASS, m.FAIL}


def test_a_fleet_says_it_is_booting(monkeypatch, tmp_path, caplog):
    from lab import fleet
    from lab import scenario as scen
    from lab import vm as vmmod

    class FakeVM:
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(vmmod, "VM", FakeVM)
    s = scen.load("generic-rx-race", {"vm.pin": False})
    with (caplog.at_level(logging.INFO, logger="racelab"),
          fleet.booted(object(), object(), 2, label="6.1.192", s=s, out=tmp_path, uris=("u",)) as vms):
        assert len(vms) == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert "booting 2 guests on 6.1.192..." in msgs
