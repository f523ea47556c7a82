import dataclasses
import json
import math
from pathlib import Path

import pytest

from lab import bisect as b
from lab import verdict as v


def test_budget_from_rate_gives_one_percent_miss():
    rate = b.rate_lower_bound(3, 2.0)           # 3 reproductions in 2 s of load
    assert rate == pytest.approx(v.gamma_quantile(3, 0.05) / 2.0)
    budget = b.step_budget(rate, floor=0)
    assert math.exp(-rate * budget) == pytest.approx(0.01)
    # a conservative rate means a longer budget than the point estimate would give
    assert budget > -math.log(0.01) / (3 / 2.0)


def test_budget_floor_and_cap():
    assert b.step_budget(1000.0, floor=5) == 5
    assert b.step_budget(0.0, cap=600) == 600


def test_step_confidence():
    assert b.step_confidence(True, 0.1, 1.0) == 1.0
    assert b.step_confidence(False, 1.0, 4.6052) == pytest.approx(0.99, abs=1e-4)
    assert b.overall_confidence([0.99, 1.0, 0.99]) == pytest.approx(0.9801)
    assert b.overall_confidence([]) == 0.0


@pytest.mark.parametrize("find,outcome,code", [
    ("cause", "reproduced", 1), ("cause", "clean", 0), ("cause", "skip", 125),
    ("fix", "reproduced", 0), ("fix", "clean", 1), ("fix", "skip", 125),
])
def test_exit_codes_for_git_bisect_run(find, outcome, code):
    assert b.exit_code(find, outcome) == code


def test_infrastructure_failure_is_a_skip(monkeypatch, tmp_path):
    """A build failure in a step becomes exit 125, never a verdict."""
    from lab.kernels import kernel
    from lab.run import BuildFailed

    st = b.State(tree=str(tmp_path), scenario="generic-rx-race", find="cause", budget=5, rate_low=1.0,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    monkeypatch.setattr(kernel, "resolve", lambda spec: spec)

    def boom(spec, progress=False):
        raise BuildFailed("make failed")
    monkeypatch.setattr(kernel, "ensure", boom)
    rec = b.test_commit(st, "abc123", "step")
    assert rec["outcome"] == "skip" and "build failed" in rec["reason"]
    assert b.exit_code("cause", rec["outcome"]) == 125


def test_sweep_removes_only_the_clones_of_dead_bisections(tmp_path):
    import os
    import subprocess
    from lab.bisect import _sweep_stale_clones
    p = subprocess.Popen(["true"])
    p.wait()
    dead = tmp_path / f"racelab-bisect-{p.pid}-abc"
    live = tmp_path / f"racelab-bisect-{os.getpid()}-def"
    legacy = tmp_path / "racelab-bisect-xyz"
    for d in (dead, live, legacy):
        (d / "repo.git").mkdir(parents=True)
    assert _sweep_stale_clones(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and legacy.exists()


def _state(tmp_path, **kw):
    base = dict(tree=str(tmp_path / "linux"), scenario="generic-rx-race", find="cause", budget=30.0, rate_low=0.2,
                vms=1, log=str(tmp_path / "bisect.jsonl"), out=str(tmp_path), seed=7, good="a" * 40, bad="b" * 40)
    return b.State(**{**base, **kw})


def test_resume_reuses_the_recorded_verdict_and_reruns_the_step_cut_short(tmp_path, monkeypatch, capsys):
    import json
    import subprocess
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    done, cut = "1" * 40, "2" * 40
    st = _state(tmp_path, bisect_repo=str(repo))
    st.save(tmp_path / "state.json")
    with open(st.log, "w") as f:
        f.write(json.dumps({"label": "calibrate0", "commit": "b" * 40, "outcome": "reproduced"}) + "\n")
        f.write(json.dumps({"label": "step", "commit": done, "outcome": "reproduced", "exit": 1}) + "\n")
        f.write('{"label": "step", "commit": "' + cut)          # the line the interruption cut short
    ran = []
    monkeypatch.setattr(b, "test_commit", lambda st, sha, label: ran.append(sha) or
                        {"commit": sha, "label": label, "outcome": "clean", "confidence": 0.99})
    for sha, want in ((done, 1), (cut, 0)):
        (repo / "BISECT_HEAD").write_text(sha + "\n")
        assert b.step_main(str(tmp_path / "state.json")) == want
    assert ran == [cut]                              # the recorded step was not run again
    assert "(recorded)" in capsys.readouterr().err
    assert b.recorded_step(st.log, cut)["outcome"] == "clean"


def test_resume_refuses_a_different_bisection_and_a_missing_one(tmp_path):
    from lab.run import BadInput
    shas = {"good": "a" * 40, "bad": "b" * 40}
    with pytest.raises(BadInput) as e:
        b.resume_state(tmp_path, str(tmp_path / "linux"), "generic-rx-race", "cause", shas)
    assert "no state.json" in e.value.message
    _state(tmp_path).save(tmp_path / "state.json")
    assert b.resume_state(tmp_path, str(tmp_path / "linux"), "generic-rx-race", "cause", shas).budget == 30.0
    with pytest.raises(BadInput) as e:
        b.resume_state(tmp_path, str(tmp_path / "linux"), "veth-napi-race", "fix", {**shas, "bad": "c" * 40})
    msg = e.value.message
    assert "different bisection" in msg and "scenario" in msg and "find" in msg and "bad" in msg


def test_log_lines_stay_whole(tmp_path):
    import json
    log = tmp_path / "bisect.jsonl"
    b._append(str(log), {"n": 1})
    b._append(str(log), {"n": 2})
    with open(log, "a") as f:
        f.write('{"n": 3, "cut')
    b._append(str(log), {"n": 4})
    lines = log.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines if not line.endswith("cut")] == [1, 2, 4] and len(lines) == 4


def test_a_rerun_step_keeps_the_cut_run_apart(tmp_path, monkeypatch):
    from lab import fleet
    from lab.kernels import kernel
    from lab.run import InfraError
    st = _state(tmp_path)
    cut = tmp_path / "step-abc123-step"
    (cut / "vms").mkdir(parents=True)
    (cut / "events.jsonl").write_text('{"type": "load-start"}\n')
    monkeypatch.setattr(kernel, "resolve", lambda spec: spec)
    monkeypatch.setattr(kernel, "ensure", lambda spec, progress=False: object())
    seen = []

    def run_vm(cfg, progress=False):
        seen.append(cfg.out)
        raise InfraError("no libvirtd in a unit test")
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    for _ in range(2):
        assert b.test_commit(st, "abc123", "step")["outcome"] == "skip"
        Path(seen[-1]).mkdir()
    assert seen == [str(cut), str(cut)]
    assert (tmp_path / "step-abc123-step.cut1" / "events.jsonl").read_text() == '{"type": "load-start"}\n'
    assert (tmp_path / "step-abc123-step.cut2").is_dir()


def test_the_bisection_directory_is_absolute(tmp_path, monkeypatch):
    # the steps run in the private clone: a relative --out (the default) would land there
    monkeypatch.chdir(tmp_path)
    assert b.out_dir("rel/out", "generic-rx-race") == tmp_path / "rel" / "out"
    d = b.out_dir(None, "generic-rx-race")
    assert d.is_absolute() and d.parent == tmp_path / "results" and d.name.startswith("bisect-generic-rx-race-")


def test_resume_follows_a_moved_directory(tmp_path):
    # interrupted in one place, copied elsewhere, resumed there: the log and steps go where it is now
    old, new = tmp_path / "old", tmp_path / "new"
    new.mkdir()
    _state(tmp_path, out=str(old), log=str(old / "bisect.jsonl")).save(new / "state.json")
    st = b.resume_state(new, str(tmp_path / "linux"), "generic-rx-race", "cause",
                        {"good": "a" * 40, "bad": "b" * 40})
    assert st.out == str(new) and st.log == str(new / "bisect.jsonl")


def test_calibration_counts_vm_seconds_as_a_clean_step_does(monkeypatch, tmp_path):
    """--vms 2: a fleet's first violation at 10 s exposed 2 x 10 VM-seconds; a clean step's
    row counts its seconds summed over its guests.  The same units on both sides give the
    designed confidence (0.99 per step at the step budget), not an inflated one."""
    recs = iter([{"outcome": "reproduced", "verdict": "REPRODUCED", "first_violation_s": 10.0, "load_s": 21.0},
                 {"outcome": "reproduced", "verdict": "REPRODUCED", "first_violation_s": 30.0, "load_s": 61.0}])
    monkeypatch.setattr(b, "test_commit", lambda st, sha, label, signal=None: {"commit": sha, **next(recs)})
    st = b.State(tree=str(tmp_path), scenario="generic-rx-race", find="cause", budget=0, rate_low=0,
                 vms=2, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    cal = b.calibrate(st, "c" * 40, attempts=2, max_seconds=60, signal="corruption")
    assert cal.corruption == (2, 80.0) and cal.window is None
    events, seconds = cal.corruption
    rate = b.rate_lower_bound(events, seconds)               # per guest (VM-second)
    wall = b.step_budget(rate * st.vms, floor=1.0)          # seconds of load for the 2-guest fleet
    clean_row_seconds = wall * st.vms                       # what that fleet's clean row counts
    assert b.step_confidence(False, rate, clean_row_seconds) == pytest.approx(1 - b.MISS, abs=1e-6)


def test_a_step_whose_kernel_lacks_the_amplifier_is_a_skip_not_clean(monkeypatch, tmp_path):
    """Issue 18: the veth scenario's run-time amplifier must be on a step's kernel; a clean
    run without it (no probe site, or a probe that never fired) is git bisect's 125."""
    from lab import fleet
    from lab.kernels import kernel
    from lab import scenario as scen
    from lab.session import Outcome

    monkeypatch.setattr(kernel, "resolve", lambda spec: spec)
    monkeypatch.setattr(kernel, "ensure", lambda spec, progress=False: type("A", (), {"key": "k"})())
    amp = {}

    def run_vm(cfg, progress=False):
        row = v.decide(cfg.kernels[0], vms=1, packets=100_000, seconds=30, wall=40, by_kind={},
                       first_violation_s=None)
        row.extra["amplifier"] = dict(amp)
        return Outcome([row], [], tmp_path, {})
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    st = b.State(tree=str(tmp_path), scenario="veth-napi-race", find="fix", budget=30, rate_low=0.5,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    assert scen.load("veth-napi-race")["amplifier"]["method"] != "off"
    amp.update(method="off", why="no first-descriptor store found in __xsk_rcv_zc")
    rec = b.test_commit(st, "a" * 40, "step")
    assert rec["outcome"] == "skip" and "__xsk_rcv_zc" in rec["reason"]
    amp.update(method="kprobe-delay", why="", hits=0,
               warning="the probe never fired while packets flowed")
    rec = b.test_commit(st, "b" * 40, "step")
    assert rec["outcome"] == "skip" and "never fired" in rec["reason"]
    amp.clear()
    amp.update(method="kprobe-delay", why="", hits=4000)
    rec = b.test_commit(st, "c" * 40, "step")
    assert rec["outcome"] == "clean" and rec["confidence"] > 0.99
    st = dataclasses.replace(st, scenario="generic-rx-race")    # amplifier off by design: clean is clean
    amp.clear()
    amp.update(method="off", why="asked for")
    assert b.test_commit(st, "d" * 40, "step")["outcome"] == "clean"


def test_bisect_run_shows_each_step_as_it_comes_with_the_time_left(tmp_path):
    """The steps' lines reach the user while `git bisect run` goes on, not after it: a
    stand-in for git prints a step line, waits, prints the next; the first is read (and
    shown with git's step estimate) before the second is written."""
    import io
    import sys
    import time

    script = tmp_path / "fake-git"
    script.write_text(
        "import sys, time\n"
        "for i, left in ((1, 2), (2, 1), (3, 0)):\n"
        "    print(f'racelab bisect-step {i:012d}: clean (confidence 0.990) -> exit 0', file=sys.stderr, flush=True)\n"
        "    print(f'Bisecting: {left * 2} revisions left to test after this (roughly {left} steps)', flush=True)\n"
        "    time.sleep(0.6)\n"
        "print('abc is the first fixed commit', flush=True)\n")
    shown = io.StringIO()
    seen_at = []

    class Out:
        def write(self, s):
            shown.write(s)
            if s.startswith("racelab bisect-step"):
                seen_at.append(time.monotonic())

        def flush(self):
            pass

    t0 = time.monotonic()
    p = b.bisect_run([sys.executable, str(script)], {}, out=Out(),
                     started="Bisecting: 6 revisions left to test after this (roughly 3 steps)\n")
    end = time.monotonic()
    assert p.returncode == 0 and "first fixed commit" in p.stdout and p.stderr.count("bisect-step") == 3
    assert len(seen_at) == 3 and seen_at[0] - t0 < end - t0 - 1.0, "the first line came before the end"
    lines = shown.getvalue().splitlines()
    # git's next estimate may be read just before or just after the step's own line (the first
    # step's from git bisect start's, 3, or already the one printed after it, 2)
    left = [int(line.split("; ~")[1].split(" ")[0]) for line in lines]
    assert [line.split("[step ")[1].split(";")[0] for line in lines] == ["1", "2", "3"], lines
    assert left == sorted(left, reverse=True) and left[0] in (2, 3) and left[1] in (1, 2) \
        and left[2] in (0, 1), lines


# --- the signal a step is judged on (issue 18: --signal corruption|window|auto) -------------

def _row(verdict_kind, packets=100_000, hits=0, available=True):
    by_kind = {"order": 3} if verdict_kind == "corrupt" else {}
    return v.decide("k", vms=1, packets=packets, seconds=10, wall=20, by_kind=by_kind,
                    first_violation_s=0.5 if by_kind else None, window_hits=hits,
                    window_available=available, window_note="" if available else "no kprobes")


def test_the_window_signal_judges_hits_and_refuses_an_unmeasured_window():
    assert b.step_outcome("window", _row("clean", hits=12), "") == ("reproduced", "")
    assert b.step_outcome("window", _row("clean", hits=0), "") == ("clean", "")
    assert b.step_outcome("window", _row("corrupt"), "") == ("reproduced", ""), "corruption is proof on any signal"
    out, why = b.step_outcome("window", _row("clean", available=False), "")
    assert out == "skip" and "window not measurable" in why and "no kprobes" in why
    # on the corruption signal the same hits decide nothing: clean
    assert b.step_outcome("corruption", _row("clean", hits=12), "") == ("clean", "")
    assert b.step_outcome("corruption", _row("clean"), "no probe site")[0] == "skip"
    assert b.step_outcome("window", _row("clean", packets=0), "")[0] == "skip", "INCONCLUSIVE is a skip"


def test_auto_calibrates_the_window_then_corruption_within_a_window_step(monkeypatch, tmp_path):
    """auto: the window first (short, amplifier off); then corruption, each run cut at the
    window's step budget: a race that does not corrupt within it cannot give the shorter step."""
    window_runs = iter([{"verdict": "WINDOW HIT", "first_violation_s": None, "first_window_s": 0.2, "load_s": 30},
                        {"verdict": "REPRODUCED", "first_violation_s": 2.0, "first_window_s": 0.6, "load_s": 2.1}])
    calls = []

    def tc(st, sha, label, signal=None):
        calls.append((signal, st.budget))
        if signal == "window":
            return {"commit": sha, "outcome": "reproduced", **next(window_runs)}
        return {"commit": sha, "outcome": "clean", "verdict": "NOT REPRODUCED", "first_violation_s": None,
                "load_s": st.budget}
    monkeypatch.setattr(b, "test_commit", tc)
    st = b.State(tree=str(tmp_path), scenario="veth-napi-race", find="fix", budget=0, rate_low=0,
                 vms=2, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    cal = b.calibrate(st, "c" * 40, attempts=2, max_seconds=120, signal="auto", floor=5.0, window_first=True)
    w_budget = b.step_budget(cal.rate_low("window") * 2, floor=5.0)
    assert cal.window == (2, pytest.approx(1.6)) and w_budget < 15
    assert calls == [("window", b.WINDOW_CALIBRATE_S)] * 2 + [("corruption", w_budget)] * 2
    assert cal.corruption == (0, pytest.approx(2 * w_budget))
    signal, budgets = b.choose_signal("auto", cal, vms=2, floor=5.0, first="window")
    assert signal == "window" and budgets["window"] == w_budget and budgets["corruption"] == 3600
    assert b.choose_signal("corruption", cal, vms=2, floor=5.0)[0] == "corruption"


def test_auto_keeps_corruption_when_it_is_as_fast_or_the_window_never_came():
    fast = b.Calibration(corruption=(3, 0.3), window=(3, 0.3))
    assert b.choose_signal("auto", fast, vms=1, floor=5.0)[0] == "corruption", "a tie: the signal users see"
    none = b.Calibration(corruption=(2, 100.0), window=(0, 60.0))
    assert b.choose_signal("auto", none, vms=1, floor=5.0)[0] == "corruption"
    only = b.Calibration(corruption=(0, 240.0), window=(2, 1.0))
    assert b.choose_signal("auto", only, vms=1, floor=5.0)[0] == "window"


def test_window_calibration_is_short_and_needs_a_hit(monkeypatch, tmp_path):
    budgets = []

    def tc(st, sha, label, signal=None):
        budgets.append(st.budget)
        return {"commit": sha, "outcome": "clean", "verdict": "NOT REPRODUCED", "first_violation_s": None,
                "load_s": st.budget, "first_window_s": None}
    monkeypatch.setattr(b, "test_commit", tc)
    st = b.State(tree=str(tmp_path), scenario="veth-napi-race", find="fix", budget=0, rate_low=0,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    from lab.run import BadInput
    with pytest.raises(BadInput, match="no window hit came"):
        b.calibrate(st, "c" * 40, attempts=2, max_seconds=120, signal="window")
    assert budgets == [b.WINDOW_CALIBRATE_S] * 2
    budgets.clear()
    with pytest.raises(BadInput, match="neither corruption nor a window hit came"):
        b.calibrate(st, "c" * 40, attempts=1, max_seconds=120, signal="auto", window_first=True)
    assert budgets == [b.WINDOW_CALIBRATE_S, 120], "no window hit: corruption gets the whole budget"


def test_auto_on_a_scenario_whose_corruption_is_quick_measures_corruption_alone(monkeypatch, tmp_path):
    """generic-rx: corruption comes in milliseconds, so its step is the floor already and the
    window (a traced run more per calibration) cannot be shorter: it is not measured."""
    calls = []

    def tc(st, sha, label, signal=None):
        calls.append(signal)
        return {"commit": sha, "outcome": "reproduced", "verdict": "REPRODUCED", "first_violation_s": 0.05,
                "load_s": 0.3}
    monkeypatch.setattr(b, "test_commit", tc)
    st = b.State(tree=str(tmp_path), scenario="generic-rx-race", find="cause", budget=0, rate_low=0,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    cal = b.calibrate(st, "c" * 40, attempts=3, max_seconds=60, signal="auto", floor=6.0)
    assert calls == ["corruption"] * 3 and cal.window is None
    assert b.choose_signal("auto", cal, vms=1, floor=6.0) == ("corruption", {"corruption": 6.0})
    # a tie goes to the signal calibrated first
    tie = b.Calibration(corruption=(3, 0.3), window=(3, 0.3))
    assert b.choose_signal("auto", tie, vms=1, floor=5.0, first="window")[0] == "window"


def test_a_window_step_traces_and_a_corruption_step_does_not(monkeypatch, tmp_path):
    from lab import fleet
    from lab.kernels import kernel
    from lab.session import Outcome

    monkeypatch.setattr(kernel, "resolve", lambda spec: spec)
    monkeypatch.setattr(kernel, "ensure", lambda spec, progress=False: type("A", (), {"key": "k"})())
    seen = []

    def run_vm(cfg, progress=False):
        seen.append((cfg.evidence, cfg.duration, cfg.stop_on_first, cfg.scenario_data["amplifier"]["method"]))
        row = _row("clean", hits=7)
        row.extra["amplifier"] = {"method": "off", "why": "asked for"}
        return Outcome([row], [], tmp_path, {})
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    st = b.State(tree=str(tmp_path), scenario="veth-napi-race", find="fix", budget=8, rate_low=2.0,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1, signal="window")
    rec = b.test_commit(st, "a" * 40, "step")
    assert rec["outcome"] == "reproduced" and rec["signal"] == "window" and rec["window_hits"] == 7
    rec = b.test_commit(st, "b" * 40, "verify", signal="corruption", budget=120)
    assert "window_hits" not in rec
    # the window runs without the amplifier (its delay hides the interleaving), corruption with it
    assert seen == [(("trace",), 8, True, "off"), ((), 120, True, "auto")]
FAKE_STEP = '''\
import json, os, subprocess, sys
# stands in for `racelab bisect-step` (which would build and boot the commit): a commit
# "reproduces" when its tree has the file RACY; the record goes where the real step's goes
for k in [k for k in os.environ if k.startswith("GIT_")]:
    del os.environ[k]
st = json.load(open(sys.argv[1]))
sha = subprocess.run(["git", "-C", st["bisect_repo"], "rev-parse", "BISECT_HEAD"], capture_output=True,
                     text=True, check=True).stdout.strip()
racy = subprocess.run(["git", "-C", st["bisect_repo"], "cat-file", "-e", sha + ":RACY"]).returncode == 0
rec = {"commit": sha, "label": "step", "outcome": "reproduced" if racy else "clean", "confidence": 0.99,
       "exit": 1 if racy else 0}
with open(st["log"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
print(f"racelab bisect-step {sha[:12]}: {rec['outcome']} (confidence 0.990) -> exit {rec['exit']}",
      file=sys.stderr, flush=True)
sys.exit(rec["exit"])
'''


def _history(tmp_path, n=6, racy_from=3):
    """A git history of n commits; RACY appears at commit racy_from (1-based) and stays."""
    import subprocess
    repo = tmp_path / "linux"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    shas = []
    for i in range(1, n + 1):
        (repo / "f").write_text(f"{i}\n")
        if i >= racy_from:
            (repo / "RACY").write_text("")
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"commit {i}")
        shas.append(git("rev-parse", "HEAD"))
    return repo, shas


def test_bisect_json_is_the_document_alone_on_stdout_and_follows_its_schema(tmp_path, monkeypatch, capsys):
    """A whole bisection through bisect.main: real git bisect run over a real history, with
    stand-ins only where a kernel would be built and booted (test_commit in this process,
    the bisect-step command in git's).  --json: stdout is bisect.json, the rest is on stderr."""
    import json
    import subprocess
    import sys

    from lab import results

    repo, shas = _history(tmp_path)
    step = tmp_path / "fake-step.py"
    step.write_text(FAKE_STEP)

    def test_commit(st, sha, label, signal=None, budget=None):
        racy = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{sha}:RACY"]).returncode == 0
        return {"commit": sha, "label": label, "outcome": "reproduced" if racy else "clean",
                "verdict": "REPRODUCED" if racy else "NOT REPRODUCED", "signal": signal or st.signal,
                "confidence": 1.0 if racy else 0.99, "first_violation_s": 2.0 if racy else None, "load_s": 3.0}
    monkeypatch.setattr(b, "test_commit", test_commit)
    real_run = b.bisect_run

    def bisect_run(argv, env, out=None, started=""):
        i = argv.index("run")
        return real_run([*argv[:i + 1], sys.executable, str(step), argv[-1]], env, out, started)
    monkeypatch.setattr(b, "bisect_run", bisect_run)
    out = tmp_path / "out"
    a = b.BisectArgs(tree=str(repo), good=shas[0], bad=shas[-1], scenario="generic-rx-race", find="cause",
                     vms=1, out=str(out), calibrate_runs=2, calibrate_budget="30s", min_step="5s",
                     resume=False, as_json=True, signal="auto")
    assert b.main(a) == 0
    stdout, stderr = capsys.readouterr()
    doc = json.loads(stdout)
    assert doc == json.loads((out / "bisect.json").read_text())
    assert doc["culprit"] == shas[2] and doc["parent"] == shas[1] and doc["verified"] is True
    assert doc["schema_version"] == results.BISECT_VERSION
    assert results.problems(doc, "bisect") == []
    assert "results:" in stderr and "first commit that introduced generic-rx-race" in stderr
    assert "results:" not in stdout
    # the same file through the validator's command line, and a broken copy of it
    p = subprocess.run([sys.executable, "-m", "lab.results", "validate", str(out / "bisect.json")],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ok (bisect schema version 1)" in p.stdout, p.stdout + p.stderr
    for field, value in (("culprit", "HEAD~2"), ("find", "cause-or-fix"), ("confidence", 1.5)):
        found = results.problems({**doc, field: value}, "bisect")
        assert found and any(p.startswith(f"{field}:") for p in found), found
    found = results.problems({k: v for k, v in doc.items() if k != "verified"}, "bisect")
    assert any("'verified' is a required property" in p for p in found), found


def test_bisect_without_json_keeps_its_lines_on_stdout(monkeypatch, capsys):
    def bisection(a):
        print("the answer")
        return 0, {"schema_version": 1}
    monkeypatch.setattr(b, "_bisect", bisection)
    assert b.main(b.BisectArgs(tree="t", good="g", bad="b", scenario="s")) == 0
    out, err = capsys.readouterr()
    assert out == "the answer\n" and err == ""


def test_the_racy_end_is_verified_over_fresh_boots_until_one_corrupts(monkeypatch, tmp_path):
    """The run-time amplified veth race corrupts in one boot within a second and in the next
    not in two minutes: the verification splits its budget over fresh boots."""
    outcomes = iter(["clean", "reproduced", "reproduced"])
    budgets = []

    def tc(st, sha, label, signal=None, budget=None):
        budgets.append((signal, budget))
        return {"commit": sha, "label": label, "outcome": next(outcomes)}
    monkeypatch.setattr(b, "test_commit", tc)
    st = b.State(tree=str(tmp_path), scenario="veth-napi-race", find="fix", budget=9.5, rate_low=0.5,
                 vms=1, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1, signal="window")
    rec, boots = b.verify_racy(st, "a" * 40, "verify-parent", 120.0)
    assert rec["outcome"] == "reproduced" and boots == 2
    assert budgets == [("corruption", 40.0), ("corruption", 40.0)]
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["boot"], r["outcome"]) for r in logged] == [("verify", 1, "clean"),
                                                                       ("verify", 2, "reproduced")]
    outcomes = iter(["clean"] * 3)
    rec, boots = b.verify_racy(st, "a" * 40, "verify-parent", 20.0)
    assert rec["outcome"] == "clean" and boots == 3 and budgets[-1] == ("corruption", 9.5), "at least one step"
