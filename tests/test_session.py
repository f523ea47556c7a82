"""One `racelab run` (lab.session): rows from targets, and Ctrl-C for real (root).
(Its live line is in test_progress.py.)"""
import pytest

from lab.session import rows_from_targets
from lab.verdict import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from lab.workload import TargetResult


# ------------------------------------------------------------------ rows from targets


def target(label, rx_per_half_second, seconds=60.0, **kw):
    t = TargetResult(label=label, kernel="k", load_seconds=seconds, reason="duration",
                     packets=int(rx_per_half_second * seconds * 2), **kw)
    t.rx_points = [(i * 0.5, int(rx_per_half_second * i)) for i in range(1, int(seconds * 2) + 1)]
    return t


def test_a_zero_packet_guest_adds_no_exposure_and_no_clean_verdict():
    """One guest with 1.2 M packets and one with 0 used to be NOT REPRODUCED over 120 s."""
    good, empty = target("vm-0", 10_000), target("vm-1", 0)
    empty.rx_points = []
    row = rows_from_targets("k", [good, empty], 70.0, 0.95, vms=2)
    assert row.verdict == INCONCLUSIVE, "a guest that checked nothing is never evidence"
    assert row.packets == 1_200_000 and row.seconds == 60.0
    assert row.infra_errors == ["vm-1: no packets reached the checker"]
    assert rows_from_targets("k", [good], 70.0, 0.95, vms=1).verdict == NOT_REPRODUCED
    assert rows_from_targets("k", [empty], 70.0, 0.95, vms=1).verdict == INCONCLUSIVE


def test_senders_with_errors_or_traffic_that_stopped_early_leave_nothing_to_decide():
    failed = target("vm-0", 10_000, senders={"errors": 3, "error": "Invalid argument"})
    early = target("vm-1", 10_000)
    early.rx_points = [(t, min(rx, 200_000)) for t, rx in early.rx_points]   # flat after 10 s
    row = rows_from_targets("k", [failed, early], 70.0, 0.95, vms=2)
    assert row.verdict == INCONCLUSIVE and row.packets == 0 and row.seconds == 0
    assert "send error" in row.infra_errors[0] and "traffic stopped early" in row.infra_errors[1]


def test_a_violation_on_one_guest_still_reproduces_with_only_its_exposure():
    hit = target("vm-0", 10_000, seconds=10.0, by_kind={"order": 769},
                 onsets_by_kind={"order": 1})
    empty = target("vm-1", 0)
    empty.rx_points = []
    row = rows_from_targets("k", [hit, empty], 70.0, 0.95, vms=2)
    assert row.verdict == REPRODUCED and row.onsets == 1 and row.violations == 769
    assert row.seconds == 10.0 and row.packets == 200_000


def test_an_interrupted_run_keeps_its_exposure_so_far_and_decides_nothing():
    t = target("local", 10_000, seconds=4.0, by_kind={"order": 2})
    t.interrupted, t.infra_error, t.load_seconds = True, "interrupted", 0.0
    row = rows_from_targets("k", [t], 5.0, 0.95, vms=0)
    assert row.verdict == INCONCLUSIVE and row.interrupted and not row.infra_errors
    assert row.packets == 80_000 and row.seconds == 4.0 and row.violations == 2


# ------------------------------------------------------------------ Ctrl-C, for real (root)

def _descendants(pid):
    """pid's descendants now, with their command lines."""
    import os
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append((int(d), cmd))
    out, todo = {}, [pid]
    while todo:
        for child, cmd in children.get(todo.pop(), []):
            out[child] = cmd
            todo.append(child)
    return out


@pytest.mark.root
def test_ctrl_c_writes_the_partial_results_and_leaves_nothing(tmp_path):
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, XDP, AF_XDP): run as root")
    try:
        socket.socket(44, socket.SOCK_RAW, 0).close()
    except OSError:
        pytest.skip("host kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS=y)")

    def named_netns():
        # named namespaces only, and not the ones test_checker_root makes for itself
        # (it may run at the same time on another xdist worker)
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in out.splitlines() if line and not line.startswith("rl-dp-")}

    netns_before = named_netns()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", "generic-rx-race", "--backend", "netns",
                             "--duration", "60s", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:   # until packets are counted
            events = out / "events.jsonl"
            if events.exists() and any(json.loads(line).get("rx", 0) > 0
                                       for line in events.read_text().splitlines() if line.strip()):
                break
            started.update(_descendants(proc.pid))
            time.sleep(0.2)
        time.sleep(2)
        started.update(_descendants(proc.pid))
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "INCONCLUSIVE (interrupted" in stdout and "interrupted" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["rows"]
    for row in summary["rows"]:
        assert row["verdict"] == "INCONCLUSIVE" and row["interrupted"], row
        assert row["packets"] > 0 and row["seconds"] > 0, row
    assert (out / "junit.xml").exists() and (out / "report.html").exists()
    # the namespaces are anonymous, each held by a keeper process: all of them gone with
    # the checker and the senders
    keepers = [p for p, cmd in started.items() if "nskeeper.py" in cmd]
    assert keepers and any("xskcheck" in cmd for cmd in started.values()), started
    time.sleep(1)
    assert [p for p in started if os.path.exists(f"/proc/{p}")] == []
    assert named_netns() == netns_before
