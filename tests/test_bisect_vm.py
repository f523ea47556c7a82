"""racelab bisect end to end on a synthetic kernel history, in both directions.

The history is linux-source-6.1 (6.1.192) plus 32 commits that touch only a
text file, except one: on branch `cause` commit 13 applies the generic-rx
revert (it introduces the race); on branch `fix` the race is there from the
first commit and commit 19 removes it.  Built once and cached under
$RACELAB_CACHE/fixtures; the kernel build directory is shared by both
directions, so every step after the first is an incremental build.
"""
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.run import cache_dir, project_root

# both directions share one kernel build tree (incremental builds): one worker, one at a time
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.xdist_group("bisect-fixture")]
PATCH = project_root() / "kernels" / "patches" / "6.1" / "revert-generic-rx.patch"
N, CAUSE_AT, FIX_AT = 32, 13, 19


def git(repo, *args, **kw):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          **kw).stdout.strip()


PATCHES = project_root() / "kernels" / "patches" / "6.1"
VETH = PATCHES / "revert-veth-napi.patch"
WIDEN = PATCHES / "widen-rx.patch"
GIT_ENV = {"GIT_AUTHOR_NAME": "racelab", "GIT_AUTHOR_EMAIL": "racelab@invalid",
           "GIT_COMMITTER_NAME": "racelab", "GIT_COMMITTER_EMAIL": "racelab@invalid",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}


def _patch(root: Path, patch: Path, *args: str) -> None:
    subprocess.run(["patch", "-p1", "-s", *args, "-d", str(root), "-i", str(patch)], check=True)


def _branch(root: Path, branch: str, start: list[tuple[Path, str]], special: int,
            special_args: list[str], special_patch: Path, special_msg: str) -> None:
    """N commits on `base`: the `start` patches first (one commit), then unrelated
    changes to a text file except commit `special`, which applies or removes a patch."""
    env = {**os.environ, **GIT_ENV}
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True, env=env)  # noqa: E731
    run("checkout", "-q", "-f", "-B", branch, "base")
    if start:
        for patch, _ in start:
            _patch(root, patch)
        run("commit", "-q", "-am", "synth: " + "; ".join(msg for _, msg in start))
    note = root / "Documentation" / "racelab-synth.txt"
    for i in range(1, N + 1):
        if i == special:
            _patch(root, special_patch, *special_args)
            msg = special_msg
        else:
            note.write_text(f"{branch} {i}\n")
            run("add", "-f", str(note))
            msg = f"synth: unrelated change {i}"
        run("commit", "-q", "-am", msg)


def synthetic_history(branch: str = "cause") -> Path:
    """The fixture repository, with `branch` (cause | fix | veth-fix | veth-fix-rt) in it."""
    root = cache_dir() / "fixtures" / "linux-6.1-synth"
    done = root / ".racelab-fixture-complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tarball = Path("/usr/src/linux-source-6.1.tar.xz")
        if not tarball.exists():
            pytest.skip("linux-source-6.1 missing: apt-get install linux-source-6.1 (./bootstrap install)")
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(root), "--strip-components=1"], check=True)
        env = {**os.environ, **GIT_ENV}
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True, env=env)  # noqa: E731
        run("init", "-q", "-b", "base")
        run("add", "-A", "-f")   # Debian's tarball ships a .gitignore that ignores everything
        run("commit", "-q", "-m", "linux-source-6.1 6.1.192")
        _branch(root, "cause", [], CAUSE_AT, [], PATCH, "synth: revert the generic-rx fix (introduces the race)")
        _branch(root, "fix", [(PATCH, "start with the generic-rx race (revert bf0bdd1343ef, a1356ac7749c)")],
                FIX_AT, ["-R"], PATCH, "synth: restore the generic-rx fix (fixes the race)")
        done.write_text("ok\n")
    if branch == "veth-fix-rt" and not (root / ".racelab-fixture-veth-fix-rt").exists():
        # the veth NAPI race from the start and no source amplifier anywhere: what a user's
        # own tree looks like.  The scenario's run-time amplifier finds its probe site in each
        # step's kernel; commit FIX_AT restores fa349e396e48
        _branch(root, "veth-fix-rt", [(VETH, "start with the veth NAPI race (revert fa349e396e48)")],
                FIX_AT, ["-R"], VETH, "synth: restore the veth NAPI fix (fixes the race)")
        (root / ".racelab-fixture-veth-fix-rt").write_text("ok\n")
    if branch == "veth-fix" and not (root / ".racelab-fixture-veth-fix").exists():
        # the veth NAPI race from the start, with the widen-rx amplifier throughout (the
        # scenario's defaults turn it on); commit FIX_AT restores fa349e396e48
        _branch(root, "veth-fix", [(VETH, "start with the veth NAPI race (revert fa349e396e48)"),
                                   (WIDEN, "add the widen-rx amplifier")],
                FIX_AT, ["-R"], VETH, "synth: restore the veth NAPI fix (fixes the race)")
        (root / ".racelab-fixture-veth-fix").write_text("ok\n")
    return root


def bisect(repo, good, bad, find, out, scenario="generic-rx-race", calibrate_budget="60s", *extra):
    """racelab bisect, its stderr read as it comes: when each step's line arrived."""
    import threading
    import time
    from types import SimpleNamespace

    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "bisect", "--tree", str(repo), "--good", good,
                             "--bad", bad, "--scenario", scenario, "--find", find, "--out", str(out),
                             "--calibrate-runs", "2", "--calibrate-budget", calibrate_budget, "--min-step", "6s",
                             *extra],
                            cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(project_root())})
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
    reader.start()
    err, step_at = [], []
    timer = threading.Timer(3000, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            err.append(line)
            if line.startswith("racelab bisect-step "):
                step_at.append(time.monotonic())
        proc.wait()
    finally:
        timer.cancel()
    reader.join(30)
    return SimpleNamespace(returncode=proc.returncode, stdout="".join(stdout), stderr="".join(err),
                           step_at=step_at, ended=time.monotonic())


@pytest.mark.parametrize("find", ["cause", "fix"])
def test_bisect_names_the_commit(find, tmp_path):
    repo = synthetic_history()
    branch = find
    subject = "introduces the race" if find == "cause" else "fixes the race"
    expected = git(repo, "rev-list", "-1", "--grep", subject, branch)
    p = bisect(repo, f"{branch}~{N}" if find == "cause" else f"{branch}~{N}", branch, find, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # each step's line reached the user while the bisection went on, with the time left
    assert len(p.step_at) >= 2 and p.step_at[0] < p.ended - 10, (p.step_at, p.ended)
    assert "more, ~" in p.stderr and "left]" in p.stderr, p.stderr[-2000:]
    report = json.loads((tmp_path / "bisect.json").read_text())
    assert report["culprit"] == expected, report
    assert report["verified"] and report["confidence"] > 0.9
    assert ("introduces" if find == "cause" else "fixes") in report["subject"]
    from lab import results
    assert results.problems(report, "bisect") == [], "bisect.json follows lab/schemas/bisect.schema.json"
    steps = [json.loads(line) for line in (tmp_path / "bisect.jsonl").read_text().splitlines()]
    assert all("build_s" in s and "outcome" in s for s in steps)


def test_veth_bisect_on_the_window_names_the_fix_and_verifies_it_with_corruption(tmp_path):
    """Issue 18: the veth race on a tree without a source amplifier.  Calibration measures
    both signals and auto judges the steps on the one whose calibrated step is shorter.  Most
    boots open the window within a second, where corruption through the run-time amplifier
    takes far longer, so the steps are usually judged on the window; but a boot that corrupts
    at once makes corruption the shorter step (seen in CI: 2 reproductions in 3.3 VM-seconds),
    and then auto must say so and judge on corruption.  The racy end of the answer is then
    verified with corruption through the run-time amplifier.

    That corruption depends on the boot: measured here, it came after 0.69 s in one boot and
    not in 3 x 60 s in others.  So the test holds the lab to its word either way: verified
    (exit 0) only with a corrupting boot on record, and otherwise "NOT verified" (exit 1)
    with three clean boots on record, never a verified answer without corruption."""
    branch = "veth-fix-rt"
    repo = synthetic_history(branch)
    expected = git(repo, "rev-list", "-1", "--grep", "fixes the race", branch)
    p = bisect(repo, f"{branch}~{N}", branch, "fix", tmp_path, "veth-napi-race", "3m")
    report = json.loads((tmp_path / "bisect.json").read_text())
    assert p.returncode == (0 if report["verified"] else 1), p.stdout[-3000:] + p.stderr[-3000:]
    # the window calibrated first (the scenario's corruption is rare), corruption too unless
    # the window's step is already the shortest allowed; auto chose the shorter step, a tie
    # going to the window
    budgets = {m[1]: float(m[2]) for m in re.finditer(
        r"calibrated (corruption|window) on \S+: .*; step budget ([0-9.]+)s", p.stdout)}
    assert "window" in budgets, p.stdout[-3000:]
    signal = min(budgets, key=lambda sig: (budgets[sig], sig != "window"))
    assert f"steps judged on {signal} (auto: the shorter step)" in p.stdout, (budgets, p.stdout[-3000:])
    assert report["culprit"] == expected and report["signal"] == signal, report
    assert report["confidence"] > 0.9, report
    verify = report["verify"]
    assert verify["racy_signal"] == "corruption" and verify["fixed_signal"] == signal, verify
    assert verify["fixed"] == expected and verify["fixed_outcome"] == "clean", verify
    steps = [json.loads(line) for line in (tmp_path / "bisect.jsonl").read_text().splitlines()]
    judged = [s for s in steps if s.get("label") == "step" and s["outcome"] != "skip"]
    assert judged and all(s["signal"] == signal for s in judged), judged
    # a clean step saw no corruption, and on the window no window hit either; a racy one saw it
    for s in judged:
        seen = bool(s["violations"]) or (signal == "window" and s["window_hits"] > 0)
        assert (s["outcome"] == "clean") == (not seen), s
    # the racy end over fresh boots (at most 3): verified exactly when the last one corrupted
    racy = [s for s in steps if s.get("phase") == "verify" and s["signal"] == "corruption"]
    assert len(racy) == verify["racy_boots"] <= 3, racy
    corrupted = racy[-1]["verdict"] == "REPRODUCED" and bool(racy[-1]["violations"])
    assert report["verified"] == corrupted == (verify["racy_outcome"] == "reproduced"), (report, racy)
    if not corrupted:
        assert len(racy) == 3 and all(s["outcome"] == "clean" for s in racy), racy
        assert "NOT verified" in p.stdout, p.stdout[-2000:]
        print(f"the racy end did not corrupt in {len(racy)} boots: reported NOT verified, as it must")
