"""The CLI as a user runs it: netns runs, selftest, exit codes and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def racelab(*args, timeout=300, user=None):
    argv = [sys.executable, "-m", "lab.cli", *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.root
@pytest.mark.parametrize("name", ["generic-rx-race", "veth-napi-race"])
def test_netns_run_on_a_fixed_host_kernel_is_not_reproduced(name, tmp_path):
    p = racelab("run", name, "--backend", "netns", "--duration", "5s", "--out", str(tmp_path),
                "--expect", "clean", "--seed", "7")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "NOT REPRODUCED" in p.stdout and "rate <" in p.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    from lab import results
    assert results.problems(s) == [], "summary.json follows lab/schemas/summary.schema.json"
    (row,) = s["rows"]
    assert row["packets"] > 1000 and row["violations"] == 0
    assert s["config"]["seed"] == 7 and s["provenance"]["host_kernel"]
    # the exact configuration is recorded and loads back
    from lab.config import RunConfig
    cfg = RunConfig.from_json((tmp_path / "config.json").read_text())
    assert cfg.scenario == name and cfg.seed == 7
    assert (tmp_path / "events.jsonl").stat().st_size > 0
    assert (tmp_path / "junit.xml").exists() and (tmp_path / "report.html").exists()


@pytest.mark.root
def test_expect_mismatch_exits_1(tmp_path):
    p = racelab("run", "generic-rx-race", "--duration", "3s", "--out", str(tmp_path), "--expect", "reproduced",
                "--tap", str(tmp_path / "run.tap"))
    assert p.returncode == 1, p.stdout + p.stderr
    # the TAP point says the same as the exit code, and why
    tap = (tmp_path / "run.tap").read_text().splitlines()
    assert tap[:2] == ["TAP version 13", "1..1"] and tap[2].startswith("not ok 1 - host:")
    assert tap[2].endswith(" generic-rx-race: NOT REPRODUCED") and tap[3] == "  ---"
    assert tap[4].startswith('  message: "expected reproduced, got NOT REPRODUCED (rate <')


@pytest.mark.root
def test_injected_fault_is_reproduced(tmp_path):
    p = racelab("run", "generic-rx-race", "--duration", "3s", "--out", str(tmp_path), "--inject", "duplicate",
                "--expect", "reproduced", "--json", "--tap", str(tmp_path / "run.tap"))
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout)["rows"][0]
    assert row["verdict"] == "REPRODUCED" and row["by_kind"].get("duplicate", 0) > 0
    tap = (tmp_path / "run.tap").read_text()
    assert "\nok 1 - host:" in tap and f"    duplicate: {row['by_kind']['duplicate']}\n" in tap


@pytest.mark.root
def test_selftest_subset():
    p = racelab("selftest", "--xdp", "generic", "--kind", "order", "--kind", "poison", "--duration", "3s")
    assert p.returncode == 0, p.stdout + p.stderr
    # rxdrop: clean, order, poison; forward: clean, poison (on the COMP ring)
    assert "selftest: 5 detectors ok, 0 failed" in p.stdout
    assert "forward inject poison" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-race"], "unknown scenario"),
    (["run", "generic-rx"], "did you mean generic-rx-race"),
    (["run", "generic-rx-race", "--set", "load.senders=lots"], "load.senders"),
    (["run", "generic-rx-race", "--duration", "forever"], "bad --duration"),
    (["run", "generic-rx-race", "--inject", "gremlins"], "unknown --inject"),
    (["run", "generic-rx-race", "--kernel", "6.1.192"], "--kernel needs --backend vm"),
    (["repro", "generic-rx-race", "--kernel", "6.1.999-nope"], "6.1.999-nope"),
    (["selftest", "--kind", "gremlins"], "unknown detector"),
])
def test_bad_input_exits_2_with_a_message(args, needle):
    p = racelab(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr


def test_malformed_scenario_file_exits_2(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[bug\nname = 'x'\n")
    p = racelab("run", str(bad))
    assert p.returncode == 2 and "malformed TOML" in p.stderr


@pytest.mark.root
def test_not_root_exits_2_naming_the_fix():
    p = racelab("run", "generic-rx-race", "--duration", "2s", user="65534")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "needs root" in p.stderr and "sudo" in p.stderr


def _ours(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def _descendants(root):
    """root's process tree now (other xdist workers run their own topologies at the same time)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _netns_holders(inodes):
    held = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ino = os.stat(f"/proc/{d}/ns/net").st_ino
                if ino in inodes:
                    held[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            except OSError:
                pass
    return held


@pytest.mark.root
@pytest.mark.xdist_group("host-load")   # two host loads at once on 2 cores starve both runs' agents
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_run_leaves_no_process_namespace_or_veth(sig, tmp_path):
    import signal
    import time
    patterns = ("nskeeper.py", "xskcheck", "xsksend", "lab.agent")
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", "generic-rx-race", "--duration", "60s",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "events.jsonl").exists():
            time.sleep(0.2)
        events = tmp_path / "events.jsonl"
        while time.time() < deadline and '"load-start"' not in events.read_text():
            time.sleep(0.2)
        assert '"load-start"' in events.read_text(), "traffic never started"
        mine = _descendants(proc.pid)
        started = {p: _ours(p) & mine for p in patterns}
        assert started["xskcheck"] and started["nskeeper.py"]
        netns = set()
        for pid in started["nskeeper.py"]:
            try:
                netns.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass
        assert netns
        proc.send_signal(getattr(signal, sig))
        proc.wait(60)
        # the kernel frees a namespace when its last process has exited: give the
        # processes (ours, reparented to init after SIGKILL) a moment to finish dying
        deadline = time.time() + 15
        while True:
            left = {p: _ours(p) & started[p] for p in started}
            holders = _netns_holders(netns)
            if (not any(left.values()) and not holders) or time.time() > deadline:
                break
            time.sleep(0.2)
        assert not any(left.values()), f"left behind after {sig}: {left}"
        assert not holders, f"a network namespace (and its veths) outlived the run, held by {holders}"
    finally:
        if proc.poll() is None:   # a failed assertion above: stop the run the way a user would
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_unknown_selftest_kind_is_named_before_root_or_build():
    # as nobody: the typo is reported, not "needs root", and nothing gets compiled first
    p = racelab("selftest", "--kind", "gremlins", user="65534")
    if p.returncode == 126:
        pytest.skip("this interpreter is not readable by uid 65534")
    assert p.returncode == 2 and "unknown detector" in p.stderr, p.stdout + p.stderr


@pytest.mark.root
def test_unwritable_out_exits_2_naming_the_directory(tmp_path):
    p = racelab("run", "generic-rx-race", "--out", "/proc/racelab-nope/x", "--duration", "2s")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "/proc/racelab-nope/x" in p.stderr and "--out" in p.stderr


@pytest.mark.parametrize("err,needle", [
    ("EAFNOSUPPORT", "CONFIG_XDP_SOCKETS"),
    ("EPERM", "not allowed"),
])
def test_kernel_without_xdp_sockets_exits_2_naming_the_option(err, needle, tmp_path):
    # this host kernel has XDP sockets, so socket(AF_XDP) is made to fail as such a kernel's does
    code = (
        "import errno, socket, sys\n"
        "real = socket.socket\n"
        "class Sock(real):\n"
        "    def __init__(self, family=-1, *a, **k):\n"
        f"        if family == 44: raise OSError(errno.{err}, __import__('os').strerror(errno.{err}))\n"
        "        super().__init__(family, *a, **k)\n"
        "socket.socket = Sock\n"
        "import os; os.geteuid = lambda: 0\n"
        "from lab import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", code, "run", "generic-rx-race", "--duration", "2s",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr
    # the check comes before anything is made: no results directory
    assert not out.exists()


@pytest.mark.root
def test_iperf3_tcp_through_forward_mode_is_reported(tmp_path):
    if subprocess.run(["sh", "-c", "command -v iperf3"], capture_output=True).returncode:
        pytest.skip("needs iperf3: apt-get install iperf3")
    p = racelab("run", "generic-rx-race", "--duration", "4s", "--out", str(tmp_path), "--expect", "clean",
                "--set", "checker.mode=forward", "--set", "load.iperf3=true", "--set", "load.senders=0")
    assert p.returncode == 0, p.stdout + p.stderr
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    (iperf,) = [e for e in events if e.get("type") == "iperf"]
    # TCP really went through the checker's forward path (RX -> TX -> COMP)
    assert "error" not in iperf and iperf["bytes"] > 1_000_000, iperf
    done = [e for e in events if e.get("type") == "done"][-1]
    assert done["rx"] > 1000


@pytest.mark.root
def test_run_from_a_results_directory_runs_the_same_again(tmp_path):
    """racelab run --from DIR: DIR's recorded configuration (scenario data, seed, duration,
    knobs) run again into a new directory, with its own verdict."""
    first, again = tmp_path / "first", tmp_path / "again"
    p = racelab("run", "generic-rx-race", "--backend", "netns", "--duration", "3s", "--seed", "11",
                "--set", "load.senders=1", "--out", str(first))
    assert p.returncode == 0, p.stdout + p.stderr
    p = racelab("run", "--from", str(first), "--out", str(again))
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = (json.loads((d / "summary.json").read_text()) for d in (first, again))
    assert {**a["config"], "out": ""} == {**b["config"], "out": ""}, "the same configuration"
    assert b["config"]["seed"] == 11 and b["config"]["scenario_data"]["load"]["senders"] == 1
    assert b["rows"][0]["verdict"] == "NOT REPRODUCED" and b["rows"][0]["packets"] > 1000
