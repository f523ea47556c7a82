"""Fleets: N guests per kernel, booted in parallel, each running the agent.

run_vm() is the vm backend of `racelab run` (and the engine of `repro`): it
resolves and builds every kernel first (all bad names reported at once),
builds the image, boots every fleet at once, streams violations live, watches
each console for kernel splats, and turns it all into one row per kernel.

A guest that dies or stops answering is an infrastructure loss: its target
carries infra_error, contributes no packets, and can never make a row
NOT REPRODUCED.  The exception is a guest that dies right after a kernel
splat on its console: the kernel under test crashed, and that counts.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lab import report
from lab.config import RunConfig, parse_duration
from lab.run import BadInput, InfraError, LostVM, log, require_root, slug
from lab.scenario import Scenario, from_data
from lab.session import (Interrupted, Outcome, Progress, _trace_opts, finish, results_dir,
                         rows_from_targets)
from lab.splat import Splat, SplatWatcher, crashed_of_splat, record_splats, splat_kind, stall_policy
from lab.verdict import Row
from lab.workload import TargetResult, agent_spec, fetch_evidence, run_target, write_json

if TYPE_CHECKING:
    from lab.agent.agent import AgentSpec
    from lab.amplifier import Plan
    from lab.image import Image
    from lab.kernels.kernel import KernelArtifact, KernelSpec
    from lab.repro import ControlStop
    from lab.vm import VM

@dataclass
class KernelRun:
    name: str                 # what the user typed
    artifact: KernelArtifact
    targets: list[TargetResult] = field(default_factory=list)
    wall: float = 0.0
    accel: str = ""
    accel_reason: str = ""
    boot_seconds: list[float] = field(default_factory=list)
    pinning: dict[str, list[int]] = field(default_factory=dict)   # target -> host CPU per vCPU
    uris: dict[str, str] = field(default_factory=dict)      # target -> the libvirt URI it ran on
    phases: dict[str, float] = field(default_factory=dict)   # boot, setup, load, evidence, teardown (s)
    plan: Plan | None = None  # the amplifier for this kernel


def preflight_vm() -> None:
    require_root("the vm backend (libvirt qemu:///system, guest images)")


def resolve_kernels(names: list[str]) -> list[KernelSpec]:
    """Resolve every kernel name first and report all unknown ones at once."""
    from lab.kernels import kernel

    specs: list[KernelSpec] = []
    problems: list[str] = []
    for n in names:
        try:
            specs.append(kernel.resolve(n))
        except BadInput as e:
            problems.append(str(e))
    if problems:
        raise BadInput("bad kernel(s):\n  " + "\n  ".join(problems))
    return specs


def build_kernels(names: list[str], progress: bool = True) -> list[KernelArtifact]:
    from lab.kernels import kernel

    specs = resolve_kernels(names)
    arts = []
    for name, spec in zip(names, specs, strict=True):
        log.info("kernel %s: building or fetching (cached under %s)", name, "~/.cache/racelab/kernels")
        arts.append(kernel.ensure(spec, progress=progress))
    return arts


@contextmanager
def booted(artifact: KernelArtifact, image: Image, n: int, *, label: str, s: Scenario, out: Path,
           uris: tuple[str, ...], accel: str | None = None, first: int = 0,
           cpus: dict[str, int] | None = None) -> Iterator[list[VM]]:
    """Boot n guests in parallel; all are destroyed on every exit path.

    first: the fleet-wide number of guest 0 (fleets of several kernels boot
    at once), which decides its libvirt URI and, with [vm] pin, its host CPUs
    (see pin_map; cpus: host CPUs per URI, asked for when not given)."""
    from lab import vm as vmmod

    vmcfg = s["vm"]
    if vmcfg["pin"] and cpus is None:
        cpus = {u: host_cpus(u) for u in uris}
    run_id = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
    with ExitStack() as stack:
        vms: list[VM | None] = [None] * n
        errors: list[BaseException] = []
        lock = threading.Lock()

        def boot(i: int) -> None:
            name = f"racelab-{run_id}-{slug(label, 40)}-{i}"
            g = first + i
            uri = guest_uri(uris, g)
            try:
                pin = (pin_map(g // len(uris), vmcfg["vcpus"], cpus[uri])
                       if vmcfg["pin"] and cpus else None)
                m = vmmod.VM(artifact, image, name=name, vcpus=vmcfg["vcpus"],
                             memory_mib=vmcfg["memory_mib"], cmdline=vmcfg["cmdline"],
                             pin=pin, results_dir=out / "vms" / f"{slug(label, 40)}-{i}",
                             uri=uri, accel=accel)
                entered = m.__enter__()
            except BaseException as e:  # noqa: BLE001 - reported below, after the others boot
                with lock:
                    errors.append(e)
                return
            with lock:
                vms[i] = entered
                stack.push(m.__exit__)

        # a boot (and the accelerator probe before it) takes seconds to minutes under TCG: say so
        # (run_fleets says when they are up, and on what accelerator)
        log.info("booting %d guest%s on %s...", n, "" if n == 1 else "s", label)
        workers = [Worker(boot, i).start() for i in range(n)]
        _join_all(workers)   # every boot finishes (and registers its teardown) before we unwind
        if errors:
            e = errors[0]
            if isinstance(e, (InfraError, BadInput, KeyboardInterrupt)):
                raise e
            raise LostVM(f"{label}: guest failed to boot: {e}") from e
        yield [m for m in vms if m is not None]   # every boot succeeded: all n


def guest_uri(uris: tuple[str, ...], guest: int) -> str:
    """The libvirt URI of the fleet-wide guest-th guest: guests take the URIs in turn."""
    return uris[guest % len(uris)]


def pin_map(guest: int, vcpus: int, host_cpus: int) -> list[int]:
    """Host CPU for each vCPU of the guest-th guest on one host: guest g's vCPU
    i runs on (g*vcpus + i) % host_cpus, so guests take the host's CPUs in turn
    instead of all stacking their vCPU 0 on CPU 0."""
    return [(guest * vcpus + i) % host_cpus for i in range(vcpus)]


def host_cpus(uri: str) -> int:
    """CPUs of the machine behind a libvirt URI."""
    from lab import libvirtd

    if libvirtd.is_local(uri):
        return os.cpu_count() or 1
    conn = libvirtd.connect(uri)
    try:
        return int(conn.getInfo()[2])
    finally:
        conn.close()


def overcommitted(guests: int, vcpus: int, uris: tuple[str, ...], cpus: dict[str, int]) -> set[str]:
    """The hosts (URIs) on which the fleet's vCPUs outnumber the CPUs: guest g runs on
    uris[g % len(uris)].  Under KVM a stall there is starvation, not evidence."""
    return {uri for u, uri in enumerate(uris)
            if len(range(u, guests, len(uris))) * vcpus > cpus[uri]}


def overcommit_notes(guests: int, vcpus: int, uris: tuple[str, ...],
                     cpus: dict[str, int]) -> list[str]:
    """What to say when a fleet has more vCPUs than a host has CPUs."""
    notes = []
    for u, uri in enumerate(uris):
        on_host = len(range(u, guests, len(uris)))
        if on_host * vcpus > cpus[uri]:
            notes.append(f"vCPUs overcommit host CPUs: {on_host} guest(s) x {vcpus} vCPUs = "
                         f"{on_host * vcpus} vCPUs on {cpus[uri]} host CPUs ({uri}); "
                         "guests compete for CPU time")
    return notes


class Worker:
    """A thread whose end is an Event: Thread.join() interrupted by Ctrl-C can
    mark a live thread as stopped on Python 3.11 (bpo-45274), Event.wait() cannot.
    An exception that ends the target is kept in .error for the caller."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

        def body() -> None:
            try:
                target(*args)
            except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                self.error = e
            finally:
                self.done.set()
        self.thread = threading.Thread(target=body, daemon=True)

    def start(self) -> Worker:
        self.thread.start()
        return self


def _join_all(workers: list[Worker], on_interrupt: Callable[[], None] | None = None) -> None:
    """Wait for every worker even through Ctrl-C (calling on_interrupt at once), then re-raise it."""
    interrupted = False
    for w in workers:
        while not w.done.is_set():
            try:
                w.done.wait(0.5)
            except KeyboardInterrupt:
                if not interrupted and on_interrupt is not None:
                    on_interrupt()
                interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def run_on_vm(m: VM, kname: str, i: int, spec: AgentSpec, out: Path, prog: Progress,
              events_lock: threading.Lock, events_file: IO[str],
              cancel: threading.Event | None = None, *, silence: float | None = None,
              stalls: str = "note", stalls_why: str = "", control: ControlStop | None = None,
              phases: dict[str, dict[str, float]] | None = None) -> TargetResult:
    """The agent in guest m, its console watched for splats.  silence, stalls:
    the scenario's [vm] knobs (a quiet guest is lost; stalls noted or counted,
    stalls_why saying why).  control: sees every agent event and may end the
    load early (lab.repro.ControlStop).  phases: gets this target's set-up,
    load and evidence seconds under its label."""
    label = f"{kname}/vm-{i}"

    def on_splat(s: Splat) -> None:
        if s.after_load and splat_kind(s.text, stalls) == "kernel-splat":
            prog.on_event(label, {"type": "violation", "kind": "kernel-splat"})

    class _Sink:
        def write(self, s: str) -> None:
            with events_lock:
                events_file.write(s)
                events_file.flush()   # events.jsonl can be followed while the run goes on

    with SplatWatcher(Path(m.console_path), on_splat) as console:

        def on_event(lbl: str, ev: dict[str, Any]) -> None:
            console.on_agent_event(ev)   # at load-start: the console so far is the boot and set-up
            prog.on_event(lbl, ev)
            if control is not None:
                control.on_event(kname, lbl, ev, m.host)

        alive = m.alive if cancel is None else (lambda: not cancel.is_set() and m.alive())
        res = run_target(m.host, spec, label=label, kernel=kname, on_event=on_event,
                         events_file=_Sink(), alive=alive, silence=silence)
    if control is not None:
        control.target_done(kname, res)
    if phases is not None:   # host clock; the caller adds when this function returns
        phases[label] = {"load_started": res.load_started_host or time.monotonic(),
                         "load": res.load_seconds}
    if cancel is not None and cancel.is_set():
        res.infra_error = "interrupted"
        res.interrupted = True   # its counts so far go into an INCONCLUSIVE (interrupted) row
        return res
    record_splats(res, console.splats, stalls, stalls_why)
    ev_dir = out / "evidence"
    ev_dir.mkdir(parents=True, exist_ok=True)
    if crashed_of_splat(res, console.splats, traced=bool(spec.trace), stalls=stalls,
                        last_progress=console.last_progress):
        return res
    if res.infra_error is None:
        _fetch_after(m, res, out, label)
    res.evidence.setdefault("console", str(m.console_path))
    return res


def _fetch_after(m: VM, res: TargetResult, out: Path, label: str) -> None:
    """The trace and dmesg of a target whose checker result is in.  Both are best effort:
    the row rests on the checker's counts and the console (which holds the kernel log too),
    so a guest too starved to open one more SSH channel keeps its verdict and says what it
    could not bring home."""
    ev_dir = out / "evidence"
    try:
        fetch_evidence(m.host, res, out)
    except InfraError as e:
        # said once: the row's window level reads "not measured: trace not fetched: ..."
        res.evidence.update(available=False, note=f"trace not fetched: {e.message}")
    try:
        dmesg = m.host.cmd(["dmesg"], check=False, timeout=60)
    except InfraError as e:
        res.notes.append(f"dmesg not fetched ({e.message}); the console log holds the kernel log")
        return
    (ev_dir / f"{slug(label, 40)}.dmesg").write_text(dmesg.stdout)
    res.evidence["dmesg"] = str(ev_dir / f"{slug(label, 40)}.dmesg")


def _phases(t0: float, t_up: float, t_ran: float, t_down: float,
            each: dict[str, dict[str, float]]) -> dict[str, float]:
    """A fleet's seconds per phase, from the host clock; its guests run side by
    side, so each phase lasts as long as its slowest guest's."""
    ts = list(each.values())
    load_end = [t["load_started"] + t["load"] for t in ts]
    return {"boot": round(t_up - t0, 3),
            "setup": round(max((t["load_started"] - t_up for t in ts), default=0.0), 3),
            "load": round(max((t["load"] for t in ts), default=0.0), 3),
            "evidence": round(max((t.get("returned", e) - e for t, e in zip(ts, load_end, strict=True)),
                                  default=0.0), 3),
            "teardown": round(t_down - t_ran, 3)}


def run_fleets(cfg: RunConfig, s: Scenario, kernel_names: list[str], artifacts: list[KernelArtifact],
               image: Image, out: Path, prog: Progress, plans: Sequence[Plan | None] | None = None,
               control: ControlStop | None = None) -> list[KernelRun]:
    """Boot every kernel's fleet at once and run the scenario in every guest.

    control: sees every agent's events and may end a load early (lab.repro.ControlStop).
    An error that is not an infrastructure loss (BadInput, a bug) in any
    fleet is raised here once every fleet has torn itself down."""
    from lab.accel import accel_text

    vmcfg = s["vm"]
    trace = _trace_opts(cfg, s)
    from lab import amplifier

    runs = [KernelRun(n, a, plan=p) for n, a, p in zip(kernel_names, artifacts, plans or [None] * len(artifacts),
                                                            strict=True)]
    cpus = {u: host_cpus(u) for u in cfg.uris}
    notes = overcommit_notes(len(runs) * cfg.vms, vmcfg["vcpus"], cfg.uris, cpus)
    crowded = overcommitted(len(runs) * cfg.vms, vmcfg["vcpus"], cfg.uris, cpus)
    for note in notes:
        log.info("note: %s", note)
    silence = parse_duration(vmcfg["silence"])
    events_lock = threading.Lock()
    accels_said: set[str] = set()
    cancel = threading.Event()
    with open(out / "events.jsonl", "a") as events_file:

        def one_kernel(k: int, kr: KernelRun) -> None:
            t0 = time.monotonic()
            kr.uris = {f"{kr.name}/vm-{i}": guest_uri(cfg.uris, k * cfg.vms + i) for i in range(cfg.vms)}
            try:
                with booted(kr.artifact, image, cfg.vms, label=kr.name, s=s, out=out,
                            uris=cfg.uris, first=k * cfg.vms, cpus=cpus) as vms:
                    kr.accel = getattr(vms[0], "accel", "")
                    kr.accel_reason = getattr(vms[0], "accel_reason", "")
                    t_up = time.monotonic()
                    kr.boot_seconds = [float(getattr(v, "boot_seconds", 0.0)) for v in vms]
                    kr.pinning = {f"{kr.name}/vm-{i}": [int(c) for c in getattr(v, "pin", ())]
                                  for i, v in enumerate(vms) if getattr(v, "pin", ())}
                    with events_lock:   # the accelerator and why: once per run, not per kernel
                        said = accel_text(kr.accel, kr.accel_reason) in accels_said
                        accels_said.add(accel_text(kr.accel, kr.accel_reason))
                    if not said:
                        log.info("accelerator: %s", accel_text(kr.accel, kr.accel_reason))
                    log.info("%s: %d guest(s) up in %.1f s (%s)%s", kr.name, len(vms), t_up - t0, kr.accel,
                             "; vCPUs pinned to host CPUs " + ", ".join(
                                 f"{lbl.rsplit('/', 1)[1]}: {cs}" for lbl, cs in kr.pinning.items())
                             if kr.pinning else "")
                    if kr.plan is not None and amplifier.needs_guest(kr.plan):
                        # no System.map: the probe site from the running kernel's own symbols
                        syms = vms[0].host.cmd(["cat", "/proc/kallsyms"], timeout=120).stdout
                        kr.plan = amplifier.plan(s["amplifier"], kr.artifact, kallsyms=syms)
                        log.info("%s: amplifier %s", kr.name, kr.plan.text())
                    spec = agent_spec(s, duration=cfg.duration, seed=cfg.seed, bin_dir=vms[0].host.bin_dir,
                                      stop_on_first=cfg.stop_on_first, inject=cfg.inject or "",
                                      trace=trace, stop_grace=cfg.stop_grace, amplifier=kr.plan)
                    policies = [stall_policy(vmcfg["stalls"], kr.accel,
                                             guest_uri(cfg.uris, k * cfg.vms + i) in crowded)
                                for i in range(len(vms))]
                    each: dict[str, dict[str, float]] = {}

                    def target(i: int, m: VM) -> TargetResult:
                        res = run_on_vm(m, kr.name, i, spec, out, prog, events_lock, events_file, cancel,
                                        silence=silence, stalls=policies[i][0], stalls_why=policies[i][1],
                                        control=control, phases=each)
                        each[res.label]["returned"] = time.monotonic()
                        return res

                    with ThreadPoolExecutor(len(vms)) as ex:
                        futs = [ex.submit(target, i, m) for i, m in enumerate(vms)]
                        kr.targets = [f.result() for f in futs]
                    t_ran = time.monotonic()
                kr.phases = _phases(t0, t_up, t_ran, time.monotonic(), each)
            except InfraError as e:
                kr.targets = [TargetResult(label=f"{kr.name}/fleet", kernel=kr.name,
                                           infra_error=f"{type(e).__name__}: {e.message}")]
            for res in kr.targets:
                res.notes.extend(notes)
            kr.wall = time.monotonic() - t0

        workers = [Worker(one_kernel, k, kr).start() for k, kr in enumerate(runs)]

        def stop_all() -> None:
            # Ctrl-C: stop every agent; each fleet then tears itself down
            log.info("interrupted: stopping agents and destroying guests")
            cancel.set()
        try:
            _join_all(workers, stop_all)
        except KeyboardInterrupt:
            raise Interrupted(partial=runs) from None   # every fleet is down; run_vm keeps the counts
    errors = [w.error for w in workers if w.error is not None]
    for e in errors:
        if isinstance(e, BadInput):
            raise e          # the user's to fix: its message, not a row
    if errors:
        raise errors[0]
    return runs


def run_vm(cfg: RunConfig, progress: bool = True, title: str | None = None,
           expected: dict[str, str] | None = None, control: ControlStop | None = None) -> Outcome:
    """control: may end a clean control's load early (lab.repro.ControlStop) and says why in its row."""
    from lab import amplifier
    from lab import image as imagemod

    t_start = time.monotonic()
    s = from_data(cfg.scenario_data, path=f"{cfg.scenario}.toml")
    if not cfg.kernels:
        raise BadInput("--backend vm needs at least one --kernel",
                       hint=f"e.g. --kernel {s['kernels']['affected']} --kernel {s['kernels']['fixed']}")
    preflight_vm()
    cleanup_stale()                        # guests left by a racelab that was SIGKILLed
    names = list(cfg.kernels)
    resolve_kernels(names)                 # every bad name before any build
    artifacts = build_kernels(names, progress=progress)
    plans = amplifier_plans(s, names, artifacts)
    img = imagemod.ensure_image(progress=progress)
    out = results_dir(cfg)
    (out / "config.json").write_text(cfg.to_json())
    prog = Progress(progress)
    interrupted = False
    t_built = time.monotonic()
    try:
        runs = run_fleets(cfg, s, names, artifacts, img, out, prog, plans, control=control)
    except Interrupted as e:
        runs, interrupted = e.partial, True   # finish() writes them, then raises Interrupted again
    finally:
        prog.close()
    rows: list[Row] = []
    targets: list[TargetResult] = []
    kmeta = {}
    for kr in runs:
        row = rows_from_targets(kr.name, kr.targets, kr.wall, s["run"]["confidence"], vms=cfg.vms,
                                interrupted=interrupted)
        if kr.plan is not None:
            row.extra["amplifier"] = amplifier.summary(kr.plan, kr.targets)
        if control is not None:
            control.annotate(row)
        row.extra["phases"] = dict(kr.phases)
        rows.append(row)
        targets += kr.targets
        a = kr.artifact
        kmeta[kr.name] = {"key": getattr(a, "key", ""), "version": getattr(a, "version", ""),
                          "config": str(getattr(a, "config", "")), "source": getattr(a, "source", ""),
                          "patches": list(getattr(a, "patches", []) or []),
                          "affected": list(getattr(a, "affected", []) or []),
                          "accelerator": kr.accel, "accelerator_reason": kr.accel_reason,
                          "boot_seconds": kr.boot_seconds, "vcpus": s["vm"]["vcpus"],
                          "pinning": kr.pinning, "uris": kr.uris,
                          "amplifier": kr.plan.to_dict() if kr.plan is not None else None}
    meta = report.provenance(cfg, {"kernels": kmeta, "image": {"key": img.key, "path": str(img.path)},
                                   "expected": expected or {}})
    write_json(out / "provenance.json", meta)
    t_report = time.monotonic()
    outcome = finish(cfg, s, rows, targets, out, meta, title=title, expected=expected)
    phases = run_phases(runs, build_check=t_built - t_start, report=time.monotonic() - t_report,
                        wall=time.monotonic() - t_start)
    log.info("phases: %s", ", ".join(f"{k} {v:.1f}s" for k, v in phases.items() if isinstance(v, float)))
    add_to_summary(out, "phases", phases)
    outcome.meta["phases"] = phases
    return outcome


def run_phases(runs: list[KernelRun], *, build_check: float, report: float, wall: float) -> dict[str, Any]:
    """Where a run's wall time went.  The fleets run side by side, so the phases of
    the one that ended last (its kernel named) are the ones the user waited for."""
    last = max(runs, key=lambda kr: kr.wall, default=None)
    fleet = {k: float(last.phases.get(k, 0.0)) if last else 0.0
             for k in ("boot", "setup", "load", "evidence", "teardown")}
    return {"build_check": round(build_check, 3), **fleet, "report": round(report, 3),
            "wall": round(wall, 3), "slowest_kernel": last.name if last else "",
            "by_kernel": {kr.name: dict(kr.phases) for kr in runs}}


def add_to_summary(out: Path, key: str, value: Any) -> None:
    """One more top-level field in summary.json, once finish() has written it."""
    import json

    path = out / "summary.json"
    summary = json.loads(path.read_text())
    summary[key] = value
    write_json(path, summary)


def amplifier_plans(s: Scenario, names: list[str], artifacts: list[KernelArtifact]) -> list[Plan]:
    """The amplifier of each kernel, chosen before anything boots (bad input at once);
    the control must run with the same one as the affected kernel, or it proves less."""
    from lab import amplifier

    plans: list[Plan] = []
    problems: list[str] = []
    for name, art in zip(names, artifacts, strict=True):
        try:
            plans.append(amplifier.plan(s["amplifier"], art, defer=True))
        except BadInput as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise BadInput("amplifier:\n  " + "\n  ".join(problems))
    for name, p in zip(names, plans, strict=True):
        log.info("%s: amplifier %s", name, p.text())
    if len({(p.method, p.delay_ns, p.widen_rx_ns) for p in plans}) > 1:
        log.info("note: the kernels run with different amplifiers, so a clean control is weaker "
                 "evidence (--set amplifier.method=... makes them alike)")
    return plans


# --- single guests, for `racelab vm run|shell` ---------------------------------

@contextmanager
def _single(kernel_name: str, vcpus: int, memory_mib: int, cmdline: str = "", accel: str | None = None,
            results: Path | None = None) -> Iterator[VM]:
    from lab import image as imagemod
    from lab import vm as vmmod
    from lab.accel import accel_text

    preflight_vm()
    (art,) = build_kernels([kernel_name])
    img = imagemod.ensure_image()
    log.info("booting 1 guest on %s...", kernel_name)
    # without --results the console log lives as long as the guest: nothing is left in /tmp afterwards
    with ExitStack() as stack:
        out = results or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="racelab-vm-")))
        out.mkdir(parents=True, exist_ok=True)
        m = stack.enter_context(vmmod.VM(art, img, name=f"racelab-{os.getpid()}-single-0", vcpus=vcpus,
                                         memory_mib=memory_mib, cmdline=cmdline, pin=None, results_dir=out,
                                         accel=accel))
        log.info("guest up in %.1fs (accelerator: %s); console while it runs: %s", m.boot_seconds,
                 accel_text(m.accel, m.accel_reason), m.console_path)
        yield m


def vm_run(kernel_name: str, argv: list[str], vcpus: int = 2, memory_mib: int = 1024, cmdline: str = "",
           accel: str | None = None, results: Path | None = None) -> int:
    """`racelab vm run K -- CMD`: CMD's output streams as the guest prints it; its exit status is ours."""
    from lab.remote import shell_or_command

    with _single(kernel_name, vcpus, memory_mib, cmdline, accel, results) as m:
        return shell_or_command(m.host, argv)


def vm_shell(kernel_name: str, vcpus: int = 2, memory_mib: int = 1024, cmdline: str = "",
             accel: str | None = None, results: Path | None = None) -> int:
    with _single(kernel_name, vcpus, memory_mib, cmdline, accel, results) as m:
        return int(m.host.interactive_shell() or 0)


def cleanup_stale(verbose: bool = False) -> list[str]:
    """Destroy guests (and their overlays) whose racelab process is gone."""
    from lab import vm as vmmod

    preflight_vm()
    vmmod.ensure_libvirtd("qemu:///system")
    removed = vmmod.reap_stale()
    if verbose:
        for name in removed:
            print(f"removed stale guest {name}")
        if not removed:
            print("nothing to clean up: no guest left by a dead racelab")
    return removed
