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

The signal a step is judged on (--signal):
- corruption: the checker's violations (what a user sees), stopping at the first;
- window: the race's interleaving in the kernel's own trace (the scenario's
  evidence.window: a receive on one CPU while another's NAPI has not flushed, for
  the veth race).  It comes hundreds of times a second on a racy kernel and never on
  a fixed one, where corruption may take minutes, so a step needs seconds of load.
  Window runs trace and run without the amplifier: its delay inside the receive
  hides the interleaving from the measure (measured on the veth race: the first hit
  after 17.8 s with the run-time amplifier, after 0.03 s without);
- auto (the default): first the signal the scenario expects to be faster (the
  window where its corruption is rare, evidence.corruption_rare; else corruption),
  then the other only if the first one's step is longer than --min-step, each run
  given as long as that step: a signal that does not show within one step of the
  other cannot make the shorter step.  The shorter step wins, the first on a tie.
Whatever the steps used, the racy end of the answer is verified with corruption
(the scenario's amplifier, the run-time one on a kernel without a source
amplifier): the race must be seen to corrupt a ring before the culprit is named.

--good is the older end and --bad the newer one.  --find cause: the newer end
reproduces.  --find fix: the older end reproduces and the newer one is fixed.
"""

from __future__ import annotations

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
from typing import IO, TYPE_CHECKING, Any

from lab import verdict as v
from lab.config import Backend, RunConfig, fmt_duration, parse_duration
from lab.run import BadInput, InfraError, log, run

if TYPE_CHECKING:
    from lab.scenario import Scenario
    from lab.session import Outcome

EXIT_GOOD_OLD, EXIT_NEW, EXIT_SKIP = 0, 1, 125
MISS = 0.01                 # per-step P(miss | race present)
SIGNALS = ("corruption", "window", "auto")
WINDOW_CALIBRATE_S = 10.0   # a window calibration run needs its first hit only (veth: 0.1-0.6 s)


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


@dataclass(frozen=True)
class BisectArgs:
    """What `racelab bisect` was asked; lab.cli builds it from its options (same defaults)."""

    tree: str                      # a kernel git checkout, never modified
    good: str                      # the older end: a commit, tag or branch
    bad: str                       # the newer end
    scenario: str                  # scenario name or .toml path
    find: str = "cause"            # cause | fix
    vms: int = 1                   # guests per step
    out: str = ""                  # results directory ("" = results/bisect-SCENARIO-TIME)
    calibrate_runs: int = 3        # runs on the reproducing end
    calibrate_budget: str = "2m"   # max load per calibration run
    min_step: str = "5s"           # minimum load per step
    signal: str = "auto"           # corruption | window | auto
    resume: bool = False           # continue the bisection in --out
    as_json: bool = False          # bisect.json alone on stdout


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
    signal: str = "corruption"   # what a step is judged on: corruption | window (auto resolved)
    good: str = ""          # the range, as full SHAs (to check a --resume against)
    bad: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> State:
        return cls(**json.loads(path.read_text()))


def first_window_s(outcome: Outcome) -> float | None:
    """Seconds from the first traced receive to the first window hit, the earliest over the
    fleet's guests (None: no hit, or no trace)."""
    times = []
    for t in outcome.targets:
        ev = t.evidence or {}
        key = "first_overlap_s" if ev.get("measure") == "overlap_hits" else "first_hit_s"
        if ev.get("available") and int(ev.get("window_hits") or 0) > 0 and ev.get(key) is not None:
            times.append(float(ev[key]))
    return min(times) if times else None


def step_outcome(signal: str, row: v.Row, unamplified: str) -> tuple[str, str]:
    """A step's outcome on its signal: (reproduced | clean | skip, why for a skip).

    Corruption is proof on either signal.  On the window signal a window hit is too; a
    clean window counts only where the trace could count it (its window level is
    available), else the step is a skip.  A clean run on a kernel where the scenario's
    amplifier did not work is a skip on both: calibration measured with it."""
    if row.verdict == v.INCONCLUSIVE:
        return "skip", v.verdict_text(row)
    if row.verdict == v.REPRODUCED:
        return "reproduced", ""
    if signal == "window":
        if not row.window.available:
            return "skip", f"window not measurable on this commit's kernel: {row.window.note or 'no trace'}"
        if row.window.count > 0:
            return "reproduced", ""
    if unamplified:
        return "skip", f"amplifier not on this commit's kernel: {unamplified}"
    return "clean", ""


def test_commit(st: State, sha: str, label: str, signal: str | None = None,
                budget: float | None = None) -> dict[str, Any]:
    """Build, boot, run one commit on `signal` (default the bisection's) for `budget` seconds
    of load at most (default the step budget).  Returns the step record (never raises for
    infra).  A window run traces, with the amplifier off; every run stops at its first
    corruption."""
    from lab import fleet
    from lab.kernels import kernel
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
    signal = signal or st.signal
    overrides = dict(st.overrides)
    if signal == "window":
        overrides["amplifier.method"] = "off"
    s = scen.load(st.scenario, overrides)
    kname = f"git:{st.tree}@{sha}"
    step_out = Path(st.out) / f"step-{sha[:12]}-{label}"
    if step_out.exists():      # a step cut short by an interruption (--resume): keep what it saw, apart
        n = 1
        while step_out.with_name(f"{step_out.name}.cut{n}").exists():
            n += 1
        step_out.rename(step_out.with_name(f"{step_out.name}.cut{n}"))
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend=Backend.VM, kernels=(kname,),
                    duration=st.budget if budget is None else budget, vms=st.vms, seed=st.seed,
                    stop_on_first=True, out=str(step_out), evidence=("trace",) if signal == "window" else ())
    rec["signal"] = signal
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
    rec["verdict"] = row.verdict
    if cfg.evidence:
        rec["window_hits"] = row.window.count if row.window.available else None
        rec["first_window_s"] = first_window_s(outcome)
    # the calibration's rate was measured with the amplifier: a clean run without it is
    # no evidence against the race at this commit (git bisect skip, never "clean")
    judged, why = step_outcome(signal, row, _amplifier_missing(s, row))
    if judged == "skip":
        rec.update(outcome="skip", reason=why, confidence=1.0)
    else:
        rec["outcome"] = judged
        rec["confidence"] = step_confidence(judged == "reproduced", st.rate_low, row.seconds)
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
            r: dict[str, Any] = json.loads(line)
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
    return int(rec["exit"])


# --- the whole bisection ----------------------------------------------------------

@dataclass
class RunOutput:
    returncode: int
    stdout: str
    stderr: str


_LEFT = re.compile(r"Bisecting: (\d+) revisions? left to test after this \(roughly (\d+) steps?\)")


def bisect_run(argv: list[str], env: dict[str, str], out: IO[str] | None = None, started: str = "") -> RunOutput:
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


def _amplifier_missing(s: Scenario, row: v.Row) -> str:
    """Why the scenario's run-time amplifier did not work on this step's kernel ("" = it did,
    or none was asked): its probe site was not found, or the probe never fired."""
    if s["amplifier"]["method"] == "off":
        return ""
    amp = row.extra.get("amplifier") or {}
    if amp.get("method") == "off":
        return str(amp.get("why") or "no probe site found")
    return str(amp.get("warning") or "")


@dataclass
class Calibration:
    """What the runs on the reproducing end measured, per signal: (events, VM-seconds);
    None for a signal not measured.

    VM-seconds, the unit a step's clean exposure (its row's seconds, summed over its
    guests) is counted in: up to a fleet's first violation every one of its st.vms
    guests was loading, so that run exposed first_violation_s x vms.  Counting the
    fleet's wall seconds instead made a clean step with --vms 2 claim twice the
    exposure it had against the rate (0.9999 where the design gives 0.99).  The window
    is counted the same way, to the first window hit."""

    corruption: tuple[int, float] | None = None
    window: tuple[int, float] | None = None

    def rate_low(self, signal: str) -> float:
        """The signal's one-sided 95% lower rate bound, per VM-second (0: never seen)."""
        return rate_lower_bound(*(getattr(self, signal) or (0, 0.0)))


def _first_event_s(rec: dict[str, Any], signal: str) -> float | None:
    """When a calibration run first showed its signal (s of load), None if it never did.
    Corruption on a window run counts as the window's (corruption needs the window)."""
    fv = None
    if rec.get("verdict") == v.REPRODUCED:
        got = rec.get("first_violation_s")
        fv = float(got if got is not None else rec.get("load_s") or 0.0)
    if signal == "corruption":
        return fv
    times = [float(t) for t in (rec.get("first_window_s"), fv) if t is not None]
    return min(times) if times else None


def _calibration_runs(st: State, ref_sha: str, attempts: int, max_seconds: float,
                      signal: str) -> tuple[int, float]:
    """attempts runs of one signal on the reproducing end, each to its first event (at most
    max_seconds of load): (events, VM-seconds)."""
    events, seconds = 0, 0.0
    cal = dataclasses.replace(st, budget=max_seconds)
    for i in range(attempts):
        rec = test_commit(cal, ref_sha, f"calibrate-{signal}{i}", signal=signal)
        _append(st.log, {**rec, "phase": "calibrate"})
        if rec["outcome"] == "skip":
            raise InfraError(f"calibration run failed on {ref_sha[:12]}: {rec.get('reason')}")
        t = _first_event_s(rec, signal)
        if t is not None:
            events += 1
            seconds += t * st.vms
        else:
            seconds += float(rec.get("load_s") or max_seconds)
        log.info("calibration %s %d/%d: %s", signal, i + 1, attempts,
                 f"first {'violation' if signal == 'corruption' else 'window hit'} after {t:.2f}s"
                 if t is not None else f"none in {float(rec.get('load_s') or 0):.1f}s of load")
    return events, seconds


def calibrate(st: State, ref_sha: str, attempts: int, max_seconds: float, signal: str,
              floor: float = 5.0, window_first: bool = False) -> Calibration:
    """The rates on the reproducing end that the steps are budgeted on.

    corruption: attempts runs to the first violation, each up to max_seconds.  window: to the
    first window hit, each up to WINDOW_CALIBRATE_S.  auto: first the signal expected to be
    faster (window_first: the scenario's corruption is rare), then the other only if the
    first one's step is longer than the floor, each of its runs up to that step (a signal
    that does not show within one step of the other cannot give the shorter step)."""
    caps = {"corruption": max_seconds, "window": min(max_seconds, WINDOW_CALIBRATE_S)}
    order = [signal] if signal != "auto" else \
        (["window", "corruption"] if window_first else ["corruption", "window"])
    cal = Calibration()
    for i, sig in enumerate(order):
        cap = caps[sig]
        if i:
            first = order[0]
            rate = cal.rate_low(first)
            if rate > 0:
                step = step_budget(rate * st.vms, floor=floor)
                if step <= floor:
                    log.info("calibration: %s gives the shortest step (%.1fs); %s not measured", first, step, sig)
                    break
                cap = min(cap, step)
        setattr(cal, sig, _calibration_runs(st, ref_sha, attempts, cap, sig))
    seen = {sig: got[0] for sig, got in (("corruption", cal.corruption), ("window", cal.window)) if got}
    if not any(seen.values()) or (signal != "auto" and not seen.get(signal)):
        what = {"corruption": "the race did not reproduce", "window": "no window hit came",
                "auto": "neither corruption nor a window hit came"}[signal]
        raise BadInput(f"{what} on the known-reproducing end {ref_sha[:12]} in {attempts} run(s) "
                       f"of up to {max_seconds:.0f}s",
                       hint="check --good/--bad and --find, or raise --calibrate-budget")
    return cal


def choose_signal(asked: str, cal: Calibration, vms: int, floor: float,
                  first: str = "corruption") -> tuple[str, dict[str, float]]:
    """The signal steps are judged on, and each measured signal's step budget.  auto: the
    shorter budget; on a tie `first`, the one calibrated first."""
    budgets = {sig: step_budget(cal.rate_low(sig) * vms, floor=floor)
               for sig in ("corruption", "window") if getattr(cal, sig) is not None}
    if asked != "auto":
        return asked, budgets
    seen = [sig for sig in budgets if cal.rate_low(sig) > 0]
    # a tie: the signal calibrated first (the one the scenario expects to be faster)
    return min(seen, key=lambda sig: (budgets[sig], sig != first)), budgets


VERIFY_BOOTS = 3   # the racy end's corruption check: the budget split over this many fresh boots


def verify_racy(st: State, sha: str, label: str, budget: float) -> tuple[dict[str, Any], int]:
    """The racy end of the answer must corrupt a ring: up to VERIFY_BOOTS fresh boots of
    budget / VERIFY_BOOTS seconds of load each (at least one step's), stopping at the first
    that does.  Returns its record and how many boots it took.

    Fresh boots, not one long run: the run-time amplified veth race corrupts within a second
    in one boot and not in two minutes in the next (one run measured both), so its rate is a
    property of the boot as much as of the kernel.  A boot is lost or cut only as a step is."""
    each = max(st.budget, budget / VERIFY_BOOTS)
    rec: dict[str, Any] = {}
    for n in range(1, VERIFY_BOOTS + 1):
        rec = test_commit(st, sha, label, signal="corruption", budget=each)
        _append(st.log, {**rec, "phase": "verify", "boot": n})
        if rec.get("outcome") == "reproduced":
            return rec, n
        log.info("verify: %s did not corrupt in %.0fs of load (boot %d of %d)", sha[:12], each, n, VERIFY_BOOTS)
    return rec, VERIFY_BOOTS


def subject(tree: str, sha: str) -> str:
    return run(["git", "-C", tree, "log", "-1", "--format=%h (\"%s\")", sha]).stdout.strip()


def main(a: BisectArgs) -> int:
    """--json: bisect.json alone on stdout at the end; everything else (progress, the
    answer in words) goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr if a.as_json else sys.stdout):
        code, report = _bisect(a)
    if a.as_json:
        print(json.dumps(report, indent=2), flush=True)
    return code


def _bisect(a: BisectArgs) -> tuple[int, dict[str, Any]]:
    tree = str(Path(a.tree).resolve())
    if not (Path(tree) / ".git").exists() and run(["git", "-C", tree, "rev-parse", "--git-dir"],
                                                   check=False).returncode != 0:
        raise BadInput(f"{tree} is not a git tree", hint="--tree must point at a kernel git checkout")
    shas = {}
    for name, ref in (("good", a.good), ("bad", a.bad)):
        p = run(["git", "-C", tree, "rev-parse", "--verify", f"{ref}^{{commit}}"], check=False)
        if p.returncode != 0:
            raise BadInput(f"--{name} {ref!r} is not a commit in {tree}")
        shas[name] = p.stdout.strip()
    from lab import scenario as scen
    s = scen.load(a.scenario)
    out = out_dir(a.out, s.name)
    print(f"results: {out}  (bisect.jsonl grows by one line per step)", flush=True)
    t0 = time.monotonic()
    racy_end = shas["bad"] if a.find == "cause" else shas["good"]
    if a.resume:
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
        asked = a.signal or "auto"
        rare = bool(s["evidence"].get("corruption_rare"))
        cal = calibrate(st, racy_end, a.calibrate_runs, parse_duration(a.calibrate_budget), asked,
                        floor=parse_duration(a.min_step), window_first=rare)
        # a step's fleet gathers vms VM-seconds per second of load
        signal, budgets = choose_signal(asked, cal, st.vms, parse_duration(a.min_step),
                                        first="window" if rare else "corruption")
        rate_low, budget = cal.rate_low(signal), budgets[signal]
        st = dataclasses.replace(st, signal=signal)
        for sig in budgets:
            n, secs = getattr(cal, sig) or (0, 0.0)
            what = "reproduction(s)" if sig == "corruption" else "first window hit(s)"
            print(f"calibrated {sig} on {racy_end[:12]}: {n} {what} in {secs:.1f} VM-seconds of load; "
                  f"rate >= {cal.rate_low(sig):.3g}/s per guest (95%); step budget {budgets[sig]:.1f}s",
                  flush=True)
        print(f"steps judged on {signal}{' (auto: the shorter step)' if asked == 'auto' else ''}: "
              f"{budget:.1f}s of load on {st.vms} guest(s) for P(miss) <= {MISS:.0%}", flush=True)
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
            bisected = bisect_run(["git", "-C", str(priv), "bisect", "run", *step], env, started=started.stdout)
        except KeyboardInterrupt:
            print(f"\ninterrupted; the steps so far are in {st.log}. Continue with the same command "
                  f"and --resume --out {out}", file=sys.stderr, flush=True)
            raise
        (out / "git-bisect-run.log").write_text(bisected.stdout + bisected.stderr)
        ref = "refs/bisect/bad" if a.find == "cause" else "refs/bisect/fixed"
        culprit = run(["git", "-C", str(priv), "rev-parse", ref], check=False).stdout.strip()
        blog = run(["git", "-C", str(priv), "bisect", "log"], check=False).stdout
        (out / "git-bisect.log").write_text(blog)
    finally:
        shutil.rmtree(priv.parent, ignore_errors=True)
    if not culprit or "first " not in bisected.stdout:
        raise InfraError("git bisect did not converge (too many skipped commits?)",
                         hint=f"see {out / 'git-bisect-run.log'}")
    steps = [json.loads(line) for line in Path(st.log).read_text().splitlines() if line.strip()]
    confs = [r.get("confidence", 1.0) for r in steps if r.get("label") == "step" and r["outcome"] != "skip"]
    # verify: the culprit and its parent again.  The racy one of the pair must corrupt a ring
    # (whatever the steps' signal); the other must stay clean on the steps' signal and budget.
    parent = run(["git", "-C", tree, "rev-parse", f"{culprit}^"]).stdout.strip()
    racy, fixed = (culprit, parent) if a.find == "cause" else (parent, culprit)
    vr, tries = verify_racy(st, racy, "verify-culprit" if racy == culprit else "verify-parent",
                            max(budget, parse_duration(a.calibrate_budget)))
    vf = test_commit(st, fixed, "verify-culprit" if fixed == culprit else "verify-parent")
    _append(st.log, {**vf, "phase": "verify"})
    vc, vp = (vr, vf) if racy == culprit else (vf, vr)
    verified = vr.get("outcome") == "reproduced" and vf.get("outcome") == "clean"
    conf = overall_confidence(confs + [vc.get("confidence", 0.0), vp.get("confidence", 0.0)])
    from lab.results import BISECT_VERSION
    report = {"schema_version": BISECT_VERSION, "find": a.find, "culprit": culprit, "subject": subject(tree, culprit),
              "parent": parent, "verified": verified, "confidence": conf,
              "steps": len(confs), "signal": st.signal, "step_budget_s": budget, "rate_low_per_s": rate_low,
              "verify": {"racy": racy, "racy_signal": "corruption", "racy_outcome": vr.get("outcome"),
                         "racy_first_violation_s": vr.get("first_violation_s"), "racy_boots": tries,
                         "fixed": fixed, "fixed_signal": st.signal, "fixed_outcome": vf.get("outcome")},
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
