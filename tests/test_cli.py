"""The command line: every bad option named before anything is built or booted, and the
messages that name the actual problem."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab import cli
from lab.run import writable_dir_problem

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nothing_runs(monkeypatch):
    """Any build, boot or command body reached fails the test: validation must stop first."""
    from lab import bisect, fleet, matrix
    from lab.kernels import kernel

    def boom(*a, **kw):
        raise AssertionError("reached past validation")
    for mod, name in ((fleet, "build_kernels"), (fleet, "run_vm"), (kernel, "ensure"), (matrix, "run_matrix"),
                      (bisect, "calibrate"), (fleet, "preflight_vm")):
        monkeypatch.setattr(mod, name, boom)


def racelab(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


MATRIX = ("matrix", "--kernels", "6.1.192", "--scenarios", "generic-rx-race")
BISECT = ("bisect", "--tree", str(ROOT), "--good", "HEAD", "--bad", "HEAD", "--scenario", "generic-rx-race")


def test_matrix_and_bisect_get_their_options_as_dataclasses_with_the_clis_defaults(monkeypatch, capsys):
    from lab import bisect, matrix
    got = []
    monkeypatch.setattr(matrix, "main", lambda a: got.append(a) or 0)
    monkeypatch.setattr(bisect, "main", lambda a: got.append(a) or 0)
    assert cli.main(list(MATRIX)) == 0 and cli.main(list(BISECT)) == 0
    assert got == [matrix.MatrixArgs(kernels="6.1.192", scenarios="generic-rx-race"),
                   bisect.BisectArgs(tree=str(ROOT), good="HEAD", bad="HEAD", scenario="generic-rx-race")]
    got.clear()
    assert cli.main([*MATRIX, "--uri", "qemu:///a", "--uri", "qemu:///b", "--json", "-j", "2"]) == 0
    assert cli.main([*BISECT, "--find", "fix", "--resume", "--json", "--signal", "window"]) == 0
    assert got[0].uris == ("qemu:///a", "qemu:///b") and got[0].as_json and got[0].jobs == 2
    assert got[1].find == "fix" and got[1].resume and got[1].as_json and got[1].signal == "window"


@pytest.mark.parametrize("argv, says", [
    ((*MATRIX, "--vms", "0"), "--vms must be >= 1, got 0"),
    ((*MATRIX, "--jobs", "0"), "--jobs must be >= 1, got 0"),
    ((*MATRIX, "-j", "-2"), "--jobs must be >= 1, got -2"),
    ((*MATRIX, "--budget", "soon"), "bad --budget: 'soon'"),
    ((*BISECT, "--vms", "0"), "--vms must be >= 1, got 0"),
    ((*BISECT, "--min-step", "bogus"), "bad --min-step: 'bogus'"),
    ((*BISECT, "--calibrate-runs", "0"), "--calibrate-runs must be >= 1"),
    (("run", "generic-rx-race", "--duration", "-5s"), "--duration must be positive, got '-5s'"),
    (("repro", "generic-rx-race", "--budget", "-1m"), "--budget must be positive, got '-1m'"),
    (("kernel", "gc", "--keep", "-1"), "--keep must be >= 0"),
])
def test_bad_options_are_named_before_anything_runs(capsys, nothing_runs, argv, says):
    rc, out, err = racelab(capsys, *argv)
    assert rc == 2, err
    assert says in err and "hint:" in err
    assert "internal error" not in err and "expected one argument" not in err


def test_every_bad_option_is_named_at_once(capsys, nothing_runs, tmp_path):
    rc, _, err = racelab(capsys, *MATRIX, "--vms", "0", "--jobs", "0", "--budget", "x",
                         "--out", str(tmp_path / "f" / "out"))
    assert rc == 2
    assert "--vms" in err and "--jobs" in err and "--budget" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the --out probe runs as root, the user these "
                                                "commands need (sudo ./bootstrap test)")
@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_out_is_refused_before_the_builds(capsys, nothing_runs, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "results"
        says = "is not a directory"
    else:
        out = Path("/proc/racelab-results")     # no permission bits to bypass, even as root
        says = "cannot write there"
    for argv in (("run", "generic-rx-race", "--backend", "vm", "--kernel", "6.1.192"), MATRIX, BISECT):
        rc, _, err = racelab(capsys, *argv, "--out", str(out))
        assert rc == 2, err
        assert f"--out {out}: " in err and says in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the --tap/--kcidb probe runs as root, as --out's does "
                                                "(sudo ./bootstrap test)")
def test_an_unwritable_tap_or_kcidb_file_is_refused_before_the_builds(capsys, nothing_runs, tmp_path):
    (tmp_path / "file").write_text("")
    for argv in (("run", "generic-rx-race", "--backend", "vm", "--kernel", "6.1.192"),
                 ("repro", "generic-rx-race"), MATRIX):
        rc, _, err = racelab(capsys, *argv, "--out", str(tmp_path / "out"), "--tap", str(tmp_path / "file" / "x.tap"))
        assert rc == 2, err
        assert f"--tap {tmp_path / 'file' / 'x.tap'}: " in err and "is not a directory" in err
    rc, _, err = racelab(capsys, *MATRIX, "--kcidb", str(tmp_path), "--tap", "/proc/racelab-x.tap")
    assert rc == 2 and f"--kcidb {tmp_path}: {tmp_path} is a directory" in err
    assert "--tap /proc/racelab-x.tap: /proc: cannot write there" in err     # every problem at once
    assert not (tmp_path / "out").exists()


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    assert writable_dir_problem(tmp_path / "a" / "b" / "c") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    assert writable_dir_problem(tmp_path / "keep") is None
    assert list((tmp_path / "keep").iterdir()) == []


def test_a_bad_set_value_is_blamed_on_set_not_on_the_scenario_file(capsys, nothing_runs):
    rc, _, err = racelab(capsys, "run", "generic-rx-race", "--set", "load.senders=abc")
    assert rc == 2
    assert err.startswith("racelab: error: --set: 1 problem(s)")
    assert "--set load.senders: 'abc' is not an integer" in err
    assert "fix the --set values" in err and "fix the fields named above" not in err


def test_a_bad_field_in_the_file_is_still_the_files(capsys, nothing_runs, tmp_path):
    text = (ROOT / "scenarios" / "generic-rx-race.toml").read_text()
    bad = tmp_path / "generic-rx-race.toml"
    bad.write_text(text.replace("\nsenders = 2 ", "\nsenders = \"many\" ", 1))
    rc, _, err = racelab(capsys, "run", str(bad), "--set", "load.gap_ns=8")
    assert rc == 2
    assert f"{bad}: 1 problem(s)" in err and "load.senders: 'many'" in err and "--set load.senders" not in err


@pytest.mark.parametrize("given", ["/tmp/racelab-no-such-scenario.toml", "scenarios/nope", "nope.toml"])
def test_a_missing_scenario_file_is_no_such_file(capsys, nothing_runs, given):
    rc, _, err = racelab(capsys, "run", given)
    assert rc == 2
    assert f"no such file: {given}" in err and "unknown scenario" not in err


def test_an_unknown_scenario_name_is_still_unknown(capsys, nothing_runs):
    rc, _, err = racelab(capsys, "run", "generic-rx-rac")
    assert rc == 2 and "unknown scenario 'generic-rx-rac'" in err and "did you mean generic-rx-race" in err


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["kernel", "list", "-v"], 1, False),
    (["-v", "kernel", "list"], 1, False),
    (["kernel", "list", "-q"], 0, True),
    (["scenario", "show", "generic-rx-race", "-vv"], 2, False),
    (["run", "generic-rx-race", "-q"], 0, True),
    (["-q", "matrix", "--kernels", "a", "--scenarios", "b"], 0, True),
])
def test_verbosity_after_any_subcommand(argv, verbose, quiet):
    a = cli.make_parser().parse_args(argv)
    assert (a.verbose, a.quiet) == (verbose, quiet)


def test_kernel_list_v_runs():
    p = subprocess.run([sys.executable, "-m", "lab.cli", "kernel", "list", "-v"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "6.12.117" in p.stdout


def test_kernel_list_and_show_json(tmp_path):
    """Machine-readable catalog and cache: one JSON document each, with a schema version;
    a reader that stops early (| head) is no error."""
    import json

    env = {**os.environ, "RACELAB_CACHE": str(tmp_path)}   # an empty cache: nothing is cached
    run = lambda *args: subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    p = run("kernel", "list", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["schema_version"] == 1 and doc["cache"].startswith(str(tmp_path))
    by = {k["name"]: k for k in doc["kernels"]}
    assert by["6.1.192+revert-veth-napi"]["affected"] == ["veth-napi-race"]
    assert by["6.1.192"]["cached"] is False and by["6.1.192"]["bzimage"] is None
    p = run("kernel", "show", "6.1.192+revert-generic-rx", "--json")
    assert p.returncode == 0, p.stderr
    show = json.loads(p.stdout)
    assert show["schema_version"] == 1 and show["name"] == "6.1.192+revert-generic-rx"
    assert [Path(x).name for x in show["patches"]] == ["revert-generic-rx.patch"] and len(show["key"]) == 24
    p = subprocess.run(f"{sys.executable} -m lab.cli kernel list --json | head -1", shell=True, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout == "{\n" and "error" not in p.stderr, p.stderr


def test_version():
    p = subprocess.run([sys.executable, "-m", "lab.cli", "--version"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    from lab import __version__
    assert p.returncode == 0 and p.stdout.startswith(f"racelab {__version__}")


def test_bisect_step_is_hidden_from_help_but_still_works():
    ap = cli.make_parser()
    text = ap.format_help()
    assert "bisect-step" not in text and "bisect " in text and "matrix" in text
    assert ap.parse_args(["bisect-step", "--state", "x"]).state == "x"


def test_the_results_directory_is_said_when_the_run_starts(capsys, caplog, monkeypatch, tmp_path):
    from lab import fleet
    from lab.run import InfraError
    said = []

    def run_vm(cfg, **kw):
        said.extend(r.getMessage() for r in caplog.records)
        raise InfraError("stopped here by the test")
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    with caplog.at_level(logging.INFO, logger="racelab"):
        rc, _, _ = racelab(capsys, "run", "generic-rx-race", "--backend", "vm", "--kernel", "6.1.192",
                           "--out", str(tmp_path / "r"))
    assert rc == 3
    assert any(m.startswith(f"results: {tmp_path / 'r'}") and "console.log" in m for m in said), said


def test_the_default_results_directory_is_chosen_up_front(monkeypatch):
    a = cli.make_parser().parse_args(["run", "generic-rx-race"])
    cfg = cli.build_config(a, default_backend="netns")
    assert cfg.out.startswith("results/generic-rx-race-") and cfg.out.endswith(f"-{os.getpid()}")


def test_run_from_checks_its_directory_and_refuses_other_options(tmp_path):
    from lab import cli
    from lab.config import RunConfig
    from lab.run import BadInput

    parse = cli.make_parser().parse_args
    with pytest.raises(BadInput, match="config.json does not exist"):
        cli.config_from_results(parse(["run", "--from", str(tmp_path)]))
    (tmp_path / "config.json").write_text(RunConfig(scenario="generic-rx-race", scenario_data={}, backend="vm",
                                                    kernels=("6.1.192",), duration=30.0, seed=5,
                                                    stop_grace=-1.0).to_json())
    cfg = cli.config_from_results(parse(["run", "--from", str(tmp_path), "--out", str(tmp_path / "b")]))
    assert (cfg.scenario, cfg.kernels, cfg.seed, cfg.out) == ("generic-rx-race", ("6.1.192",), 5, str(tmp_path / "b"))
    assert cfg.stop_grace == 5.0, "a repro's hold is repro's: a plain run stops after a grace"
    with pytest.raises(BadInput, match="not --seed, --kernel, SCENARIO"):
        cli.config_from_results(parse(["run", "generic-rx-race", "--from", str(tmp_path), "--seed", "1",
                                       "--kernel", "6.1.192"]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInput, match="not a racelab run configuration"):
        cli.config_from_results(parse(["run", "--from", str(tmp_path)]))


# ---------------------------------------------------------------- help and examples

def undocumented(parser, hidden=()):
    """Every option and positional of every (sub)command has help; every visible command has
    an examples epilog, kept as written (RawDescriptionHelpFormatter).  hidden: prog names of
    internal commands, exempt from examples (their options still need help)."""
    import argparse
    problems = []

    def walk(p, visible):
        if visible and not p.epilog:
            problems.append(f"{p.prog}: no examples (epilog)")
        elif visible and not issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter):
            problems.append(f"{p.prog}: its examples would be re-wrapped (formatter_class)")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    walk(sp, visible and sp.prog not in hidden)
            elif not a.help:
                problems.append(f"{p.prog} {'/'.join(a.option_strings) or a.dest}: no help")
    walk(parser, True)
    return problems


def test_every_option_has_help_and_every_command_examples():
    ap = cli.make_parser()
    assert undocumented(ap, hidden={f"racelab {c}" for c in cli.HIDDEN_COMMANDS}) == []


def test_the_help_check_finds_what_is_missing():
    import argparse
    ap = argparse.ArgumentParser(prog="t", epilog="examples:\n  t x",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare")
    ap.add_argument("--fine", help="has help")
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("x", help="a command without examples")
    s.add_argument("thing")
    sub.add_parser("y", help="examples, rewrapped", epilog="examples:\n  t y")
    sub.add_parser("z", epilog=None)
    assert undocumented(ap, hidden={"t z"}) == [
        "t --bare: no help", "t x: no examples (epilog)", "t x thing: no help",
        "t y: its examples would be re-wrapped (formatter_class)"]


def test_examples_keep_their_lines():
    text = cli.make_parser()._subparsers._group_actions[0].choices["matrix"].format_help()
    assert "\n  racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx --scenarios generic-rx-race\n" in text
    assert 'eval "$(register-python-argcomplete racelab)"' in cli.make_parser().format_help()


# ---------------------------------------------------------------- shell completion

def complete(line):
    """What a TAB at the end of `line` offers, through argcomplete's own protocol: the shell hook
    runs the program with _ARGCOMPLETE, COMP_LINE and COMP_POINT set and reads the answer,
    separated by _ARGCOMPLETE_IFS, from fd 8 (the hook's `8>&1 9>&2 1>/dev/null`)."""
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_IFS": "\v", "_ARGCOMPLETE_SUPPRESS_SPACE": "1"}
    p = subprocess.run(["bash", "-c", 'exec "$@" 8>&1 9>&2 1>/dev/null', "hook", sys.executable, "-m", "lab.cli"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [c for c in p.stdout.split("\v") if c]


def test_tab_completes_scenario_names():
    assert complete("racelab repro gen") == ["generic-rx-race"]
    assert set(complete("racelab run ")) >= {"generic-rx-race", "veth-napi-race", "shared-pool-rx-race"}
    assert complete("racelab matrix --kernels 6.1.192 --scenarios generic-rx-race,vet") == [
        "generic-rx-race,veth-napi-race"]
    assert complete("racelab run veth-napi-race --variant ") == ["iperf3"]


def test_tab_completes_catalog_kernels():
    from lab.kernels import kernel
    catalog = kernel.catalog_names()
    got = complete("racelab run generic-rx-race --backend vm --kernel 6.1.1")
    assert "6.1.192" in got and "6.1.192+revert-generic-rx" in got
    assert set(got) == {k for k in catalog if k.startswith("6.1.1")}
    assert complete("racelab kernel build 6.12.117+revert-v") == [
        k for k in catalog if k.startswith("6.12.117+revert-v")]
    assert "6.1.192+kasan" in complete("racelab kernel show 6.1.192+ka")        # a config fragment
    assert complete("racelab matrix --kernels 6.1.192,6.1.192+revert-sh") == ["6.1.192,6.1.192+revert-shared-pool"]


def test_tab_completes_commands_but_not_the_internal_one():
    assert complete("racelab bis") == ["bisect"]
    assert complete("racelab de") == []                  # racelab dev: hidden, but its tools complete
    assert complete("racelab dev spl") == ["splat"]
    assert complete("racelab vm run 6.1.192 --ac") == ["--accel"]
    assert {"-v", "--verbose", "--json"} <= set(complete("racelab kernel list -"))


def test_the_completion_marker_is_where_argcomplete_looks():
    """argcomplete's global hook runs a console script's module only if its first 1024 bytes
    say PYTHON_ARGCOMPLETE_OK."""
    assert "PYTHON_ARGCOMPLETE_OK" in (ROOT / "lab" / "cli.py").read_text()[:1024]


def test_the_readme_line_enables_completion_in_bash():
    """The README's `eval "$(register-python-argcomplete racelab)"`, in a real bash: the function
    it registers for racelab fills COMPREPLY (bash itself splits `deb:` off at the colon)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "racelab").exists() or not (bin_dir / "register-python-argcomplete").exists():
        pytest.skip(f"no racelab or register-python-argcomplete in {bin_dir}: ./bootstrap install")
    script = '''
        eval "$(register-python-argcomplete racelab)"
        fn=$(complete -p racelab | sed -E 's/.* -F ([^ ]+) .*/\\1/')
        COMP_LINE="racelab repro gen"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(racelab repro gen); COMP_CWORD=2
        "$fn" racelab gen repro; echo "${COMPREPLY[*]}"
        COMP_LINE="racelab kernel build deb:6.1.0-47-c"; COMP_POINT=${#COMP_LINE}
        COMP_WORDS=(racelab kernel build deb : 6.1.0-47-c); COMP_CWORD=5
        "$fn" racelab 6.1.0-47-c :; echo "${COMPREPLY[*]}"
    '''
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
    assert p.returncode == 0, p.stderr
    assert [line.strip() for line in p.stdout.splitlines()] == ["generic-rx-race", "6.1.0-47-cloud-amd64"], p.stderr


# ---------------------------------------------------------------- `python -m lab.X` is a racelab command

def _python_m(*argv, env=None):
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100", **(env or {})})


@pytest.mark.parametrize("module", sorted(cli.ENTRY_POINTS))
def test_each_python_m_entry_point_is_its_racelab_command(module):
    """`python -m MODULE` parses with the racelab command ENTRY_POINTS names: the same help, word
    for word (so the same options), and argparse's exit 2 for a bad argument."""
    prefix = cli.ENTRY_POINTS[module]
    own = _python_m(module, "--help")
    assert own.returncode == 0, own.stderr
    assert own.stdout.startswith(f"usage: racelab {' '.join(prefix)} "), own.stdout
    assert own.stdout == _python_m("lab.cli", *prefix, "--help").stdout
    bad = _python_m(module, "--no-such-option")
    assert bad.returncode == 2, bad.stderr
    # the first thing argparse finds wrong: a positional still missing, else the option (which
    # argparse reports from the top parser, as for `racelab selftest --no-such-option`)
    assert re.search(r"^racelab[ a-z]*: error: (the following arguments are required|unrecognized arguments: "
                     r"--no-such-option)", bad.stderr, flags=re.M), bad.stderr
    assert "Traceback" not in bad.stderr


def test_no_module_declares_a_command_line_of_its_own():
    """Only lab/cli.py builds parsers; a module run with `python -m` is in ENTRY_POINTS.  The guest
    side (lab/agent/) keeps its own: it may not import lab.cli (tests/test_agent_boundary.py)."""
    runnable, parsers = set(), set()
    for path in (ROOT / "lab").rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "agent" or rel.name in ("cli.py", "__main__.py"):
            continue
        text = path.read_text()
        module = ".".join(rel.with_suffix("").parts)
        if '__name__ == "__main__"' in text:
            runnable.add(module)
        if "argparse" in text:
            parsers.add(module)
    assert runnable == set(cli.ENTRY_POINTS)
    assert parsers == set()


def test_the_dev_tools_are_hidden_from_racelab_help_and_listed_in_their_own():
    ap = cli.make_parser()
    assert "dev" not in ap.format_usage() and "splat" not in ap.format_help()
    dev = ap._subparsers._group_actions[0].choices["dev"]
    assert set(dev._subparsers._group_actions[0].choices) == set(cli.DEV_TOOLS)
    assert all(f"\n    {t} " in dev.format_help() for t in cli.DEV_TOOLS)


def test_choices_copied_into_the_parser_are_the_modules():
    """The parser keeps its imports light (TAB runs it); these copies must follow their modules."""
    from lab import accel, results
    sub = cli.make_parser()._subparsers._group_actions[0].choices

    def option(parser, flag):
        return next(a for a in parser._actions if flag in a.option_strings)
    vm_run = sub["vm"]._subparsers._group_actions[0].choices["run"]
    assert list(option(vm_run, "--accel").choices) == [a.value for a in accel.Accel]
    validate = sub["dev"]._subparsers._group_actions[0].choices["results"]._subparsers._group_actions[0].choices[
        "validate"]
    assert list(option(validate, "--kind").choices) == sorted(results.VERSIONS)


def test_vm_run_takes_what_python_m_lab_vm_took(monkeypatch, capsys, tmp_path):
    """--cmdline, --accel and --results (once only lab.vm's) reach the guest; a command is required."""
    from lab import fleet
    got = {}
    monkeypatch.setattr(fleet, "vm_run", lambda k, argv, **kw: got.update(kernel=k, argv=argv, **kw) or 7)
    monkeypatch.setattr(fleet, "vm_shell", lambda k, **kw: got.update(kernel=k, shell=True, **kw) or 0)
    from lab import vm
    assert vm.main(["run", "6.1.192", "--accel", "tcg", "--cmdline", "nokaslr", "--results", str(tmp_path / "r"),
                    "--vcpus", "3", "--", "uname", "-r"]) == 7
    assert got == {"kernel": "6.1.192", "argv": ["uname", "-r"], "vcpus": 3, "memory_mib": 1024,
                   "cmdline": "nokaslr", "accel": "tcg", "results": tmp_path / "r"}
    got.clear()
    assert cli.main(["vm", "shell", "6.1.192", "--memory", "2048"]) == 0
    assert got == {"kernel": "6.1.192", "shell": True, "vcpus": 2, "memory_mib": 2048, "cmdline": "",
                   "accel": None, "results": None}
    capsys.readouterr()
    assert cli.main(["vm", "run", "6.1.192"]) == 2
    assert "no command given" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    got.clear()
    assert cli.main(["vm", "run", "6.1.192", "--results", str(tmp_path / "file" / "sub"), "--", "true"]) == 2
    assert "--results" in capsys.readouterr().err and got == {}
    with pytest.raises(SystemExit) as e:
        cli.main(["vm", "run", "6.1.192", "--accel", "hvf", "--", "true"])
    assert e.value.code == 2


def test_image_key_is_the_recipes(capsys):
    from lab import image
    assert image.main(["key"]) == 0
    assert capsys.readouterr().out.strip() == image.load_recipe().key()


def test_dev_tools_do_their_work_and_keep_their_exit_codes(tmp_path):
    """Through `python -m` as a developer types it: splats found in a log, a results document
    checked (0 ok, 1 does not conform, 2 not one), a bad port refused before any SSH."""
    log = tmp_path / "vm-0.console.log"
    log.write_text("[    1.0] booting\n[   12.000001] ------------[ cut here ]------------\n"
                   "[   12.000002] WARNING: CPU: 1 PID: 812 at net/xdp/xsk.c:211 __xsk_rcv+0x1a/0x90\n"
                   "[   12.000003] Modules linked in: veth\n[   13.0] after\n")
    p = _python_m("lab.splat", str(log))
    assert p.returncode == 0 and "1 splat(s)" in p.stderr and "__xsk_rcv" in p.stdout, p.stderr
    summary = ROOT / "tests" / "fixtures" / "results" / "summary-repro-generic-vm.json"
    p = _python_m("lab.results", "validate", str(summary))
    assert p.returncode == 0 and p.stdout.endswith("ok (summary schema version 1)\n")
    p = _python_m("lab.results", "validate", str(summary), "--kind", "matrix")
    assert p.returncode == 1 and "required property" in p.stdout
    (tmp_path / "x.json").write_text("{}")
    p = _python_m("lab.results", "validate", str(tmp_path / "x.json"))
    assert p.returncode == 2 and "hint: name the schema with --kind" in p.stderr
    p = _python_m("lab.remote", "0", "--", "true")
    assert p.returncode == 2 and "port 0 is not a TCP port" in p.stderr
