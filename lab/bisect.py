"""Flake-aware bisection of kernel commits for a race.

A race that shows in 1 of N runs makes plain `git bisect` lie: one lucky
"good" sends it down the wrong half.  racelab reasons with measured rates:

1. calibrate: on the known-reproducing end, run the scenario to its first
   violation a few times and take a conservative (one-sided 95% lower) bound
   on the reproduction rate;
2. budget: give each step enough load time that P(miss | race present) <= 1%
   at that lower bound, stopping early at the first violation;
3. drive `git bisect run` with `racelab bisect-step`, which builds the commit
   incrementally (one persistent build directory per tree, ccache), boots the
   fleet and runs the scenario.  It exits 0/1 for a verdict and 125 (skip)
   for a build failure or a lost guest: infrastructure is never a verdict;
4. report a confidence (the product of the per-step confidences) and verify
   the answer by testing the culprit and its parent again.

--good is the older end and --bad the newer one.  --find cause: the newer end
reproduces.  --find fix: the older end reproduces and the newer one is fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import verdict as v
from lab.config import RunConfig, fmt_duration, parse_duration
from lab.run import BadInput, InfraError, log, run

EXIT_GOOD_OLD, EXIT_NEW, EXIT_SKIP = 0, 1, 125
MISS = 0.01                 # per-step P(miss | race present)


# --- statistics ----------------------------------------------------------------

def rate_lower_bound(events: int, seconds: float, confidence: float = 0.95) -> float:
    """One-sided lower bound on a Poisson rate (0 when no events)."""
    if events <= 0 or seconds <= 0:
        return 0.0
    return v.gamma_quantile(events, 1 - confidence) / seconds


def step_budget(rate_low: float, miss: float = MISS, floor: float = 5.0, cap: float = 3600.0) -> float:
    """Seconds of load per step so that P(no violation | race present) <= miss."""
    if rate_low <= 0:
        return cap
    return min(cap, max(floor, v.budget_for(rate_low, miss)))


def step_confidence(reproduced: bool, rate_low: float, seconds: float) -> float:
    """How sure one step's verdict is.  A violation is proof; a clean run is 1 - P(miss)."""
    if reproduced:
        return 1.0
    return v.detection_probability(rate_low, seconds)


def overall_confidence(steps: list[float]) -> float:
    return math.prod(steps) if steps else 0.0


def exit_code(find: str, outcome: str) -> int:
    """Map a step's outcome (reproduced | clean | skip) to `git bisect run`'s exit codes."""
    if outcome == "skip":
        return EXIT_SKIP
    reproduced = outcome == "reproduced"
    if find == "cause":     # terms good(old, clean) / bad(new, racy)
        return EXIT_NEW if reproduced else EXIT_GOOD_OLD
    return EXIT_GOOD_OLD if reproduced else EXIT_NEW   # terms racy(old) / fixed(new)


# --- one step ---------------------------------------------------------------------

@dataclass
class State:
    """What every bisect-step needs; written once by `racelab bisect`."""

    tree: str
    scenario: str
    find: str
    budget: float
    rate_low: float
    vms: int
    log: str
    out: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    bisect_repo: str = ""   # the private bare clone `git bisect` runs in (set before the steps)
    good: str = ""          # the range, as full SHAs (to check a --resume against)
    bad: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> State:
        return cls(**json.loads(path.read_text()))


def test_commit(st: State, sha: str, label: str) -> dict[str, Any]:
    """Build, boot, run one commit.  Returns the step record (never raises for infra)."""
    from lab import fleet, kernel
    from lab import scenario as scen

    rec: dict[str, Any] = {"commit": sha, "label": label, "time": time.time()}
    t0 = time.monotonic()
    try:
        spec = kernel.resolve(f"git:{st.tree}@{sha}")
        art = kernel.ensure(spec, progress=False)
        rec["build_s"] = round(time.monotonic() - t0, 1)
        rec["kernel_key"] = getattr(art, "key", "")
    except (InfraError, BadInput) as e:
        rec.update(outcome="skip", reason=f"build failed: {str(e)[:300]}",
                   build_s=round(time.monotonic() - t0, 1), confidence=1.0)
        return rec
    s = scen.load(st.scenario, st.overrides)
    kname = f"git:{st.tree}@{sha}"
    step_out = Path(st.out) / f"step-{sha[:12]}-{label}"
    if step_out.exists():      # a step cut short by an interruption (--resume): keep what it saw, apart
        n = 1
        while step_out.with_name(f"{step_out.name}.cut{n}").exists():
            n += 1
        step_out.rename(step_out.with_name(f"{step_out.name}.cut{n}"))
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", kernels=(kname,),
                    duration=st.budget, vms=st.vms, seed=st.seed, stop_on_first=True,
                    out=str(step_out))
    t1 = time.monotonic()
    try:
        outcome = fleet.run_vm(cfg, progress=False)
    except InfraError as e:
        rec.update(outcome="skip", reason=f"infrastructure: {e.message}", confidence=1.0,
                   run_s=round(time.monotonic() - t1, 1))
        return rec
    row = outcome.rows[0]
    boots = outcome.meta.get("kernels", {}).get(kname, {}).get("boot_seconds", [])
    rec["boot_s"] = round(max(boots), 1) if boots else None
    rec["run_s"] = round(time.monotonic() - t1, 1)
    rec["load_s"] = round(row.seconds, 1)
    rec["violations"] = row.by_kind
    rec["packets"] = row.packets
    rec["first_violation_s"] = row.first_violation_s
    unamplified = _amplifier_missing(s, row)
    if row.verdict == v.INCONCLUSIVE:
        rec.update(outcome="skip", reason=v.verdict_text(row), confidence=1.0)
    elif row.verdict != v.REPRODUCED and unamplified:
        # the calibration's rate was measured with the amplifier: a clean run without it is
        # no evidence against the race at this commit (git bisect skip, never "clean")
        rec.update(outcome="skip", reason=f"amplifier not on this commit's kernel: {unamplified}",
                   confidence=1.0)
    else:
        reproduced = row.verdict == v.REPRODUCED
        rec["outcome"] = "reproduced" if reproduced else "clean"
        rec["confidence"] = step_confidence(reproduced, st.rate_low, row.seconds)
    return rec


def _append(log_path: str, rec: dict[str, Any]) -> None:
    with open(log_path, "ab+") as f:
        # after an interruption the last line may be cut short: start a fresh one
        end = f.seek(0, os.SEEK_END)
        torn = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(rec, default=str).encode() + b"\n")


def _sweep_stale_clones(tmp: Path | None = None) -> list[Path]:
    """Remove the private clones of bisections that were killed (SIGKILL skips their cleanup)."""
    gone = []
    for d in (tmp or Path(tempfile.gettempdir())).glob("racelab-bisect-*-*"):
        pid = d.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        except PermissionError:
            pass
    return gone


def recorded_step(log_path: str, sha: str) -> dict[str, Any] | None:
    """The verdict an earlier (interrupted) run of this bisection gave `sha`, if any."""
    try:
        lines = Path(log_path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue       # a line cut short by the interruption
        if r.get("label") == "step" and r.get("commit") == sha and r.get("outcome") in ("reproduced", "clean"):
            return r
    return None


def out_dir(given: str | None, scenario: str) -> Path:
    """The bisection's directory, absolute: its steps run from the private clone, not from here."""
    out = Path(given or f"results/bisect-{scenario}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_state(out: Path, tree: str, scenario: str, find: str, shas: dict[str, str]) -> State:
    """The state of the interrupted bisection in `out`, checked against this command line."""
    path = out / "state.json"
    if not path.is_file():
        raise BadInput(f"--resume: {out} holds no bisection past its calibration (no state.json)",
                       hint="give the --out of the bisection to resume, or start again without --resume")
    old = State.load(path)
    asked = {"tree": tree, "scenario": scenario, "find": find, "good": shas["good"], "bad": shas["bad"]}
    differ = [f"{k}: {getattr(old, k)!r} there, {v!r} now" for k, v in asked.items()
              if getattr(old, k) != v and getattr(old, k) != ""]   # "": a state from before good/bad were kept
    if differ:
        raise BadInput(f"--resume: {out} holds a different bisection:\n  " + "\n  ".join(differ),
                       hint="resume with the same --tree/--good/--bad/--scenario/--find, or use another --out")
    # the directory may have been moved or copied since: its log and steps are where it is now
    here = out.resolve()
    return dataclasses.replace(old, out=str(here), log=str(here / "bisect.jsonl"))


def step_main(state_path: str) -> int:
    """`racelab bisect-step --state FILE`: run by `git bisect run` in the private bare clone."""
    st = State.load(Path(state_path))
    for k in [k for k in os.environ if k.startswith("GIT_")]:
        del os.environ[k]   # `git bisect run` exports GIT_DIR=. (the bare clone); builds use the tree
    # --no-checkout: the commit under test is BISECT_HEAD
    sha = run(["git", "-C", st.bisect_repo, "rev-parse", "BISECT_HEAD"]).stdout.strip()
    prior = recorded_step(st.log, sha)
    if prior is not None:      # --resume: this commit's verdict is in the log already
        code = exit_code(st.find, prior["outcome"])
        print(f"racelab bisect-step {sha[:12]}: {prior['outcome']} (recorded) -> exit {code}",
              file=sys.stderr, flush=True)
        return code
    rec = test_commit(st, sha, "step")
    rec["exit"] = exit_code(st.find, rec["outcome"])
    _append(st.log, rec)
    print(f"racelab bisect-step {sha[:12]}: {rec['outcome']} "
          f"(confidence {rec.get('confidence', 0):.3f}; build {rec.get('build_s')}s, "
          f"run {rec.get('run_s')}s) -> exit {rec['exit']}", file=sys.stderr, flush=True)
    return rec["exit"]


# --- the whole bisection ----------------------------------------------------------

@dataclass
class RunOutput:
    returncode: int
    stdout: str
    stderr: str


_LEFT = re.compile(r"Bisecting: (\d+) revisions? left to test after this \(roughly (\d+) steps?\)")


def bisect_run(argv: list[str], env: dict[str, str], out: Any = None, started: str = "") -> RunOutput:
    """`git bisect run` with each step's line shown as it comes (on out, default stderr),
    followed by how many steps git expects to be left and, from the steps so far, about
    how long they take.  Everything is also kept for git-bisect-run.log."""
    out = out or sys.stderr
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, bufsize=1)
    kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
    # git's "roughly N steps" after the current one (git bisect start says it first)
    left: list[int] = [int(m.group(2)) for m in _LEFT.finditer(started or "")]
    took: list[float] = []
    lock = threading.Lock()
    t_step = [time.monotonic()]

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kept["stdout"].append(line)
            m = _LEFT.search(line)
            if m:
                with lock:
                    left.append(int(m.group(2)))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        kept["stderr"].append(line)
        if not line.startswith("racelab bisect-step "):
            continue
        now = time.monotonic()
        took.append(now - t_step[0])
        t_step[0] = now
        with lock:
            remaining = left[-1] if left else None
        tail = ""
        if remaining is not None:
            each = sum(took) / len(took)
            tail = f"  [step {len(took)}; ~{remaining} more, ~{fmt_duration(remaining * each)} left]"
        print(line.rstrip("\n") + tail, file=out, flush=True)
    proc.wait()
    reader.join(10)
    return RunOutput(proc.returncode, "".join(kept["stdout"]), "".join(kept["stderr"]))


def _amplifier_missing(s: Any, row: v.Row) -> str:
    """Why the scenario's run-time amplifier did not work on this step's kernel ("" = it did,
    or none was asked): its probe site was not found, or the probe never fired."""
    if s["amplifier"]["method"] == "off":
        return ""
    amp = row.extra.get("amplifier") or {}
    if amp.get("method") == "off":
        return str(amp.get("why") or "no probe site found")
    return str(amp.get("warning") or "")


def calibrate(st: State, ref_sha: str, attempts: int, max_seconds: float) -> tuple[int, float]:
    """(events, VM-seconds of load) on the reproducing end: runs to the first violation.

    VM-seconds, the unit a step's clean exposure (its row's seconds, summed over its
    guests) is counted in: up to a fleet's first violation every one of its st.vms
    guests was loading, so that run exposed first_violation_s x vms.  Counting the
    fleet's wall seconds instead made a clean step with --vms 2 claim twice the
    exposure it had against the rate (0.9999 where the design gives 0.99)."""
    events, seconds = 0, 0.0
    cal = dataclasses.replace(st, budget=max_seconds)
    for i in range(attempts):
        rec = test_commit(cal, ref_sha, f"calibrate{i}")
        _append(st.log, {**rec, "phase": "calibrate"})
        if rec["outcome"] == "skip":
            raise InfraError(f"calibration run failed on {ref_sha[:12]}: {rec.get('reason')}")
        if rec["outcome"] == "reproduced":
            events += 1
            fv = rec.get("first_violation_s")
            seconds += float(fv) * st.vms if fv else float(rec.get("load_s") or 0.0)
        else:
            seconds += float(rec.get("load_s") or max_seconds)
        log.info("calibration %d/%d: %s after %.1fs", i + 1, attempts, rec["outcome"],
                 rec.get("first_violation_s") or rec.get("load_s") or 0)
    if events == 0:
        raise BadInput(f"the race did not reproduce on the known-reproducing end {ref_sha[:12]} "
                       f"in {attempts} x {max_seconds:.0f}s",
                       hint="check --good/--bad and --find, or raise --calibrate-budget")
    return events, seconds


def subject(tree: str, sha: str) -> str:
    return run(["git", "-C", tree, "log", "-1", "--format=%h (\"%s\")", sha]).stdout.strip()


def main(a: argparse.Namespace) -> int:
    """--json: bisect.json alone on stdout at the end; everything else (progress, the
    answer in words) goes to stderr."""
    as_json = bool(getattr(a, "json", False))
    with contextlib.redirect_stdout(sys.stderr if as_json else sys.stdout):
        code, report = _bisect(a)
    if as_json:
        print(json.dumps(report, indent=2), flush=True)
    return code


def _bisect(a: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    tree = str(Path(a.tree).resolve())
    if not (Path(tree) / ".git").exists() and run(["git", "-C", tree, "rev-parse", "--git-dir"],
                                                   check=False).returncode != 0:
        raise BadInput(f"{tree} is not a git tree", hint="--tree must point at a kernel git checkout")
    shas = {}
    for name in ("good", "bad"):
        p = run(["git", "-C", tree, "rev-parse", "--verify", f"{getattr(a, name)}^{{commit}}"], check=False)
        if p.returncode != 0:
            raise BadInput(f"--{name} {getattr(a, name)!r} is not a commit in {tree}")
        shas[name] = p.stdout.strip()
    from lab import scenario as scen
    s = scen.load(a.scenario)
    out = out_dir(a.out, s.name)
    print(f"results: {out}  (bisect.jsonl grows by one line per step)", flush=True)
    t0 = time.monotonic()
    racy_end = shas["bad"] if a.find == "cause" else shas["good"]
    if getattr(a, "resume", False):
        # calibration and every recorded step are reused; the step cut short runs again
        st = resume_state(out, tree, s.name, a.find, shas)
        rate_low, budget = st.rate_low, st.budget
        print(f"resuming the bisection in {out}: step budget {budget:.1f}s; recorded steps are reused",
              flush=True)
    else:
        if (out / "bisect.jsonl").exists():
            raise BadInput(f"{out} already holds a bisection",
                           hint=f"continue it with --resume --out {out}, or give another --out")
        st = State(tree=tree, scenario=s.name, find=a.find, budget=0.0, rate_low=0.0, vms=a.vms,
                   log=str(out / "bisect.jsonl"), out=str(out),
                   seed=random.SystemRandom().randrange(1 << 31), good=shas["good"], bad=shas["bad"])
        events, seconds = calibrate(st, racy_end, a.calibrate_runs, parse_duration(a.calibrate_budget))
        rate_low = rate_lower_bound(events, seconds)      # per VM-second
        # a step's fleet gathers vms VM-seconds per second of load
        budget = step_budget(rate_low * st.vms, floor=parse_duration(a.min_step))
        print(f"calibrated on {racy_end[:12]}: {events} reproduction(s) in {seconds:.1f} VM-seconds of "
              f"load; rate >= {rate_low:.3g}/s per guest (95%); step budget {budget:.1f}s on {st.vms} "
              f"guest(s) for P(miss) <= {MISS:.0%}", flush=True)
    # `git bisect` runs in a private bare clone that borrows the tree's objects: the user's
    # checkout is never touched, and two bisections of one tree cannot collide on its index
    _sweep_stale_clones()
    priv = Path(tempfile.mkdtemp(prefix=f"racelab-bisect-{os.getpid()}-")) / "repo.git"
    try:
        run(["git", "clone", "-q", "--bare", "--shared", tree, str(priv)])
        st = dataclasses.replace(st, budget=budget, rate_low=rate_low, bisect_repo=str(priv))
        state_path = out / "state.json"
        st.save(state_path)
        terms = [] if a.find == "cause" else ["--term-old=racy", "--term-new=fixed"]
        started = run(["git", "-C", str(priv), "bisect", "start", "--no-checkout", *terms, shas["bad"],
                       shas["good"]])
        step = [sys.executable, "-m", "lab.cli", "bisect-step", "--state", str(state_path)]
        env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        try:
            p = bisect_run(["git", "-C", str(priv), "bisect", "run", *step], env, started=started.stdout)
        except KeyboardInterrupt:
            print(f"\ninterrupted; the steps so far are in {st.log}. Continue with the same command "
                  f"and --resume --out {out}", file=sys.stderr, flush=True)
            raise
        (out / "git-bisect-run.log").write_text(p.stdout + p.stderr)
        ref = "refs/bisect/bad" if a.find == "cause" else "refs/bisect/fixed"
        culprit = run(["git", "-C", str(priv), "rev-parse", ref], check=False).stdout.strip()
        blog = run(["git", "-C", str(priv), "bisect", "log"], check=False).stdout
        (out / "git-bisect.log").write_text(blog)
    finally:
        shutil.rmtree(priv.parent, ignore_errors=True)
    if not culprit or "first " not in p.stdout:
        raise InfraError("git bisect did not converge (too many skipped commits?)",
                         hint=f"see {out / 'git-bisect-run.log'}")
    steps = [json.loads(l) for l in Path(st.log).read_text().splitlines() if l.strip()]
    confs = [r.get("confidence", 1.0) for r in steps if r.get("label") == "step" and r["outcome"] != "skip"]
    # verify: the culprit and its parent again
    parent = run(["git", "-C", tree, "rev-parse", f"{culprit}^"]).stdout.strip()
    vc = test_commit(st, culprit, "verify-culprit")
    vp = test_commit(st, parent, "verify-parent")
    _append(st.log, {**vc, "phase": "verify"})
    _append(st.log, {**vp, "phase": "verify"})
    want_c, want_p = ("reproduced", "clean") if a.find == "cause" else ("clean", "reproduced")
    verified = vc.get("outcome") == want_c and vp.get("outcome") == want_p
    conf = overall_confidence(confs + [vc.get("confidence", 0.0), vp.get("confidence", 0.0)])
    from lab.results import BISECT_VERSION
    report = {"schema_version": BISECT_VERSION, "find": a.find, "culprit": culprit, "subject": subject(tree, culprit),
              "parent": parent, "verified": verified, "confidence": conf,
              "steps": len(confs), "step_budget_s": budget, "rate_low_per_s": rate_low,
              "wall_s": round(time.monotonic() - t0, 1), "log": st.log}
    (out / "bisect.json").write_text(json.dumps(report, indent=2))
    what = "introduced" if a.find == "cause" else "fixed"
    print(f"\nfirst commit that {what} {s.name}: {report['subject']}")
    print(f"  confidence {conf:.4f} over {len(confs)} steps + verification "
          f"({'verified' if verified else 'NOT verified'}: culprit {vc.get('outcome')}, parent {vp.get('outcome')})")
    print(f"  wall {report['wall_s']:.0f}s; log {st.log}")
    for r in steps:
        print(f"  {r.get('phase', r.get('label')):<10} {r['commit'][:12]} {r['outcome']:<10} "
              f"build {r.get('build_s')}s boot {r.get('boot_s')}s run {r.get('run_s')}s "
              f"conf {r.get('confidence', 0):.3f}")
    return (0 if verified else 1), report
