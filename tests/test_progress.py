"""Live output: a kernel build's percentage and ETA from a comparable build, a fleet that says
it is booting, a matrix that says when each cell starts and ends."""
import json
import logging
import threading
import time


from lab.kernels import kbuild


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
        cell.outcome = m.judge(cell.expected, cell.row)
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
