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
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import report
from lab.config import RunConfig
from lab.run import BadInput, InfraError, LostVM, log, require_root
from lab.scenario import Scenario, from_data
from lab.session import Outcome, Progress, finish, results_dir, rows_from_targets, _trace_opts
from lab.verdict import Row
from lab.workload import TargetResult, agent_spec, fetch_evidence, run_target, write_json

# What a kernel splat looks like on the console.  Stalls and lockups are reported
# too, but as notes: under TCG on a busy host they come from starved vCPUs (a
# fixed kernel printed "rcu_sched kthread starved" with two pinned guests on two
# host CPUs), so they are not evidence of a race on their own.
STALL = re.compile(r"rcu: INFO: rcu_\w+ (self-)?detected stall|RCU stall|soft lockup|"
                   r"INFO: task .* blocked for more than")
SPLAT = re.compile(
    r"(Oops:|BUG:|WARNING:|KASAN:|KCSAN:|UBSAN:|Kernel panic|general protection fault|"
    r"rcu: INFO: rcu_\w+ (self-)?detected stall|RCU stall|watchdog: BUG: soft lockup|"
    r"INFO: task .* blocked for more than|list_add corruption|list_del corruption)")


class SplatWatcher:
    """Follows a console log; every splat becomes a kernel-splat violation."""

    def __init__(self, path: Path, on_splat: Callable[[str], None], interval: float = 0.5) -> None:
        self.path = path
        self.on_splat = on_splat
        self.splats: list[str] = []
        self._pos = 0
        self._buf = ""
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._interval = interval

    def __enter__(self) -> SplatWatcher:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except OSError:
            return
        self._buf += data
        lines = self._buf.split("\n")
        self._buf = lines.pop()
        for i, line in enumerate(lines):
            if SPLAT.search(line):
                text = "\n".join(lines[i:i + 12])
                self.splats.append(text)
                self.on_splat(text)


def splat_kind(text: str) -> str:
    """"stall" (noted, not a violation) or "kernel-splat" (a violation)."""
    first = text.split("\n", 1)[0]
    return "stall" if STALL.search(first) else "kernel-splat"


@dataclass
class KernelRun:
    name: str                 # what the user typed
    artifact: Any             # lab.kernel.KernelArtifact
    targets: list[TargetResult] = field(default_factory=list)
    wall: float = 0.0
    accel: str = ""
    accel_reason: str = ""
    boot_seconds: list[float] = field(default_factory=list)


def preflight_vm() -> None:
    require_root("the vm backend (libvirt qemu:///system, guest images)")


def resolve_kernels(names: list[str]) -> list[Any]:
    """Resolve every kernel name first and report all unknown ones at once."""
    from lab import kernel

    specs, problems = [], []
    for n in names:
        try:
            specs.append(kernel.resolve(n))
        except BadInput as e:
            problems.append(str(e))
    if problems:
        raise BadInput("bad kernel(s):\n  " + "\n  ".join(problems))
    return specs


def build_kernels(names: list[str], progress: bool = True) -> list[Any]:
    from lab import kernel

    specs = resolve_kernels(names)
    arts = []
    for name, spec in zip(names, specs):
        log.info("kernel %s: building or fetching (cached under %s)", name, "~/.cache/racelab/kernels")
        arts.append(kernel.ensure(spec, progress=progress))
    return arts


@contextmanager
def booted(artifact: Any, image: Any, n: int, *, label: str, s: Scenario, out: Path,
           uris: tuple[str, ...], accel: str | None = None) -> Iterator[list[Any]]:
    """Boot n guests in parallel; all are destroyed on every exit path."""
    from lab import vm as vmmod

    vmcfg = s["vm"]
    run_id = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
    with ExitStack() as stack:
        vms: list[Any] = [None] * n
        errors: list[BaseException] = []
        lock = threading.Lock()

        def boot(i: int) -> None:
            name = f"racelab-{run_id}-{_slug(label)}-{i}"
            try:
                m = vmmod.VM(artifact, image, name=name, vcpus=vmcfg["vcpus"],
                             memory_mib=vmcfg["memory_mib"], cmdline=vmcfg["cmdline"],
                             pin=list(range(vmcfg["vcpus"])) if vmcfg["pin"] else None,
                             results_dir=out / "vms" / f"{_slug(label)}-{i}",
                             uri=uris[i % len(uris)], accel=accel)
                entered = m.__enter__()
            except BaseException as e:  # noqa: BLE001 - reported below, after the others boot
                with lock:
                    errors.append(e)
                return
            with lock:
                vms[i] = entered
                stack.push(m.__exit__)

        workers = [Worker(boot, i).start() for i in range(n)]
        _join_all(workers)   # every boot finishes (and registers its teardown) before we unwind
        if errors:
            e = errors[0]
            if isinstance(e, (InfraError, BadInput, KeyboardInterrupt)):
                raise e
            raise LostVM(f"{label}: guest failed to boot: {e}") from e
        yield vms


class Worker:
    """A thread whose end is an Event: Thread.join() interrupted by Ctrl-C can
    mark a live thread as stopped on Python 3.11 (bpo-45274), Event.wait() cannot."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.done = threading.Event()

        def body() -> None:
            try:
                target(*args)
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]


def run_on_vm(m: Any, kname: str, i: int, spec: Any, out: Path, prog: Progress,
              events_lock: threading.Lock, events_file: Any,
              cancel: threading.Event | None = None) -> TargetResult:
    label = f"{kname}/vm-{i}"
    splat_events: list[str] = []

    def on_splat(text: str) -> None:
        splat_events.append(text)
        if splat_kind(text) == "kernel-splat":
            prog.on_event(label, {"type": "violation", "kind": "kernel-splat"})

    def on_event(lbl: str, ev: dict[str, Any]) -> None:
        prog.on_event(lbl, ev)

    class _Sink:
        def write(self, s: str) -> None:
            with events_lock:
                events_file.write(s)

    with SplatWatcher(Path(m.console_path), on_splat):
        alive = m.alive if cancel is None else (lambda: not cancel.is_set() and m.alive())
        res = run_target(m.host, spec, label=label, kernel=kname, on_event=on_event,
                         events_file=_Sink(), alive=alive)
    if cancel is not None and cancel.is_set():
        res.infra_error = "interrupted"
        return res
    for text in splat_events:
        if splat_kind(text) == "stall":
            res.notes.append("guest stall, not counted as a violation (starved vCPUs under TCG?): "
                             + text.split("\n", 1)[0].strip())
            continue
        res.by_kind["kernel-splat"] = res.by_kind.get("kernel-splat", 0) + 1
        res.violations.append({"type": "violation", "kind": "kernel-splat", "text": text,
                               "target": label})
    ev_dir = out / "evidence"
    ev_dir.mkdir(parents=True, exist_ok=True)
    if crashed_of_splat(res, splat_events, traced=bool(spec.trace)):
        return res
    if res.infra_error is None:
        try:
            fetch_evidence(m.host, res, out)
            dmesg = m.host.cmd(["dmesg"], check=False, timeout=60)
            (ev_dir / f"{_slug(label)}.dmesg").write_text(dmesg.stdout)
        except InfraError as e:
            res.infra_error = f"evidence lost: {e.message}"
    res.evidence.setdefault("console", str(m.console_path))
    return res


def crashed_of_splat(res: TargetResult, splat_events: list[str], traced: bool) -> bool:
    """A guest lost right after a kernel splat died of the kernel under test.

    That is the race's outcome (the reverted generic receive oopses in
    __xsk_rcv_zc), not a lost host: the target keeps its packets and its
    kernel-splat violation, and the row says REPRODUCED.  Its trace and dmesg
    died with it; the console log (in the evidence) holds the splat.
    """
    if res.infra_error is None or not any(splat_kind(t) == "kernel-splat" for t in splat_events):
        return False
    res.notes.append(f"guest crashed after a kernel splat (the stream ended with "
                     f"{res.infra_error.split(':', 1)[0]}); see the console log")
    res.infra_error = None
    res.reason = "guest-crashed"
    if not res.load_seconds and res.timeline:
        res.load_seconds = res.timeline[-1][0]
    if traced and not res.evidence.get("available"):
        res.evidence = {**res.evidence, "available": False,
                        "note": "guest crashed: its flight recorder died with it"}
    return True


def run_fleets(cfg: RunConfig, s: Scenario, kernel_names: list[str], artifacts: list[Any],
               image: Any, out: Path, prog: Progress) -> list[KernelRun]:
    """Boot every kernel's fleet at once and run the scenario in every guest."""
    from lab import dataplane  # noqa: F401 - binaries are in the image already

    trace = _trace_opts(cfg, s)
    runs = [KernelRun(n, a) for n, a in zip(kernel_names, artifacts)]
    events_lock = threading.Lock()
    cancel = threading.Event()
    with open(out / "events.jsonl", "a") as events_file:

        def one_kernel(kr: KernelRun) -> None:
            t0 = time.monotonic()
            try:
                with booted(kr.artifact, image, cfg.vms, label=kr.name, s=s, out=out,
                            uris=cfg.uris) as vms:
                    kr.accel = getattr(vms[0], "accel", "")
                    kr.accel_reason = getattr(vms[0], "accel_reason", "")
                    kr.boot_seconds = [float(getattr(v, "boot_seconds", 0.0)) for v in vms]
                    log.info("%s: %d guest(s) up (accelerator: %s%s)", kr.name, len(vms), kr.accel,
                             f" - {kr.accel_reason}" if kr.accel_reason else "")
                    spec = agent_spec(s, duration=cfg.duration, seed=cfg.seed, bin_dir="/opt/racelab/bin",
                                      stop_on_first=cfg.stop_on_first, inject=cfg.inject or "",
                                      trace=trace, stop_grace=cfg.stop_grace)
                    with ThreadPoolExecutor(len(vms)) as ex:
                        futs = [ex.submit(run_on_vm, m, kr.name, i, spec, out, prog, events_lock,
                                          events_file, cancel) for i, m in enumerate(vms)]
                        kr.targets = [f.result() for f in futs]
            except InfraError as e:
                kr.targets = [TargetResult(label=f"{kr.name}/fleet", kernel=kr.name,
                                           infra_error=f"{type(e).__name__}: {e.message}")]
            kr.wall = time.monotonic() - t0

        workers = [Worker(one_kernel, kr).start() for kr in runs]
        def stop_all() -> None:
            # Ctrl-C: stop every agent; each fleet then tears itself down
            log.info("interrupted: stopping agents and destroying guests")
            cancel.set()
        _join_all(workers, stop_all)
    return runs


def run_vm(cfg: RunConfig, progress: bool = True, title: str | None = None,
           expected: dict[str, str] | None = None) -> Outcome:
    from lab import image as imagemod

    s = from_data(cfg.scenario_data, path=f"{cfg.scenario}.toml")
    if not cfg.kernels:
        raise BadInput("--backend vm needs at least one --kernel",
                       hint=f"e.g. --kernel {s['kernels']['affected']} --kernel {s['kernels']['fixed']}")
    preflight_vm()
    cleanup_stale()                        # guests left by a racelab that was SIGKILLed
    names = list(cfg.kernels)
    resolve_kernels(names)                 # every bad name before any build
    artifacts = build_kernels(names, progress=progress)
    img = imagemod.ensure_image(progress=progress)
    out = results_dir(cfg)
    (out / "config.json").write_text(cfg.to_json())
    prog = Progress(progress)
    try:
        runs = run_fleets(cfg, s, names, artifacts, img, out, prog)
    finally:
        prog.close()
    rows: list[Row] = []
    targets: list[TargetResult] = []
    kmeta = {}
    for kr in runs:
        rows.append(rows_from_targets(kr.name, kr.targets, kr.wall, s["run"]["confidence"], vms=cfg.vms))
        targets += kr.targets
        a = kr.artifact
        kmeta[kr.name] = {"key": getattr(a, "key", ""), "version": getattr(a, "version", ""),
                          "config": str(getattr(a, "config", "")), "source": getattr(a, "source", ""),
                          "patches": list(getattr(a, "patches", []) or []),
                          "affected": list(getattr(a, "affected", []) or []),
                          "accelerator": kr.accel, "accelerator_reason": kr.accel_reason,
                          "boot_seconds": kr.boot_seconds}
    meta = report.provenance(cfg, {"kernels": kmeta, "image": {"key": img.key, "path": str(img.path)},
                                   "expected": expected or {}})
    write_json(out / "provenance.json", meta)
    return finish(cfg, s, rows, targets, out, meta, title=title, expected=expected)


# --- single guests, for `racelab vm run|shell` ---------------------------------

@contextmanager
def _single(kernel_name: str, vcpus: int, memory_mib: int) -> Iterator[Any]:
    from lab import image as imagemod
    from lab import vm as vmmod

    preflight_vm()
    (art,) = build_kernels([kernel_name])
    img = imagemod.ensure_image()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"racelab-vm-{os.getpid()}"
    with vmmod.VM(art, img, name=f"racelab-{os.getpid()}-single-0", vcpus=vcpus,
                  memory_mib=memory_mib, cmdline="", pin=None, results_dir=out) as m:
        log.info("guest up in %.1fs (accelerator: %s); console: %s", m.boot_seconds, m.accel,
                 m.console_path)
        yield m


def vm_run(kernel_name: str, argv: list[str], vcpus: int = 2, memory_mib: int = 1024) -> int:
    """`racelab vm run K -- CMD`: CMD's output streams as the guest prints it; its exit status is ours."""
    from lab.remote import shell_or_command

    with _single(kernel_name, vcpus, memory_mib) as m:
        return shell_or_command(m.host, argv)


def vm_shell(kernel_name: str, vcpus: int = 2, memory_mib: int = 1024) -> int:
    with _single(kernel_name, vcpus, memory_mib) as m:
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
