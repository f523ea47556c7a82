# PYTHON_ARGCOMPLETE_OK   (argcomplete's global completion looks for this marker)
"""racelab: does this race reproduce on this kernel?

Exit codes: 0 the run completed (and matched --expect if given); 1 the
verdict contradicts --expect; 2 bad input; 3 infrastructure failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lab import scenario as scen
from lab.config import Backend, RunConfig, parse_duration, parse_overrides
from lab.verdict import Expect
from lab.run import (EXIT_BAD_INPUT, EXIT_INFRA, EXIT_MISMATCH, EXIT_OK, BadInput, RacelabError,
                     setup_logging)

if TYPE_CHECKING:
    from lab.session import Outcome
    from lab.verdict import Row


def _common_run_args(p: argparse.ArgumentParser, *, budget: bool = False, rerun: bool = False) -> None:
    if rerun:
        _complete(p.add_argument("scenario", nargs="?", help="scenario name (scenarios/NAME.toml) or a .toml path"),
                  _complete_scenario)
        _complete(p.add_argument("--from", dest="from_dir", metavar="DIR", default=None,
                                 help="run again exactly what results directory DIR ran (its config.json: "
                                      "scenario as it was, kernels, seed, duration); only --out, --json and --tap "
                                      "may go with it"), _complete_dirs)
    else:
        _complete(p.add_argument("scenario", help="scenario name (scenarios/NAME.toml) or a .toml path"),
                  _complete_scenario)
    p.add_argument("--backend", choices=[b.value for b in Backend], default=None,
                   help="netns: this machine's kernel in namespaces; vm: guests on chosen kernels")
    _complete(p.add_argument("--kernel", action="append", default=[], metavar="K",
                             help="kernel to test (repeatable): catalog name, NAME+patch+fragment, deb:, git:, "
                                  "tarball:, bzimage:"), _complete_kernel)
    p.add_argument("--vms", type=int, default=None, help="guests per kernel (vm backend)")
    if budget:
        p.add_argument("--budget", default=None, help="time budget per kernel, e.g. 60s, 10m")
    else:
        p.add_argument("--duration", default=None, help="load time, e.g. 30s, 2m (default: scenario's)")
    p.add_argument("--stop-on-first", action="store_true", help="stop a target at its first violation")
    p.add_argument("--expect", choices=[e.value for e in Expect],   # values: argparse's messages show repr()
                   help="the level to judge, exit 1 if the verdict falls short: reproduced (corruption), "
                        "window (at least the race window traced), clean (neither)")
    _complete(p.add_argument("--out", default="", help="results directory (default: results/SCENARIO-TIME-PID)"),
              _complete_dirs)
    p.add_argument("--json", action="store_true", help="print summary.json to stdout")
    p.add_argument("--tap", metavar="FILE", default=None,
                   help="also write a TAP 13 stream to FILE: a test point per kernel's row, judged as the "
                        "exit code judges it, with a YAML block (verdict, packets, violations by kind)")
    p.add_argument("--seed", type=int, default=None, help="seed for names and payloads (default: random)")
    _complete(p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a scenario knob (repeatable), e.g. --set load.senders=4"),
              _complete_set)
    _complete(p.add_argument("--variant", default=None, metavar="NAME",
                             help="a named variant of the scenario ([variants.NAME] in its file), e.g. iperf3"),
              _complete_variant)
    p.add_argument("--mitigation", choices=scen.MITIGATIONS, help="apply a workaround to the scenario")
    p.add_argument("--evidence", action="append", default=[], choices=("trace", "none"),
                   help="collect kernel-side evidence (ftrace kprobes); the default for a scenario whose "
                        "corruption is rare (evidence.corruption_rare); none: not even then")
    _complete(p.add_argument("--inject", default=None, metavar="KIND",
                             help="fault class the checker commits on purpose (see racelab selftest)"),
              _complete_inject)
    p.add_argument("--uri", action="append", default=[], help="libvirt URI(s) hosting the fleet (repeatable)")


def build_config(a: argparse.Namespace, *, default_backend: Backend, duration: float | None = None
                 ) -> RunConfig:
    overrides = parse_overrides(a.set)
    s = scen.load(a.scenario, overrides, variant=getattr(a, "variant", None))
    s = scen.apply_mitigation(s, a.mitigation)
    dur = duration if duration is not None else (
        parse_duration(a.duration, "--duration") if getattr(a, "duration", None) else s.duration())
    vms = a.vms if a.vms is not None else 1
    if vms < 1:
        raise BadInput(f"--vms must be >= 1, got {vms}")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return RunConfig(
        scenario=s.name, scenario_data=s.data, backend=Backend(a.backend or default_backend),
        kernels=tuple(a.kernel), duration=dur, vms=vms, seed=seed,
        stop_on_first=a.stop_on_first, expect=a.expect, inject=a.inject,
        mitigation=a.mitigation, variant=getattr(a, "variant", None), evidence=_evidence(a.evidence, s),
        out=a.out or default_out(s.name),
        overrides=tuple(a.set), uris=tuple(a.uri) or ("qemu:///system",))


def default_out(scenario: str) -> str:
    """results/SCENARIO-TIME-PID, chosen when the run starts so it can be printed then."""
    import time
    return f"results/{scenario}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _say_results(cfg: RunConfig) -> None:
    """The results directory before anything runs: its files can be followed during the run
    (events.jsonl, the guests' consoles).  On stderr, so that --json keeps stdout clean."""
    from lab.run import log
    follow = "events.jsonl" + (", vms/*/*.console.log" if cfg.backend == Backend.VM else "")
    log.info("results: %s  (follow %s while it runs)", Path(cfg.out).absolute(), follow)


def _evidence(asked: list[str], s: scen.Scenario) -> tuple[str, ...]:
    """--evidence as given; none given, a rare-corruption scenario traces its window, since
    without it a vulnerable kernel would read like a fixed one."""
    if "none" in asked:
        if len(set(asked)) > 1:
            raise BadInput("--evidence none with other --evidence kinds", hint="give one or the other")
        return ()
    if not asked and s["evidence"].get("corruption_rare"):
        return ("trace",)
    return tuple(asked)


def _exit_for(outcome: Outcome, expect: str | None) -> int:
    from lab.verdict import INCONCLUSIVE, matches

    if any(r.verdict == INCONCLUSIVE for r in outcome.rows):
        return EXIT_INFRA
    if expect and not all(matches(r, expect) for r in outcome.rows):
        return EXIT_MISMATCH
    return EXIT_OK


def config_from_results(a: argparse.Namespace) -> RunConfig:
    """`run --from DIR`: DIR's config.json, with a new results directory.  The scenario is
    the one recorded there (its data, not today's file), and so are kernels and seed."""
    given = [f"--{n.replace('_', '-')}" for n in ("backend", "duration", "vms", "seed", "expect", "variant",
                                                   "mitigation", "inject") if getattr(a, n, None) is not None]
    given += [f"--{n}" for n in ("kernel", "set", "evidence", "uri") if getattr(a, n, None)]
    given += ["--stop-on-first"] * bool(a.stop_on_first) + ["SCENARIO"] * bool(a.scenario)
    if given:
        raise BadInput(f"--from takes the whole configuration from {a.from_dir}, not {', '.join(given)}",
                       hint="give only --out or --json with --from, or start a new run without --from")
    path = Path(a.from_dir) / "config.json"
    try:
        cfg = RunConfig.from_json(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} does not exist", hint="--from wants a results directory that racelab run "
                                                     "or repro wrote (it holds config.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not a racelab run configuration: {e}") from None
    if cfg.stop_grace < 0:
        # a repro's guests held their load for its control (lab.repro.ControlStop), which a
        # plain run does not have: they stop a few seconds after the first violation instead
        from lab.repro import AFFECTED_GRACE_S
        cfg = dataclasses.replace(cfg, stop_grace=AFFECTED_GRACE_S)
    return dataclasses.replace(cfg, out=a.out or default_out(cfg.scenario))


def cmd_run(a: argparse.Namespace) -> int:
    from lab import session

    if a.from_dir:
        cfg = config_from_results(a)
    elif not a.scenario:
        raise BadInput("racelab run needs a scenario (or --from DIR)", hint="racelab scenario list shows them")
    else:
        cfg = build_config(a, default_backend=Backend.NETNS)
    if cfg.inject:
        from lab.agent import dataplane
        if cfg.inject not in dataplane.INJECT_KINDS:
            raise BadInput(f"unknown --inject {cfg.inject!r}", hint=f"one of: {', '.join(dataplane.INJECT_KINDS)}")
    if cfg.backend == Backend.NETNS and cfg.kernels:
        raise BadInput("--kernel needs --backend vm", hint="the netns backend tests this machine's kernel")
    _say_results(cfg)
    try:
        if cfg.backend == Backend.NETNS:
            outcome = session.run_netns(cfg, progress=not a.json)
        else:
            from lab import fleet
            outcome = fleet.run_vm(cfg, progress=not a.json)
    except session.Interrupted as e:
        if e.outcome is not None:   # the evidence so far: table and summary.json, then exit 130
            _report(e.outcome, cfg, a.json, a.tap)
        raise
    return _report(outcome, cfg, a.json, a.tap)


def _write_tap(path: str | None, outcome: Outcome, cfg: RunConfig, levels: dict[str, str | None]) -> None:
    if path:
        from lab import export
        from lab.run import log
        log.info("TAP: %s", export.write_tap(Path(path), export.row_points(outcome.rows, cfg.scenario, levels)))


def _report(outcome: Outcome, cfg: RunConfig, as_json: bool, tap: str | None = None) -> int:
    _write_tap(tap, outcome, cfg, {r.kernel: cfg.expect for r in outcome.rows})
    if _show(outcome, as_json, f"racelab {cfg.scenario} ({cfg.backend}), seed {cfg.seed}"):
        print(f"results: {outcome.out}  (summary.json, events.jsonl, junit.xml, report.html)")
    return _exit_for(outcome, cfg.expect)


def _show(outcome: Outcome, as_json: bool, title: str) -> bool:
    """summary.json on stdout (--json), else the verdict table, the interleavings and the
    amplifiers.  True when the table was shown (the caller's own lines follow it)."""
    from lab import report

    if as_json:
        print((outcome.out / "summary.json").read_text())
        return False
    report.print_table(outcome.rows, title)
    report.print_interleavings(outcome.targets)
    _print_amplifiers(outcome.rows)
    return True


def _print_amplifiers(rows: Sequence[Row]) -> None:
    """Say how each kernel's race window was widened: an amplified rate is not the natural one."""
    for r in rows:
        amp = r.extra.get("amplifier")
        if amp and amp.get("method") == "off" and amp.get("why") not in ("asked for",
                                                                        "the scenario widens no window"):
            print(f"{r.kernel}: race window NOT amplified: {amp['why']}")
        if not amp or amp.get("method") == "off":
            for knob, applied in r.extra.get("knobs_applied", {}).items():
                if not applied:
                    print(f"{r.kernel}: {knob} NOT applied: this kernel has no such knob, it ran unamplified")
            continue
        if amp["method"] == "patch":
            what = f"widen-rx.patch busy-wait {amp['widen_rx_ns']} ns"
        else:
            what = (f"{amp['method']} at {', '.join(amp['probes'])}"
                    + (f", {amp['delay_ns']} ns BPF busy-wait" if amp["method"] == "kprobe-delay" else "")
                    + f"; fired {amp.get('hits', 0):,} times")
            if amp.get("holds"):
                what += (f"; held {amp.get('hold_ns', 0)} ns at {', '.join(amp['holds'])} "
                         f"{amp.get('hold_hits', 0):,} times")
            if amp.get("waited_ns_avg"):
                what += f" (waited {amp['waited_ns_avg']:.0f} ns on average)"
        print(f"{r.kernel}: race window amplified: {what}  (--set amplifier.method=off for the natural rate)")
        if amp.get("warning"):
            print(f"{r.kernel}: WARNING: {amp['warning']}")


def cmd_repro(a: argparse.Namespace) -> int:
    from lab import repro

    if a.budget and a.duration:
        raise BadInput("--budget and --duration both given",
                       hint="--budget caps each kernel's load (a clean control may stop sooner, once its "
                            "evidence suffices); --duration runs a clean control for exactly that long")
    budget = parse_duration(a.budget, "--budget") if a.budget else None
    cfg = build_config(a, default_backend=Backend.VM, duration=budget)
    _say_results(cfg)
    from lab.session import Interrupted
    try:
        outcome = repro.run_repro(cfg, budget_given=budget is not None, progress=not a.json,
                                  fixed_duration=bool(a.duration))
    except Interrupted as e:
        if e.outcome is not None:
            _report_repro(e.outcome, cfg, a.json, a.tap)
        raise
    return _report_repro(outcome, cfg, a.json, a.tap)


def _report_repro(outcome: Outcome, cfg: RunConfig, as_json: bool, tap: str | None = None) -> int:
    from lab.verdict import INCONCLUSIVE

    # judged as the exit code below: --expect, else what the catalog expects of each kernel
    levels = outcome.meta.get("expected", {})
    _write_tap(tap, outcome, cfg, {r.kernel: cfg.expect or levels.get(r.kernel) for r in outcome.rows})
    if _show(outcome, as_json, f"racelab repro {cfg.scenario} ({cfg.backend}), seed {cfg.seed}"):
        for r in outcome.rows:
            stop = r.extra.get("control_stop") or {}
            if stop.get("text"):
                print(f"{r.kernel}: {stop['text']}")
        print(f"results: {outcome.out}  (summary.json, junit.xml, report.html, evidence/)")
    if any(r.verdict == INCONCLUSIVE for r in outcome.rows):
        return EXIT_INFRA
    expected = outcome.meta.get("expected", {})
    if cfg.expect:
        from lab.verdict import matches
        return EXIT_OK if all(matches(r, cfg.expect) for r in outcome.rows) else EXIT_MISMATCH
    # without --expect, a repro "matches" when each kernel did what the catalog says it should
    if expected and not all(report_ok(r, expected.get(r.kernel)) for r in outcome.rows):
        return EXIT_MISMATCH
    return EXIT_OK


def report_ok(row: Row, exp: str | None) -> bool:
    from lab.verdict import matches
    return exp is None or matches(row, exp)


def cmd_selftest(a: argparse.Namespace) -> int:
    from lab import selftest

    if a.jobs < 1:
        raise BadInput(f"--jobs must be >= 1, got {a.jobs}")
    return selftest.run_all(xdp_modes=a.xdp, kinds=a.kind, seconds=parse_duration(a.duration), as_json=a.json,
                         jobs=a.jobs)


def cmd_kernel(a: argparse.Namespace) -> int:
    from lab.kernels import kernel

    if a.kcmd == "list":
        kernel.cli_list(as_json=a.json)
    elif a.kcmd == "build":
        path = kernel.cli_build(a.spec, a.fragment, a.patch, a.vmlinux)
        print(path)
    elif a.kcmd == "show":
        kernel.cli_show(a.name, a.fragment, a.patch, as_json=a.json)
    elif a.kcmd == "gc":
        kernel.cli_gc(a.keep)
    return EXIT_OK


def cmd_cache(a: argparse.Namespace) -> int:
    from lab import cache

    if a.ccmd == "du":
        cache.cli_du()
    else:
        cache.cli_gc(a.keep, parse_duration(a.older_than, "--older-than"), a.dry_run)
    return EXIT_OK


def _cache_doc() -> str | None:
    from lab import cache
    return cache.__doc__


def cmd_scenario(a: argparse.Namespace) -> int:
    if a.scmd == "list":
        scen.cli_list()
    elif a.scmd == "show":
        scen.cli_show(a.name, parse_overrides(a.set), a.variant)
    elif a.scmd == "validate":
        return EXIT_BAD_INPUT if scen.cli_validate(a.files) else EXIT_OK
    elif a.scmd == "new":
        path = scen.cli_new(a.name, a.out)
        print(f"{path}: fill in [bug] and [kernels], then `racelab scenario validate {path}`")
    elif a.scmd == "schema":
        return scen.cli_schema(a.check)
    return EXIT_OK


def cmd_image(a: argparse.Namespace) -> int:
    from lab import image

    if a.icmd == "key":
        print(image.load_recipe().key())
    else:
        image.cli_build(as_json=a.json)
    return EXIT_OK


def cmd_vm(a: argparse.Namespace) -> int:
    from lab import fleet

    opts = {"vcpus": a.vcpus, "memory_mib": a.memory, "cmdline": a.cmdline, "accel": a.accel,
            "results": Path(a.results) if a.results else None}
    if a.vcmd == "run":
        argv = a.command
        if not argv:
            raise BadInput("racelab vm run KERNEL -- COMMAND...: no command given",
                           hint="for a shell in the guest: racelab vm shell KERNEL")
        return fleet.vm_run(a.kernel, argv, **opts)
    return fleet.vm_shell(a.kernel, **opts)


def cmd_dev(a: argparse.Namespace) -> int:
    """`racelab dev TOOL ...`: each tool's work is its module's; only the parsing is here."""
    if a.tool == "amplifier":
        from lab import amplifier
        return amplifier.cli_sites(a.kernel, a.kallsyms, a.objdump)
    if a.tool == "dataplane":
        from lab import dataplane
        print(dataplane.build(force=a.force))
    elif a.tool == "evidence":
        from lab import evidence
        if a.ecmd == "analyze":
            evidence.cli_analyze(a.trace)
        elif a.ecmd == "dump":
            evidence.dump(a.trace, a.around, a.count)
        else:
            evidence.cli_trim(a.trace, a.out, a.lo, a.hi)
    elif a.tool == "export":
        from lab import export
        export.cli_kcidb(a.file)
    elif a.tool == "remote":
        from lab import remote
        return remote.cli_run(a.port, a.command)
    elif a.tool == "results":
        from lab import results
        return results.cli_validate(a.file, a.kind)
    elif a.tool == "splat":
        from lab import splat
        splat.cli_list(a.log)
    return EXIT_OK


def cmd_cleanup(a: argparse.Namespace) -> int:
    from lab import fleet

    fleet.cleanup_stale(verbose=True)
    return EXIT_OK


def cmd_matrix(a: argparse.Namespace) -> int:
    from lab import matrix

    return matrix.main(matrix.MatrixArgs(
        kernels=a.kernels, scenarios=a.scenarios, budget=a.budget, vms=a.vms, missed=a.missed, out=a.out,
        jobs=a.jobs, uris=tuple(a.uri), as_json=a.json, tap=a.tap, kcidb=a.kcidb))


def cmd_bisect(a: argparse.Namespace) -> int:
    from lab import bisect

    return bisect.main(bisect.BisectArgs(
        tree=a.tree, good=a.good, bad=a.bad, scenario=a.scenario, find=a.find, vms=a.vms, out=a.out,
        calibrate_runs=a.calibrate_runs, calibrate_budget=a.calibrate_budget, min_step=a.min_step,
        signal=a.signal, resume=a.resume, as_json=a.json))


def cmd_bisect_step(a: argparse.Namespace) -> int:
    from lab import bisect

    try:
        return bisect.step_main(a.state)
    except RacelabError as e:  # a step that cannot decide is a skip, never a verdict
        print(f"racelab bisect-step: {e}", file=sys.stderr)
        return bisect.EXIT_SKIP


class _Version(argparse.Action):
    """--version: the package version and, in a git checkout, the commit (computed only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print racelab's version (and git commit) and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"racelab {version()}")
        parser.exit()


def version() -> str:
    from lab import __version__
    from lab.run import project_root, run

    root = project_root()
    if (root / ".git").exists():
        p = run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"], check=False)
        if p.returncode == 0 and p.stdout.strip():
            return f"{__version__} (git {p.stdout.strip()})"
    return __version__


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/-q after any subcommand too (`racelab kernel list -v`): every subparser takes them,
    with a SUPPRESS default so that one given before the subcommand is not reset."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                                help="debug logging (every external command); as before the subcommand")
                sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                help="warnings and errors only")
                _verbosity_everywhere(sp)


def _glue_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--duration -5s` -> `--duration=-5s`: argparse takes a value that starts with '-' and is
    not a plain number for an option, and says only "expected one argument"; glued, the value
    reaches its check, which names what is wrong with it."""
    takes_value: set[str] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sp in action.choices.values():
                    walk(sp)
            elif action.option_strings and action.nargs is None and action.const is None:
                takes_value.update(o for o in action.option_strings if o.startswith("--"))
    walk(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and re.match(r"^-[0-9.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        if argv[i] == "--":
            out += argv[i:]
            break
        out.append(argv[i])
        i += 1
    return out


# options checked before anything runs (STYLE.md point 4): every problem named at once
_DURATIONS = ("duration", "budget", "calibrate_budget", "min_step", "older_than")
_AT_LEAST = {"vms": 1, "jobs": 1, "calibrate_runs": 1, "keep": 0, "vcpus": 1, "memory": 64, "count": 0}
_RESULT_DIRS = ("run", "repro", "matrix", "bisect")   # where --out is a results directory


def validate_args(a: argparse.Namespace) -> None:
    from lab.run import writable_dir_problem

    problems = []
    for name in _DURATIONS:
        value = getattr(a, name, None)
        if value is not None:
            try:
                parse_duration(value, f"--{name.replace('_', '-')}")
            except BadInput as e:
                problems.append(str(e).replace("\n  hint:", ";"))
    for name, least in _AT_LEAST.items():
        value = getattr(a, name, None)
        if value is not None and value < least:
            problems.append(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    # probed as the user who will write there: these commands need root, and a user without
    # it hears that first (from the backend's own check), not about a directory
    if a.cmd in _RESULT_DIRS and os.geteuid() == 0:
        out = Path(a.out) if a.out else Path("results")
        why = writable_dir_problem(out)
        if why:
            problems.append(f"--out {out}: {why}" if a.out else f"the results directory {out.absolute()}: {why}")
        for flag in ("tap", "kcidb"):   # files written at the end: refused now, not after the run
            if getattr(a, flag, None):
                from lab.export import file_problem
                why = file_problem(Path(getattr(a, flag)))
                if why:
                    problems.append(f"--{flag} {getattr(a, flag)}: {why}")
    if a.cmd == "vm" and a.results:
        why = writable_dir_problem(Path(a.results))
        if why:
            problems.append(f"--results {a.results}: {why}")
    if problems:
        command = " ".join(n for n in (a.cmd, getattr(a, "tool", None)) if n)
        raise BadInput("bad option(s):\n  " + "\n  ".join(problems),
                       hint=f"fix the options named above; `racelab {command} --help` lists them")


# ---------------------------------------------------------------- shell completion
# argcomplete calls these on every TAB, in a process that exits right after: they read
# the catalog and scenarios/ (files of this checkout), never the cache, a network or a build.
# An option without one completes file names (argcomplete's default).

def _complete(action: argparse.Action, completer: object) -> argparse.Action:
    action.completer = completer  # type: ignore[attr-defined]  # argcomplete's hook
    return action


def _complete_kernel(prefix: str, **_: object) -> list[str]:
    from lab.kernels import kernel
    return kernel.spec_completions(prefix)


def _complete_scenario(prefix: str, **_: object) -> list[str]:
    if "/" in prefix or prefix.startswith((".", "~")):     # a path to a .toml
        return _complete_toml(prefix)
    return [n for n in scen.available() if n.startswith(prefix)]


def _comma_list(one: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """--kernels A,B,C<TAB>: complete the last name, keeping the ones before it."""
    def complete(prefix: str, **kw: object) -> list[str]:
        done, comma, last = prefix.rpartition(",")
        return [done + comma + c for c in one(last, **kw)]
    return complete


def _complete_variant(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    import tomllib
    try:
        name = str(getattr(parsed_args, "scenario", None) or getattr(parsed_args, "name", ""))
        raw = tomllib.loads(scen.find(name).read_text())
    except (BadInput, OSError, tomllib.TOMLDecodeError):
        return []
    return [v for v in sorted(raw.get("variants") or {}) if v.startswith(prefix)]


def _complete_set(prefix: str, **_: object) -> list[str]:
    return [f"{sec}.{f}=" for sec, fields in scen.SCHEMA.items() for f in fields if f"{sec}.{f}=".startswith(prefix)]


def _complete_inject(prefix: str, **_: object) -> list[str]:
    from lab.agent import dataplane
    return [k for k in dataplane.INJECT_KINDS if k.startswith(prefix)]


def _complete_dirs(prefix: str, **_: object) -> list[str]:
    from argcomplete.completers import DirectoriesCompleter
    return list(DirectoriesCompleter()(prefix))


def _complete_toml(prefix: str, **_: object) -> list[str]:
    from argcomplete.completers import FilesCompleter
    return list(FilesCompleter(("toml",))(prefix))


# ---------------------------------------------------------------- the parser

def _examples(*lines: str) -> str:
    """An epilog: real command lines, kept as written (RawDescriptionHelpFormatter)."""
    return "examples:\n" + "\n".join(f"  {x}" for x in lines)


_RAW = argparse.RawDescriptionHelpFormatter
HIDDEN_COMMANDS = ("bisect-step", "dev")     # internal: neither in --help nor offered on TAB

# the developer tools under `racelab dev` (each its module's: lab.splat, lab.evidence, ...)
DEV_TOOLS = ("amplifier", "dataplane", "evidence", "export", "remote", "results", "splat")

# `python -m MODULE ARGS` is `racelab *ENTRY_POINTS[MODULE] ARGS` (module_main): every command
# line is declared in this file once, with its help, examples, checks and exit codes
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "lab.kernels.kernel": ("kernel",),
    "lab.image": ("image",),
    "lab.vm": ("vm",),
    "lab.selftest": ("selftest",),
    **{f"lab.{tool}": ("dev", tool) for tool in DEV_TOOLS},
}


def module_main(module: str, argv: Sequence[str] | None = None) -> int:
    """A module's `main()`, its `python -m` entry point: the racelab command ENTRY_POINTS names."""
    return main([*ENTRY_POINTS[module], *(sys.argv[1:] if argv is None else argv)])

# what `racelab --help` ends with
_ROOT_EPILOG = _examples(
    "racelab repro generic-rx-race                  # affected vs fixed kernel, one verdict table",
    "racelab run veth-napi-race --backend netns --duration 30s",
    "racelab kernel list",
    "racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx --scenarios generic-rx-race",
    "racelab COMMAND --help                         # each command's options and examples",
) + '\n\nshell completion (bash, zsh): eval "$(register-python-argcomplete racelab)"'

_RUN_EPILOG = _examples(
    "racelab run generic-rx-race --backend netns --duration 30s      # this machine's kernel",
    "racelab run generic-rx-race --backend vm --kernel 6.1.192+revert-generic-rx --vms 2 --duration 2m",
    "racelab run veth-napi-race --backend vm --kernel 6.1.192 --variant iperf3 --expect clean",
    "racelab run generic-rx-race --set load.senders=4 --set xdp.mode=native --json > summary.json",
    "racelab run --from results/generic-rx-race-20250101-120000-4242   # the same run again",
)

_REPRO_EPILOG = _examples(
    "racelab repro generic-rx-race                  # the catalog's affected and fixed kernels",
    "racelab repro veth-napi-race --budget 10m --mitigation threaded-napi",
    "racelab repro veth-napi-race --kernel 6.1.192+revert-veth-napi --kernel 6.1.192",
    "racelab repro generic-rx-race --kernel 6.1.192+revert-generic-rx+~/fix.patch --expect clean",
)

_SELFTEST_EPILOG = _examples(
    "racelab selftest                               # every detector, generic and native XDP",
    "racelab selftest --xdp native --kind order --kind duplicate --duration 5s",
    "racelab selftest --jobs 1 --json > selftest.json",
)

_MATRIX_EPILOG = _examples(
    "racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx --scenarios generic-rx-race",
    "racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx,6.1.192+revert-veth-napi,deb:6.1.0-47-amd64 \\",
    "               --scenarios generic-rx-race,veth-napi-race --budget 5m -j 2",
    "racelab matrix --kernels 6.12.117,6.12.117+revert-veth-napi --scenarios veth-napi-race --missed skip",
    "racelab matrix --kernels 6.1.192,6.1.192+revert-shared-pool --scenarios shared-pool-rx-race --json > m.json",
)

_BISECT_EPILOG = _examples(
    "racelab bisect --tree ~/src/linux --good v6.1 --bad v6.2 --scenario veth-napi-race --find fix",
    "racelab bisect --tree ~/src/linux --good v6.1 --bad v6.2 --scenario veth-napi-race --find fix "
    "--signal corruption",
    "racelab bisect --tree ~/src/linux --good v6.1 --bad HEAD --scenario generic-rx-race --vms 2 "
    "--out results/bisect-gen",
    "racelab bisect --tree ~/src/linux --good v6.1 --bad HEAD --scenario generic-rx-race --resume "
    "--out results/bisect-gen",
)


def _kernel_commands(ks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`racelab kernel ...` (and `python -m lab.kernels.kernel ...`, which is the same)."""
    kl = ks.add_parser("list", help="named kernels in kernels/catalog.toml and what is cached",
                       formatter_class=_RAW, epilog=_examples(
                           "racelab kernel list",
                           "racelab kernel list --json | jq -r '.kernels[] | select(.cached) | .name'"))
    kl.add_argument("--json", action="store_true", help="one JSON document on stdout (schema_version 1)")
    b = ks.add_parser("build", help="build or fetch a kernel; prints the bzImage path", formatter_class=_RAW,
                      epilog=_examples(
                          "racelab kernel build 6.1.192+revert-generic-rx",
                          "racelab kernel build 6.1.192 --fragment kasan --patch ~/fix.patch",
                          "racelab kernel build deb:6.1.0-47-amd64            # Debian's binary kernel",
                          "racelab kernel build git:/path/to/linux@v6.1 --vmlinux"))
    _complete(b.add_argument("spec", help="catalog name, NAME+patch+fragment, debsrc:, deb:, git:/repo@REF, "
                                          "tarball:, bzimage:"), _complete_kernel)
    b.add_argument("--fragment", action="append", default=[], metavar="FRAGMENT",
                   help="extra config fragment (repeatable): a path, or a name in kernels/config")
    b.add_argument("--patch", action="append", default=[], metavar="PATCH",
                   help="extra patch (repeatable): a path, or a catalog patch name")
    b.add_argument("--vmlinux", action="store_true", help="keep vmlinux too (for gdb, objdump, crash)")
    s = ks.add_parser("show", help="source, patches, config hash, cache key, build log", formatter_class=_RAW,
                      epilog=_examples(
                          "racelab kernel show 6.1.192+revert-generic-rx",
                          "racelab kernel show 6.1.192 --fragment kcsan --json"))
    _complete(s.add_argument("name", help="a kernel spec, as for build"), _complete_kernel)
    s.add_argument("--fragment", action="append", default=[], metavar="FRAGMENT",
                   help="extra config fragment, as for build")
    s.add_argument("--patch", action="append", default=[], metavar="PATCH", help="extra patch, as for build")
    s.add_argument("--json", action="store_true", help="one JSON document on stdout (schema_version 1)")
    g = ks.add_parser("gc", help="drop cached kernels, keeping the most recently used", formatter_class=_RAW,
                      epilog=_examples("racelab kernel gc --keep 3",
                                       "racelab cache gc --dry-run        # the whole cache, not only kernels"))
    g.add_argument("--keep", type=int, default=5, help="kernels kept, most recently used first (default 5)")


def _dev_commands(ds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`racelab dev TOOL ...`, the same as `python -m lab.TOOL ...` (DEV_TOOLS, ENTRY_POINTS)."""
    a = ds.add_parser("amplifier", help="where the race-window amplifier's probe goes in a kernel (exit 1: nowhere)",
                      formatter_class=_RAW, epilog=_examples(
                          "racelab dev amplifier 6.1.192",
                          "racelab dev amplifier deb:6.1.0-47-amd64 --kallsyms kallsyms.txt --objdump sites.txt"))
    _complete(a.add_argument("kernel", help="a kernel name or spec, as for --kernel (built if needed)"),
              _complete_kernel)
    a.add_argument("--kallsyms", type=Path, metavar="FILE",
                   help="a booted guest's /proc/kallsyms, for a kernel without a System.map "
                        "(racelab vm run K -- cat /proc/kallsyms)")
    a.add_argument("--objdump", type=Path, metavar="FILE",
                   help="also write the candidates' disassembly here (the form of tests/fixtures/amplifier/)")
    d = ds.add_parser("dataplane", help="the C data plane (csrc/): build", formatter_class=_RAW,
                      epilog=_examples("racelab dev dataplane build          # prints the binary directory"))
    b = d.add_subparsers(dest="dcmd", required=True).add_parser(
        "build", help="build the C binaries (csrc/, racelab-init too); print their directory", formatter_class=_RAW,
        epilog=_examples("racelab dev dataplane build", "racelab dev dataplane build --force"))
    b.add_argument("--force", action="store_true", help="rebuild even if the cached build is complete")
    e = ds.add_parser("evidence", help="a saved kernel trace: analyze, dump, trim", formatter_class=_RAW,
                      epilog=_examples("racelab dev evidence analyze results/DIR/evidence/K/vm-0.trace"))
    es = e.add_subparsers(dest="ecmd", required=True)
    t = es.add_parser("analyze", help="print the interleaving analysis of a trace as JSON", formatter_class=_RAW,
                      epilog=_examples("racelab dev evidence analyze vm-0.trace | jq .window_hits"))
    t.add_argument("trace", type=Path, help="a raw or text trace (evidence/ of a results directory)")
    t = es.add_parser("dump", help="print a trace as text", formatter_class=_RAW,
                      epilog=_examples("racelab dev evidence dump vm-0.trace --around 37919 --count 50"))
    t.add_argument("trace", type=Path, help="a raw or text trace")
    t.add_argument("--around", type=int, help="counter value to centre on (e.g. first_hit_ts)")
    t.add_argument("--count", type=int, default=200, help="events before and after --around (default 200)")
    t = es.add_parser("trim", help="keep the pages of a raw trace around [FROM, TO]", formatter_class=_RAW,
                      epilog=_examples("racelab dev evidence trim vm-0.trace cut.trace 37900 37940"))
    t.add_argument("trace", type=Path, help="a raw trace")
    t.add_argument("out", type=Path, help="where the trimmed trace goes")
    t.add_argument("lo", type=int, metavar="FROM", help="first counter value kept")
    t.add_argument("hi", type=int, metavar="TO", help="last counter value kept")
    x = ds.add_parser("export", help="results in other formats: kcidb", formatter_class=_RAW,
                      epilog=_examples("racelab dev export kcidb results/matrix-DIR/matrix.json > kcidb.json"))
    k = x.add_subparsers(dest="xcmd", required=True).add_parser(
        "kcidb", help="print a matrix.json as a KCIDB v4 document", formatter_class=_RAW,
        epilog=_examples("racelab dev export kcidb results/matrix-DIR/matrix.json"))
    k.add_argument("file", type=Path, help="a matrix.json that `racelab matrix` wrote")
    r = ds.add_parser("remote", help="run a command in a running guest, by its SSH port", formatter_class=_RAW,
                      epilog=_examples("racelab dev remote 40022 -- uname -r",
                                       "racelab dev remote 40022                 # a shell"))
    r.add_argument("port", type=int, help="the guest's SSH port forward on 127.0.0.1 (its console log says it)")
    r.add_argument("command", nargs="*", help="the command, after -- (default: a shell)")
    v = ds.add_parser("results", help="results documents: validate", formatter_class=_RAW,
                      epilog=_examples("racelab dev results validate results/DIR/summary.json"))
    val = v.add_subparsers(dest="rcmd", required=True).add_parser(
        "validate", help="check a summary.json, matrix.json or bisect.json against its schema (exit 1 if not)",
        formatter_class=_RAW, epilog=_examples("racelab dev results validate results/DIR/summary.json",
                                               "racelab dev results validate renamed.json --kind matrix"))
    val.add_argument("file", type=Path, help="the document")
    # lab.results' VERSIONS (a test keeps them equal)
    val.add_argument("--kind", choices=("bisect", "matrix", "summary"),
                     help="which schema to check against (default: from the file's name, else its keys)")
    s = ds.add_parser("splat", help="the kernel splats in a saved console log", formatter_class=_RAW,
                      epilog=_examples("racelab dev splat results/DIR/vms/K/vm-0.console.log"))
    s.add_argument("log", type=Path, help="a console log or kmsg dump")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="racelab", description=__doc__, formatter_class=_RAW, epilog=_ROOT_EPILOG)
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="debug logging (every external command); -vv adds paramiko's")
    ap.add_argument("-q", "--quiet", action="store_true", default=False, help="warnings and errors only")
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run a scenario (netns: this kernel; vm: guests on chosen kernels)",
                       formatter_class=_RAW, epilog=_RUN_EPILOG)
    _common_run_args(p, rerun=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("repro", help="one-command repro of a named bug: affected vs fixed kernels",
                       formatter_class=_RAW, epilog=_REPRO_EPILOG)
    _common_run_args(p, budget=True)
    p.add_argument("--duration", default=None,
                   help="load time of a clean control, run in full (default: it stops once its evidence "
                        "suffices, see run.control_miss, within the budget)")
    p.set_defaults(func=cmd_repro)

    p = sub.add_parser("selftest", help="prove every detector fires (fault injection) on this kernel",
                       formatter_class=_RAW, epilog=_SELFTEST_EPILOG)
    p.add_argument("--xdp", action="append", choices=("generic", "native"), default=None,
                   help="XDP mode to test (repeatable; default: both)")
    _complete(p.add_argument("--kind", action="append", default=None,
                             help="only these detector kinds (repeatable; default: all), e.g. order, poison"),
              _complete_inject)
    p.add_argument("--duration", default="3s",
                   help="traffic of each clean control (an injection case ends at its violation, "
                        "within this long)")
    p.add_argument("--jobs", type=int, default=4, help="cases run side by side (default 4)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("kernel", help="kernels: list, build, show, gc", formatter_class=_RAW,
                       epilog=_examples("racelab kernel list",
                                        "racelab kernel build 6.1.192+revert-veth-napi",
                                        "racelab kernel show 6.12.117 --json",
                                        "racelab kernel gc --keep 3"))
    _kernel_commands(p.add_subparsers(dest="kcmd", required=True))
    p.set_defaults(func=cmd_kernel)

    p = sub.add_parser("cache", help="the cache: what takes the space (du), and its clean-up (gc)",
                       description=_cache_doc(), formatter_class=_RAW,
                       epilog=_examples("racelab cache du", "racelab cache gc --older-than 14d --dry-run"))
    cs = p.add_subparsers(dest="ccmd", required=True)
    cs.add_parser("du", help="size of each area: kernels, build trees, ccache, downloads, images, ...",
                  formatter_class=_RAW, epilog=_examples("racelab cache du"))
    g = cs.add_parser("gc", help="remove what is old or dead in every area (see racelab cache --help)",
                      formatter_class=_RAW, epilog=_examples(
                          "racelab cache gc --dry-run                     # say first",
                          "racelab cache gc --keep 2 --older-than 3d"))
    g.add_argument("--keep", type=int, default=5, help="kernels kept, most recently used first (default 5)")
    g.add_argument("--older-than", default="14d", help="age of last use beyond which an entry goes (default 14d)")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("scenario", help="scenarios: list, show, validate, new, schema", formatter_class=_RAW,
                       epilog=_examples("racelab scenario list",
                                        "racelab scenario show veth-napi-race --variant iperf3",
                                        "racelab scenario validate scenarios/*.toml"))
    ss = p.add_subparsers(dest="scmd", required=True)
    ss.add_parser("list", help="the scenarios under scenarios/", formatter_class=_RAW,
                  epilog=_examples("racelab scenario list"))
    s = ss.add_parser("show", help="the fully resolved scenario: defaults, variant and --set applied",
                      formatter_class=_RAW, epilog=_examples(
                          "racelab scenario show generic-rx-race",
                          "racelab scenario show veth-napi-race --variant iperf3 --set load.senders=4"))
    _complete(s.add_argument("name", help="scenario name or .toml path"), _complete_scenario)
    _complete(s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a field (repeatable), e.g. --set load.senders=4"), _complete_set)
    _complete(s.add_argument("--variant", default=None, metavar="NAME", help="apply a named variant"),
              _complete_variant)
    s = ss.add_parser("validate", help="check scenario files; every problem named (exit 2 if any)",
                      formatter_class=_RAW, epilog=_examples("racelab scenario validate scenarios/*.toml",
                                                             "racelab scenario validate ~/my-race.toml"))
    _complete(s.add_argument("files", nargs="+", metavar="FILE", help="scenario .toml files"), _complete_toml)
    s = ss.add_parser("new", help="write a commented starting file (scenarios/NAME.toml)", formatter_class=_RAW,
                      epilog=_examples("racelab scenario new my-race && $EDITOR scenarios/my-race.toml",
                                       "racelab scenario new my-race --out /tmp/my-race.toml"))
    s.add_argument("name", help="the new scenario's name (lower-case words joined by '-')")
    s.add_argument("--out", default=None, help="where to write it (default: scenarios/NAME.toml)")
    s = ss.add_parser("schema", help="write scenarios/schema.json (JSON Schema for editors) from the validator",
                      formatter_class=_RAW, epilog=_examples("racelab scenario schema",
                                                             "racelab scenario schema --check   # in CI"))
    s.add_argument("--check", action="store_true", help="only say whether it is up to date (exit 1 if not)")
    p.set_defaults(func=cmd_scenario)

    p = sub.add_parser("image", help="guest image: build, key", formatter_class=_RAW,
                       epilog=_examples("racelab image build            # build or find it; prints its path",
                                        "racelab image key"))
    ims = p.add_subparsers(dest="icmd", required=True)
    b = ims.add_parser("build", help="build the guest image (or find it cached); prints its path",
                       formatter_class=_RAW, epilog=_examples("racelab image build",
                                                              "racelab image build --json | jq -r .ssh_key"))
    b.add_argument("--json", action="store_true",
                   help="print path, key, size_bytes, allocated_bytes, ssh_key and host_pubkey as JSON")
    ims.add_parser("key", help="the base layer's recipe key (images/recipe.toml's hash)", formatter_class=_RAW,
                   epilog=_examples("racelab image key"))
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("vm", help="boot one guest: run a command, or a shell", formatter_class=_RAW,
                       epilog=_examples("racelab vm run 6.1.192 -- uname -r", "racelab vm shell 6.12.117"))
    vs = p.add_subparsers(dest="vcmd", required=True)
    for name, what, examples in (
            ("run", "boot a guest, run COMMAND in it over SSH, tear it down",
             ("racelab vm run 6.1.192 -- uname -r",
              "racelab vm run 6.1.192+revert-generic-rx --vcpus 4 -- cat /proc/interrupts",
              "racelab vm run 6.1.192 --accel tcg --cmdline nokaslr --results out -- dmesg")),
            ("shell", "boot a guest and open a shell in it; torn down when the shell ends",
             ("racelab vm shell 6.12.117 --memory 2048",))):
        v = vs.add_parser(name, help=what, formatter_class=_RAW, epilog=_examples(*examples))
        _complete(v.add_argument("kernel", help="kernel to boot: catalog name, deb:, git:, tarball:, bzimage:"),
                  _complete_kernel)
        v.add_argument("--vcpus", type=int, default=2, help="guest vCPUs (default 2)")
        v.add_argument("--memory", type=int, default=1024, help="guest memory in MiB (default 1024)")
        v.add_argument("--cmdline", default="", help="extra kernel command line, after racelab's own")
        # lab.accel's Accel values (a test keeps them equal): importing it here would slow TAB
        v.add_argument("--accel", choices=("kvm", "tcg"), default=None,
                       help="kvm or tcg (default: kvm where a probe shows it boots this kernel; "
                            "RACELAB_ACCEL says the same)")
        _complete(v.add_argument("--results", default=None, metavar="DIR",
                                 help="keep the console log (NAME.console.log) and QEMU's log in DIR "
                                      "(default: removed with the guest)"), _complete_dirs)
        if name == "run":
            v.add_argument("command", nargs="*", help="the command, after --")
    p.set_defaults(func=cmd_vm)

    p = sub.add_parser("cleanup", help="remove guests and namespaces left by killed runs", formatter_class=_RAW,
                       epilog=_examples("racelab cleanup                # after a kill -9 or a crash"))
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("matrix", help="kernel x scenario grid", formatter_class=_RAW, epilog=_MATRIX_EPILOG)
    _complete(p.add_argument("--kernels", required=True, metavar="K1,K2,...",
                             help="comma-separated kernels (as for --kernel); each cell's expectation "
                                  "comes from the catalog"), _comma_list(_complete_kernel))
    _complete(p.add_argument("--scenarios", required=True, metavar="S1,S2,...",
                             help="comma-separated scenarios"), _comma_list(_complete_scenario))
    p.add_argument("--budget", default="5m", help="load time per cell, at most (default 5m); a cell stops at "
                                                  "its first violation")
    p.add_argument("--vms", type=int, default=1, help="guests per cell (default 1)")
    # the choices and default are lab.matrix's MISSED_POLICIES and DEFAULT_MISSED (a test keeps
    # them equal): importing lab.matrix here would slow every racelab start, TAB included
    p.add_argument("--missed", choices=("fail", "skip"), default="fail",
                   help="an affected kernel that did not reach its level within the budget: fail its cell "
                        "(default: the catalog says it is affected, so that is news) or skip it "
                        "(JUnit <skipped>, exit code unchanged); as pytest --racelab-missed")
    _complete(p.add_argument("--out", default="", help="results directory (default: results/matrix-TIME-PID)"),
              _complete_dirs)
    p.add_argument("--jobs", "-j", type=int, default=1, help="cells at a time (default 1)")
    p.add_argument("--uri", action="append", default=[],
                   help="libvirt URI(s) to spread cells over (repeatable; default: RACELAB_URIS, "
                        "else qemu:///system)")
    p.add_argument("--json", action="store_true", help="print matrix.json to stdout (the grid goes to stderr)")
    p.add_argument("--tap", metavar="FILE", default=None,
                   help="also write a TAP 13 stream to FILE: a test point per cell, judged as the exit code "
                        "judges it (a missed affected kernel is ok # SKIP, as junit.xml's skipped)")
    p.add_argument("--kcidb", metavar="FILE", default=None,
                   help="also write the matrix as a KCIDB v4 JSON document to FILE: a build per kernel, "
                        "a test per cell (path racelab.SCENARIO), ids racelab:...")
    p.set_defaults(func=cmd_matrix)

    p = sub.add_parser("bisect", help="flake-aware bisection of kernel commits for a race", formatter_class=_RAW,
                       epilog=_BISECT_EPILOG)
    _complete(p.add_argument("--tree", required=True, help="a kernel git checkout (never modified: the "
                                                         "bisection runs in a private clone)"), _complete_dirs)
    p.add_argument("--good", required=True, help="the older end: a commit, tag or branch")
    p.add_argument("--bad", required=True, help="the newer end: a commit, tag or branch")
    _complete(p.add_argument("--scenario", required=True, help="scenario name or .toml path"),
              _complete_scenario)
    p.add_argument("--find", choices=("cause", "fix"), default="cause",
                   help="cause: --bad (newer) reproduces; fix: --good (older) reproduces")
    p.add_argument("--vms", type=int, default=1, help="guests per step")
    _complete(p.add_argument("--out", default="", help="results directory"), _complete_dirs)
    p.add_argument("--calibrate-runs", type=int, default=3, help="runs on the reproducing end")
    p.add_argument("--calibrate-budget", default="2m", help="max load per calibration run")
    p.add_argument("--min-step", default="5s", help="minimum load per step")
    p.add_argument("--signal", choices=("corruption", "window", "auto"), default="auto",
                   help="what a step is judged on: corruption (the checker's violations), window (the "
                        "race's interleaving in the kernel trace: seconds per step where corruption is "
                        "rare), or auto (calibrate both, take the shorter step); the answer's racy end "
                        "is verified with corruption either way")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted bisection in --out (its calibration and steps are reused)")
    p.add_argument("--json", action="store_true",
                   help="print bisect.json to stdout at the end (progress and the answer go to stderr)")
    p.set_defaults(func=cmd_bisect)

    # internal (HIDDEN_COMMANDS), so without help= (that would list it), left out of the metavar
    # below and out of shell completion
    p = sub.add_parser("dev", description="developer tools, each also `python -m lab.TOOL ...`",
                       formatter_class=_RAW, epilog=_examples("racelab dev splat results/DIR/vms/K/vm-0.console.log",
                                                              "python -m lab.splat results/DIR/vms/K/vm-0.console.log"))
    _dev_commands(p.add_subparsers(dest="tool", required=True))
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("bisect-step", description="internal: one `git bisect run` step (exit 0/1/125)")
    p.add_argument("--state", required=True, help="the bisection's state file")
    p.set_defaults(func=cmd_bisect_step)
    sub.metavar = "{" + ",".join(c for c in sub.choices if c not in HIDDEN_COMMANDS) + "}"
    _verbosity_everywhere(ap)
    return ap


def _parse(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argv parsed; for a command that runs a COMMAND (`vm run K --vcpus 4 -- CMD...`, `dev
    remote`), what follows the first `--` is that command, whatever options came between: argparse
    alone gives a positional list after another positional only the words right after it."""
    if "--" in argv and any(x.dest == "command" for x in _leaf(ap, argv[:argv.index("--")])._actions):
        i = argv.index("--")
        a = ap.parse_args(argv[:i])
        a.command = [*a.command, *argv[i + 1:]]
        return a
    return ap.parse_args(argv)


def _leaf(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser the words name (`vm run K --vcpus 4` -> `racelab vm run`)."""
    for w in words:
        subs = [x for x in parser._actions if isinstance(x, argparse._SubParsersAction)]
        if subs and w in subs[0].choices:
            parser = subs[0].choices[w]
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    ap = make_parser()
    if "_ARGCOMPLETE" in os.environ:
        # a TAB in a shell with `eval "$(register-python-argcomplete racelab)"`: answer on fd 8
        # and exit, before anything heavier than the parser is imported
        import argcomplete
        argcomplete.autocomplete(ap, exclude=list(HIDDEN_COMMANDS))
    a = _parse(ap, _glue_negative_values(ap, list(sys.argv[1:] if argv is None else argv)))
    setup_logging(a.verbose, quiet=a.quiet)
    # SIGTERM and SIGHUP unwind like Ctrl-C: guests, namespaces and files are removed
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        validate_args(a)
        return int(a.func(a) or 0)
    except RacelabError as e:
        print(f"racelab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        kept = getattr(e, "outcome", None)
        print("racelab: interrupted; everything started was torn down"
              + (f"; the results so far are in {kept.out} (every row INCONCLUSIVE)" if kept else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `racelab kernel list --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        # a file the user named (--out, a scenario path) or the machine itself (no disk):
        # not a verdict, and not the "verdict contradicts --expect" code 1 either
        where = f": {e.filename}" if e.filename else ""
        print(f"racelab: error: {e.strerror or e}{where}", file=sys.stderr)
        print("  hint: check the path and its permissions, and free disk space (df -h)", file=sys.stderr)
        return EXIT_INFRA
    except Exception:  # noqa: BLE001 - a bug in racelab: say so, never exit 1 (= mismatch)
        import traceback

        traceback.print_exc()
        print("racelab: internal error (a bug in racelab; the traceback is above)", file=sys.stderr)
        return EXIT_INFRA


if __name__ == "__main__":
    sys.exit(main())
