import dataclasses
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
    from lab import kernel
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
    assert [json.loads(l)["n"] for l in lines if not l.endswith("cut")] == [1, 2, 4] and len(lines) == 4


def test_a_rerun_step_keeps_the_cut_run_apart(tmp_path, monkeypatch):
    from lab import fleet, kernel
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
    recs = iter([{"outcome": "reproduced", "first_violation_s": 10.0, "load_s": 21.0},
                 {"outcome": "reproduced", "first_violation_s": 30.0, "load_s": 61.0}])
    monkeypatch.setattr(b, "test_commit", lambda st, sha, label: {"commit": sha, **next(recs)})
    st = b.State(tree=str(tmp_path), scenario="generic-rx-race", find="cause", budget=0, rate_low=0,
                 vms=2, log=str(tmp_path / "log.jsonl"), out=str(tmp_path), seed=1)
    events, seconds = b.calibrate(st, "c" * 40, attempts=2, max_seconds=60)
    assert (events, seconds) == (2, 80.0)
    rate = b.rate_lower_bound(events, seconds)               # per guest (VM-second)
    wall = b.step_budget(rate * st.vms, floor=1.0)          # seconds of load for the 2-guest fleet
    clean_row_seconds = wall * st.vms                       # what that fleet's clean row counts
    assert b.step_confidence(False, rate, clean_row_seconds) == pytest.approx(1 - b.MISS, abs=1e-6)


def test_a_step_whose_kernel_lacks_the_amplifier_is_a_skip_not_clean(monkeypatch, tmp_path):
    """Issue 18: the veth scenario's run-time amplifier must be on a step's kernel; a clean
    run without it (no probe site, or a probe that never fired) is git bisect's 125."""
    from lab import fleet, kernel
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
    import threading
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
    assert "[step 1; ~3 more, ~" in lines[0], lines     # from git bisect start's estimate
    # git's next estimate may be read just before or just after the step's own line
    left = [int(line.split("; ~")[1].split(" ")[0]) for line in lines]
    assert [line.split("[step ")[1].split(";")[0] for line in lines] == ["1", "2", "3"], lines
    assert left == sorted(left, reverse=True) and left[1] in (1, 2) and left[2] in (0, 1), lines


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
    import argparse
    import json
    import subprocess
    import sys

    from lab import results

    repo, shas = _history(tmp_path)
    step = tmp_path / "fake-step.py"
    step.write_text(FAKE_STEP)

    def test_commit(st, sha, label):
        racy = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{sha}:RACY"]).returncode == 0
        return {"commit": sha, "label": label, "outcome": "reproduced" if racy else "clean",
                "confidence": 1.0 if racy else 0.99, "first_violation_s": 2.0 if racy else None, "load_s": 3.0}
    monkeypatch.setattr(b, "test_commit", test_commit)
    real_run = b.bisect_run

    def bisect_run(argv, env, out=None, started=""):
        i = argv.index("run")
        return real_run([*argv[:i + 1], sys.executable, str(step), argv[-1]], env, out, started)
    monkeypatch.setattr(b, "bisect_run", bisect_run)
    out = tmp_path / "out"
    a = argparse.Namespace(tree=str(repo), good=shas[0], bad=shas[-1], scenario="generic-rx-race", find="cause",
                           vms=1, out=str(out), calibrate_runs=2, calibrate_budget="30s", min_step="5s",
                           resume=False, json=True)
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
    import argparse

    def bisection(a):
        print("the answer")
        return 0, {"schema_version": 1}
    monkeypatch.setattr(b, "_bisect", bisection)
    assert b.main(argparse.Namespace(json=False)) == 0
    out, err = capsys.readouterr()
    assert out == "the answer\n" and err == ""
