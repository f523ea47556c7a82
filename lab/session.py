"""One `racelab run`: a scenario on one backend, to a verdict and a results directory.

The netns backend runs the agent on this machine's own kernel.  The vm
backend boots a fleet on each requested kernel (lab.fleet) and runs the same
agent in every guest.  Both end in the same rows, reports and exit codes.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import amplifier, report, results
from lab.config import RunConfig, fmt_duration, to_jsonable
from lab.host import LocalHost
from lab.progress import Display
from lab.run import BadInput, log, require_root, require_tools
from lab.scenario import Scenario, from_data
from lab.verdict import INCONCLUSIVE, Row, decide, verdict_text
from lab.workload import TargetResult, agent_spec, fetch_evidence, run_target, write_json

AF_XDP = 44


class Progress:
    """A run's live line, fed from its targets' events (from any thread), on the one progress
    display (lab.progress): elapsed, targets, packets and violations summed over targets, and
    a line that stays for the first violation on each target."""

    def __init__(self, enabled: bool = True, every: float = 10.0) -> None:
        self.display = Display(enabled, every=every)
        self.t0 = time.monotonic()
        self.rx: dict[str, int] = {}
        self.viol: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_event(self, label: str, ev: dict[str, Any]) -> None:
        with self._lock:
            typ = ev.get("type")
            if typ in ("stats", "done"):
                self.rx[label] = int(ev.get("rx", 0))
                self.viol[label] = max(self.viol.get(label, 0), int(ev.get("violations", 0)))
            elif typ == "violation":
                self.viol[label] = self.viol.get(label, 0) + 1
                if label not in self.first:
                    self.first[label] = time.monotonic() - self.t0
                    self.display.note(f"first violation on {label}: {ev.get('kind')} "
                                      f"(queue {ev.get('queue')}, cpu {ev.get('cpu')})")
            self.display.update(self.line)   # formatted only when shown

    def line(self) -> str:
        return (f"[{fmt_duration(time.monotonic() - self.t0):>6}] targets {len(self.rx)}  "
                f"packets {sum(self.rx.values()):,}  violations {sum(self.viol.values()):,}")

    def close(self) -> None:
        self.display.close()


@dataclass
class Outcome:
    rows: list[Row]
    targets: list[TargetResult]
    out: Path
    meta: dict[str, Any] = field(default_factory=dict)


def preflight_netns() -> None:
    """Everything the netns backend needs, checked before anything is built."""
    require_root("the netns backend")
    require_tools("nsenter", "ethtool", "tee")
    try:
        s = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        s.close()
    except OSError as e:
        raise xdp_socket_error(e) from None


def xdp_socket_error(e: OSError) -> BadInput:
    """What socket(AF_XDP) failing means: a kernel without XDP sockets, or something else."""
    if e.errno in (errno.EAFNOSUPPORT, errno.EINVAL, errno.EPROTONOSUPPORT):
        return BadInput(f"this kernel ({platform.release()}) has no XDP sockets ({e.strerror}): "
                        "CONFIG_XDP_SOCKETS is not set",
                        hint="use a kernel with CONFIG_XDP_SOCKETS=y (and CONFIG_BPF_SYSCALL=y, "
                             "CONFIG_VETH); or run --backend vm on a catalog kernel")
    if e.errno in (errno.EPERM, errno.EACCES):
        return BadInput(f"socket(AF_XDP) is not allowed here ({e.strerror})",
                        hint="run as root with CAP_NET_RAW and CAP_BPF (not in a restricted "
                             "container or under a seccomp/LSM policy that blocks AF_XDP)")
    return BadInput(f"socket(AF_XDP) failed: {e.strerror}",
                    hint="check the kernel's XDP socket support (CONFIG_XDP_SOCKETS=y)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT, SIGTERM, SIGHUP) during a run whose partial results were kept.

    outcome: the results written so far (every row INCONCLUSIVE, interrupted), once
    finish() wrote them; partial: what a lower layer had gathered before that (the
    fleets' KernelRuns).  A KeyboardInterrupt, so every caller that stops on Ctrl-C
    still does."""

    def __init__(self, outcome: Outcome | None = None, partial: Any = None) -> None:
        super().__init__("interrupted")
        self.outcome = outcome
        self.partial = partial


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """While the load runs, Ctrl-C (and SIGTERM, SIGHUP) sets the event instead of raising,
    so the agent is asked to stop and its counts so far are kept; a second one raises
    KeyboardInterrupt at once.  Off the main thread (no signals there) it only yields."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        log.info("interrupted: stopping the agent and keeping what it counted "
                 "(Ctrl-C again to abort at once)")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield cancel
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def rows_from_targets(kernel: str, targets: list[TargetResult], wall: float, confidence: float,
                      vms: int, interrupted: bool = False) -> Row:
    """One kernel's row.  Exposure (packets, seconds) comes only from the targets that
    count: not lost, or lost after a violation (what it saw is evidence, with the exposure
    it had).  A lost target (infrastructure, no packets, failed senders, traffic that
    stopped early) is named in the row and leaves it INCONCLUSIVE unless a violation
    decides it.  interrupted (or any interrupted target): INCONCLUSIVE (interrupted)."""
    lost = [(t, r) for t in targets if (r := t.lost_reason())]
    counted = [t for t in targets if t.violation_count or not t.lost_reason()]
    packets = sum(t.packets for t in counted)
    seconds = round(sum(t.exposure_s() for t in counted), 3)
    by_kind: dict[str, int] = {}
    onsets: dict[str, int] = {}
    for t in counted:
        for k, n in t.by_kind.items():
            by_kind[k] = by_kind.get(k, 0) + n
        for k, n in t.onsets().items():
            onsets[k] = onsets.get(k, 0) + n
    with_first = [t for t in counted if t.first_violation_s is not None]
    first = min(with_first, key=lambda t: t.first_violation_s or 0.0) if with_first else None
    window_hits = sum(int(t.evidence.get("window_hits", 0)) for t in counted)
    window_avail = any(t.evidence.get("available") for t in counted)
    notes = sorted({str(t.evidence.get("note")) for t in targets if t.evidence.get("note")})
    infra = [f"{t.label}: {r}" for t, r in lost]
    row = decide(kernel, vms=vms, packets=packets, seconds=seconds, wall=wall, by_kind=by_kind,
                 first_violation_s=first.first_violation_s if first else None,
                 window_hits=window_hits, window_available=window_avail,
                 window_note="; ".join(notes), confidence=confidence, infra_errors=infra,
                 onsets_by_kind=onsets,
                 first_violation_from_load_start_s=first.first_violation_from_load_start_s
                 if first else None,
                 first_violation_origin=first.first_violation_origin if first else "",
                 interrupted=interrupted or any(t.interrupted for t in targets))
    row.extra["load_seconds"] = round(sum(t.load_seconds for t in targets), 3)
    return row


def results_dir(cfg: RunConfig) -> Path:
    if cfg.out:
        p = Path(cfg.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        p = Path("results") / f"{cfg.scenario}-{stamp}-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".racelab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"cannot write the results directory {p}: {e.strerror}",
                       hint="pass --out with a writable directory (and check free space: df -h)") from None
    return p.resolve()   # libvirt and guests' consoles need absolute paths


def run_netns(cfg: RunConfig, progress: bool = True) -> Outcome:
    from lab import dataplane, splat

    scenario = from_data(cfg.scenario_data, path=f"{cfg.scenario}.toml")
    preflight_netns()
    bin_dir = dataplane.build()
    out = results_dir(cfg)
    (out / "config.json").write_text(cfg.to_json())
    meta = report.provenance(cfg, {"kernel": f"host:{platform.release()}", "accelerator": "none (host kernel)",
                                   "bin_dir": str(bin_dir)})
    write_json(out / "provenance.json", meta)
    plan = amplifier.host_plan(scenario["amplifier"])
    if plan.method == "off" and scenario["amplifier"]["method"] != "off" and \
            (scenario["amplifier"]["widen_rx_ns"] or scenario["amplifier"]["delay_ns"]):
        log.info("note: amplifier off: %s", plan.why)
    elif plan.method != "off":
        log.info("amplifier: %s", plan.text())
    spec = agent_spec(scenario, duration=cfg.duration, seed=cfg.seed, bin_dir=str(bin_dir), amplifier=plan,
                      stop_on_first=cfg.stop_on_first, inject=cfg.inject or "",
                      trace=_trace_opts(cfg, scenario), stop_grace=cfg.stop_grace)
    prog = Progress(progress)
    t0 = time.monotonic()
    kernel = f"host:{platform.release()}"
    try:
        # the host's kernel log from here on: a WARN in xsk or veth during the load is a splat
        # line-buffered: events.jsonl can be followed while the run goes on (as a fleet's is)
        with open(out / "events.jsonl", "w", buffering=1) as ev, stop_on_signals() as cancel, \
                splat.KmsgWatcher() as kmsg:

            def on_event(label: str, e: dict[str, Any]) -> None:
                kmsg.on_agent_event(e)
                prog.on_event(label, e)
            res = run_target(LocalHost(str(bin_dir)), spec, label="local", kernel=kernel,
                             on_event=on_event, events_file=ev, cancel=cancel)
    finally:
        prog.close()
    splat.host_splats(res, kmsg, scenario["vm"]["stalls"], bool(spec.trace), out)
    if res.infra_error is None and not res.interrupted:
        # the window analysis, as for a guest; the agent's trace file is removed either way
        fetch_evidence(LocalHost(str(bin_dir)), res, out)
    elif res.evidence.get("trace_path"):
        Path(str(res.evidence["trace_path"])).unlink(missing_ok=True)
    row = rows_from_targets(kernel, [res], time.monotonic() - t0,
                            scenario["run"]["confidence"], vms=0)
    row.extra["amplifier"] = amplifier.summary(plan, [res])
    return finish(cfg, scenario, [row], [res], out, meta)


def _trace_opts(cfg: RunConfig, scenario: Scenario) -> dict[str, Any]:
    if "trace" not in cfg.evidence:
        return {}
    from lab import evidence

    return evidence.trace_options(scenario.name, stop_on_first=True, window=scenario["evidence"]["window"])


def finish(cfg: RunConfig, scenario: Scenario, rows: list[Row], targets: list[TargetResult],
           out: Path, meta: dict[str, Any], title: str | None = None,
           expected: dict[str, str] | None = None) -> Outcome:
    title = title or f"racelab {cfg.scenario} ({cfg.backend})"
    for note in sorted({f"{t.kernel}: {n}" for t in targets for n in t.notes}):
        log.info("note: %s", note)
    for row in rows:
        knobs = {k: v for t in targets if t.kernel == row.kernel for k, v in t.knobs.items()}
        if knobs:
            row.extra["knobs_applied"] = knobs
    if cfg.expect:
        expected = {r.kernel: cfg.expect for r in rows}
    expected = expected or {}
    interrupted = any(r.interrupted for r in rows)
    summary = {
        "schema_version": results.SUMMARY_VERSION,     # lab/schemas/summary.schema.json
        "scenario": cfg.scenario, "backend": cfg.backend, "bug": scenario.bug,
        "interrupted": interrupted,
        "rows": [report.row_dict(r) for r in rows],
        "targets": [to_jsonable(t) | {"violations": t.violations[:50]} for t in targets],
        "provenance": meta, "config": json.loads(cfg.to_json()), "expected": expected,
    }
    write_json(out / "summary.json", summary)
    for row in rows:
        if row.verdict == INCONCLUSIVE and not row.interrupted:
            # said here too: with --json the table is not on the terminal
            log.info("%s: %s", row.kernel, verdict_text(row))
    suite = f"racelab.{cfg.scenario}"
    report.write_junit(out / "junit.xml", suite, report.junit_cases(rows, suite, expected))
    report.write_html(out / "report.html", title, rows, [to_jsonable(t) for t in targets], meta)
    log.debug("results in %s", out)
    outcome = Outcome(rows, targets, out, meta)
    if interrupted:
        # the partial results are on disk; the caller prints them and exits as interrupted
        raise Interrupted(outcome)
    return outcome
