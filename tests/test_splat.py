"""The kernel-splat detector: a kernel log followed as it is written, timed against the load.

Console texts below are recorded from 6.1 guests (timestamps kept); the
event streams are what the agent sends.
"""
import io
import json
import os
import threading
import time
from contextlib import contextmanager

import pytest

from lab import scenario as scen
from lab.splat import (CRASH_WINDOW, KmsgWatcher, Splat, SplatParser, SplatWatcher,
                       crashed_of_splat, host_splats, kmsg_line, record_splats, splat_kind,
                       stall_policy)
from lab.workload import TargetResult, agent_spec

BOOT = """\
[    0.000000] Linux version 6.1.192 (racelab@build) #1 SMP PREEMPT_DYNAMIC
[    0.000000] rcu: Hierarchical RCU implementation.
[    0.000000] rcu: RCU calculated value of scheduler-enlistment delay is 25 jiffies.
[    1.234567] virtio_net virtio0 enp1s0: renamed from eth0
"""
WARNING = """\
[   12.000001] ------------[ cut here ]------------
[   12.000002] WARNING: CPU: 1 PID: 812 at net/xdp/xsk.c:211 __xsk_rcv+0x1a/0x90
[   12.000003] Modules linked in: veth
"""
BOOT_WARN = """\
[    1.911000] ------------[ cut here ]------------
[    1.911002] racelab: boot-time warning for the test
[    1.911010] WARNING: CPU: 0 PID: 1 at net/xdp/xsk.c:1500 racelab_boot_warn+0x11/0x20
[    1.911020] Modules linked in:
[    1.911030] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.192 #1
[    1.911040] RIP: 0010:racelab_boot_warn+0x11/0x20
[    1.911050] Call Trace:
[    1.911060]  do_one_initcall+0x41/0x200
[    1.911070]  kernel_init_freeable+0x1d8/0x232
[    1.911080] ---[ end trace 0000000000000000 ]---
"""
STALL = """\
[   36.656669] rcu: INFO: rcu_sched self-detected stall on CPU
[   36.656669] rcu: 	0-...!: (5185 ticks this GP) idle=9184/1/0x4000000000000000 softirq=1170/1170 fqs=0
[   36.656669] rcu: rcu_sched kthread starved for 5250 jiffies! g1409 f0x0 RCU_GP_WAIT_FQS(5)
"""
OOPS = """\
[   21.649064] BUG: kernel NULL pointer dereference, address: 00000000000000c4
[   21.649064] RIP: 0010:__xsk_rcv_zc+0x16/0xc0
[   21.675722] Kernel panic - not syncing: Fatal exception in interrupt
"""
# BUG_ON() in process context on x86: no "BUG:" line, no panic; the task is killed
BUG_ON = """\
[   44.102000] ------------[ cut here ]------------
[   44.102001] kernel BUG at net/xdp/xsk_queue.h:385!
[   44.102310] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[   44.102400] CPU: 1 PID: 230 Comm: xsksend Not tainted 6.1.192 #1
[   44.102410] RIP: 0010:xsk_generic_rcv+0x1c4/0x1d0
[   44.102500] Call Trace:
[   44.102510]  <TASK>
[   44.102520]  __netif_receive_skb_core+0x1c4/0xe50
[   44.102600]  </TASK>
[   44.102700] ---[ end trace 0000000000000000 ]---
[   44.102710] RIP: 0010:xsk_generic_rcv+0x1c4/0x1d0
"""
EXPEDITED = """\
[   51.000100] rcu: INFO: rcu_sched detected expedited stalls on CPUs/tasks: { 1-... } 21003 jiffies s: 1381 root: 0x2/.
[   51.000200] rcu: blocking rcu_node structures (internal RCU debug):
[   51.000300] Sending NMI from CPU 0 to CPUs 1:
"""
WQ_LOCKUP = """\
[   62.500000] BUG: workqueue lockup - pool cpus=1 node=0 flags=0x0 nice=0 stuck for 33s!
[   62.500100] Showing busy workqueues and worker pools:
[   62.500200] workqueue events: flags=0x0
"""


def follow(tmp_path, *chunks, load_after=None):
    """Splats of a console written in chunks; the load starts after chunk `load_after` (index)."""
    log = tmp_path / "console.log"
    log.write_text("")
    with SplatWatcher(log, interval=0.05) as w:
        for n, c in enumerate(chunks):
            with open(log, "a") as f:
                f.write(c)
            w.poll()   # each chunk read as written, whatever the watcher's thread is doing
            if load_after == n:
                w.on_agent_event({"type": "load-start"})
    return w.splats


def texts(splats):
    return [s.text for s in splats]


def test_a_clean_boot_log_is_silent(tmp_path):
    assert follow(tmp_path, BOOT, BOOT) == []


def test_a_warning_fires_with_its_context(tmp_path):
    seen = follow(tmp_path, BOOT, WARNING[:40], WARNING[40:])   # split mid-line, as a console writes
    assert len(seen) == 1
    assert seen[0].text.startswith("[   12.000001] ------------[ cut here ]")
    assert seen[0].first_line.startswith("[   12.000002] WARNING: CPU: 1") and "Modules linked in" in seen[0].text
    assert splat_kind(seen[0].text) == "kernel-splat"


def test_a_stall_is_seen_but_counted_as_a_note(tmp_path):
    seen = follow(tmp_path, BOOT, STALL)
    assert len(seen) == 1 and splat_kind(seen[0].text) == "stall"
    assert splat_kind("[ 1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [ksoftirqd/0:15]") == "stall"
    assert splat_kind("[ 1.0] BUG: KASAN: use-after-free in xsk_flush+0x2c/0x40") == "kernel-splat"


# --- only what comes after load-start counts -------------------------------------

def test_splats_before_load_start_are_kept_apart_and_after_it_count(tmp_path):
    seen = follow(tmp_path, BOOT, BOOT_WARN, BOOT, WARNING, load_after=2)
    assert [s.after_load for s in seen] == [False, True]
    res = TargetResult(label="k/vm-0", kernel="k", load_started_host=seen[1].seen_at - 1.0)
    record_splats(res, seen)
    assert res.by_kind == {"kernel-splat": 1} and "net/xdp/xsk.c:211" in res.violations[0]["text"]
    assert res.pre_load_splats == [seen[0].text]
    assert "---[ end trace" in res.pre_load_splats[0], "the whole text, not its first line"
    assert res.notes == ["kernel splat before the load, not counted: " + seen[0].text]


def test_a_splat_still_open_when_the_load_starts_is_a_splat_of_before(tmp_path):
    seen = follow(tmp_path, BOOT, WARNING, "[   12.1] Call Trace:\n[   12.2] ---[ end trace 0 ]---\n",
                  load_after=1)
    assert len(seen) == 1 and not seen[0].after_load


def test_when_the_load_never_started_no_splat_counts(tmp_path):
    seen = follow(tmp_path, BOOT, OOPS)
    res = TargetResult(label="k/vm-0", kernel="k")
    record_splats(res, seen)
    assert res.by_kind == {} and res.first_violation_s is None and len(res.pre_load_splats) == 1


def test_a_splat_after_load_start_times_the_first_violation():
    """A guest that oopses before the checker reports anything still has a time to
    first violation: the splat's, from when the console watcher read it."""
    oops = [Splat(OOPS.rstrip(), seen_at=102.5, after_load=True)]
    res = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0)
    record_splats(res, oops)
    assert res.by_kind == {"kernel-splat": 1} and res.first_violation_s == 2.5
    assert res.first_violation_origin == "load start"

    ready = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0, senders_ready_s=0.5)
    record_splats(ready, oops)
    assert ready.first_violation_s == 2.0 and ready.first_violation_from_load_start_s == 2.5

    early = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0, first_violation_s=0.4)
    record_splats(early, oops)
    assert early.first_violation_s == 0.4, "the checker's earlier violation stays the first"

    boot = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0)
    record_splats(boot, [Splat(OOPS.rstrip(), seen_at=99.0, after_load=False)])
    assert boot.first_violation_s is None and boot.by_kind == {}, "a splat before the load decides nothing"


# --- run_on_vm end to end, with a fake guest writing its console ------------------

class _Proc:
    def __init__(self, steps, console):
        self.steps, self.console = steps, console

    def lines(self):
        for step in self.steps:
            if isinstance(step, str):            # console text, written as the guest runs
                with open(self.console, "a") as f:
                    f.write(step)
                time.sleep(0.1)
            else:
                yield json.dumps(step)

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0

    def terminate(self):
        pass


class _Host:
    python, lab_root, bin_dir = "python3", "/opt/racelab", "/opt/racelab/bin"
    agent_python, agent_path = ("python3", "-S"), "/opt/racelab:/opt/racelab/site"

    def __init__(self, steps, console):
        self.steps, self.console = steps, console

    @contextmanager
    def spawn(self, argv, env=None):
        yield _Proc(self.steps, self.console)

    def cmd(self, argv, check=True, timeout=None):
        return type("R", (), {"stdout": "", "stderr": "", "returncode": 0})()


class _Guest:
    def __init__(self, tmp_path, steps):
        self.console_path = tmp_path / "console.log"
        self.console_path.write_text("")
        self.host = _Host(steps, self.console_path)

    def alive(self):
        return True


def _clean_run(packets=1_000_000):
    evs = [{"type": "topology", "at": 0.1}, {"type": "load-start", "at": 1.0},
           {"type": "sender", "sender_type": "ready", "at": 1.1}]
    evs += [{"type": "stats", "at": 1.0 + t, "rx": packets * t // 10, "violations": 0} for t in range(1, 11)]
    evs += [{"type": "done", "at": 11.1, "rx": packets, "violations": 0},
            {"type": "sender", "sender_type": "final", "at": 11.2, "sent": packets, "errors": 0},
            {"type": "agent-done", "at": 11.3, "reason": "duration", "load_seconds": 10.0}]
    return evs


def _run_on_vm(tmp_path, steps, stalls="note", stalls_why=""):
    from lab.fleet import run_on_vm
    from lab.session import Progress

    spec = agent_spec(scen.load("generic-rx-race"), duration=10, seed=1, bin_dir="/b", stop_on_first=False)
    return run_on_vm(_Guest(tmp_path, steps), "k", 0, spec, tmp_path, Progress(False),
                     threading.Lock(), io.StringIO(), stalls=stalls, stalls_why=stalls_why)


def _row(targets):
    from lab.session import rows_from_targets
    return rows_from_targets("k", targets, 12.0, 0.95, vms=len(targets))


def test_a_boot_warn_then_a_clean_run_is_not_reproduced(tmp_path):
    """Before: the boot WARNING was a kernel-splat violation and the row REPRODUCED."""
    evs = _clean_run()
    res = _run_on_vm(tmp_path, [BOOT, BOOT_WARN, *evs[:2], *evs[2:]])
    row = _row([res])
    assert row.verdict == "NOT REPRODUCED", row
    assert res.by_kind == {} and res.packets == 1_000_000
    assert len(res.pre_load_splats) == 1 and "racelab: boot-time warning for the test" in res.pre_load_splats[0]
    assert any(n.startswith("kernel splat before the load") for n in res.notes)


def test_a_guest_too_starved_for_dmesg_keeps_its_clean_verdict(tmp_path, monkeypatch):
    """Before: the checker's clean result was in, then `dmesg` could not open an SSH channel
    on a stalled guest, and the row became INCONCLUSIVE ("evidence lost")."""
    from lab.run import LostSSH

    def no_channel(self, argv, check=True, timeout=None):
        raise LostSSH("guest-0: cannot open an SSH session for dmesg: Timeout opening channel.")

    monkeypatch.setattr(_Host, "cmd", no_channel)
    res = _run_on_vm(tmp_path, [BOOT, *_clean_run()])
    assert res.infra_error is None and res.packets == 1_000_000
    assert "dmesg" not in res.evidence and res.evidence["console"].endswith("console.log")
    assert any(n.startswith("dmesg not fetched (guest-0: cannot open an SSH session") for n in res.notes), res.notes
    assert _row([res]).verdict == "NOT REPRODUCED"


def test_a_warn_during_the_load_of_a_clean_run_is_reproduced(tmp_path):
    evs = _clean_run()
    res = _run_on_vm(tmp_path, [BOOT, *evs[:5], WARNING, *evs[5:]])
    assert res.by_kind == {"kernel-splat": 1} and res.pre_load_splats == []
    assert _row([res]).verdict == "REPRODUCED"


def test_bug_on_without_a_panic_kills_the_checker_and_is_reproduced(tmp_path):
    """Before: "kernel BUG at" / "invalid opcode" matched nothing, the dead checker
    made the row INCONCLUSIVE."""
    evs = _clean_run()
    steps = [BOOT, *evs[:6], BUG_ON,
             {"type": "agent-error", "what": "checker", "returncode": -11, "stderr": [], "at": 5.2},
             {"type": "agent-done", "at": 5.3, "reason": "checker-exit", "load_seconds": 4.2}]
    res = _run_on_vm(tmp_path, steps)
    assert res.by_kind == {"kernel-splat": 1}
    text = res.violations[0]["text"]
    assert text.startswith("[   44.102000] ------------[ cut here ]")
    assert "\n[   44.102001] kernel BUG at net/xdp/xsk_queue.h:385!\n" in text
    assert "invalid opcode: 0000 [#1]" in text and "---[ end trace" in text, "one crash, one splat"
    assert res.infra_error is None and res.reason == "guest-crashed"
    assert _row([res]).verdict == "REPRODUCED"


def test_x86_trap_openers_are_splats_and_user_traps_are_not():
    found = []
    p = SplatParser(found.append, window=1e9)
    for line in ["[ 1.0] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
                 "[ 2.0] ---[ end trace 0000000000000000 ]---",
                 "[ 40.0] a line", "[ 41.0] b", "[ 42.0] c",
                 "[ 50.0] stack segment: 0000 [#1] PREEMPT SMP NOPTI",
                 "[ 50.1] ---[ end trace 0000000000000001 ]---",
                 "[ 60.0] PANIC: double fault, error_code: 0x0",
                 "[ 60.1] double fault: 0000 [#1] SMP",
                 "[ 60.2] ---[ end trace 0000000000000002 ]---",
                 "[ 70.0] general protection fault, probably for non-canonical address "
                 "0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI",
                 "[ 70.1] ---[ end trace 0000000000000003 ]---",
                 "[ 80.0] Unable to handle kernel NULL pointer dereference at virtual address 0"]:
        p.feed(line, 0.0)
    p.close()
    assert [s.first_line.split("] ", 1)[1][:16] for s in found] == [
        "invalid opcode: ", "stack segment: 0", "PANIC: double fa", "general protecti", "Unable to handle"]
    quiet = []
    p = SplatParser(quiet.append)
    for line in ["[ 9.0] traps: xskcheck[231] general protection fault ip:4011e6 sp:7ffd error:0 in xskcheck",
                 "[ 9.1] traps: xsksend[232] trap invalid opcode ip:401136 sp:7ffc error:0 in xsksend",
                 "[ 9.2] traps: a.out[233] trap stack segment ip:401136 sp:7ffc error:0 in a.out"]:
        p.feed(line, 0.0)
    p.close()
    assert quiet == [], "a user program's trap is its segfault, not the kernel's"


# --- stalls, and panics near them -------------------------------------------------

def test_a_panic_inside_a_stall_report_is_its_own_splat(tmp_path):
    """Before: the panic was folded into the stall's note."""
    seen = follow(tmp_path, BOOT, STALL + "[   37.0] Kernel panic - not syncing: Fatal exception\n")
    assert [splat_kind(t) for t in texts(seen)] == ["stall", "kernel-splat"]
    assert seen[1].first_line.startswith("[   37.0] Kernel panic")


def test_a_panic_shortly_after_a_stall_report_is_not_swallowed(tmp_path):
    """Before: a panic within 30 lines of any closed block was taken for its tail."""
    long_stall = STALL + "".join(f"[   36.7] rcu: stack line {i}\n" for i in range(80))
    seen = follow(tmp_path, BOOT, long_stall, "[   38.0] x\n[   38.1] Kernel panic - not syncing: Oops\n")
    assert [splat_kind(t) for t in texts(seen)] == ["stall", "kernel-splat"]


def test_a_panic_after_a_long_oops_is_still_that_oops():
    found = []
    p = SplatParser(found.append, window=1e9)
    p.feed("[ 1.0] BUG: unable to handle page fault for address: ffff", 0.0)
    for i in range(90):
        p.feed(f"[ 1.0] stack {i}", 0.0)
    p.feed("[ 1.1] Kernel panic - not syncing: Fatal exception in interrupt", 0.0)
    p.close()
    assert len(found) == 1


def test_expedited_stalls_and_workqueue_lockups_are_stalls(tmp_path):
    """Before: expedited stalls matched nothing; a workqueue lockup was a kernel-splat."""
    seen = follow(tmp_path, BOOT, EXPEDITED, load_after=0) + follow(tmp_path, BOOT, WQ_LOCKUP, load_after=0)
    assert len(seen) == 2 and [splat_kind(t) for t in texts(seen)] == ["stall", "stall"]
    res = TargetResult(label="k/vm-0", kernel="k", load_started_host=0.0)
    record_splats(res, seen, "note", "vm.stalls = auto: starved vCPUs under TCG stall on a fixed kernel too")
    assert res.by_kind == {} and len(res.notes) == 2
    assert "starved vCPUs under TCG" in res.notes[1] and "BUG: workqueue lockup" in res.notes[1]
    counted = TargetResult(label="k/vm-0", kernel="k", load_started_host=0.0)
    record_splats(counted, seen, "violation")
    assert counted.by_kind == {"kernel-splat": 2}
    # a panic the kernel raised because of a stall is that stall
    assert splat_kind("[ 9.0] Kernel panic - not syncing: softlockup: hung tasks") == "stall"


def test_a_bug_inside_a_stall_report_is_not_hidden_in_the_note(tmp_path):
    seen = follow(tmp_path, BOOT, STALL + "[   36.7] BUG: KASAN: use-after-free in xsk_flush+0x2c/0x40\n")
    assert [splat_kind(t) for t in texts(seen)] == ["stall", "kernel-splat"]


def test_stalls_are_notes_by_default_and_violations_on_request(tmp_path):
    seen = follow(tmp_path, BOOT, STALL, load_after=0)
    noted = TargetResult(label="k/vm-0", kernel="k")
    record_splats(noted, seen)                        # the scenario default, "note"
    assert noted.by_kind == {} and noted.violations == []
    assert "guest stall, not counted" in noted.notes[0]

    counted = TargetResult(label="k/vm-0", kernel="k")
    record_splats(counted, seen, stalls="violation")
    assert counted.by_kind == {"kernel-splat": 1} and counted.notes == []
    assert counted.violations[0]["text"].startswith("[   36.656669] rcu: INFO: rcu_sched self-detected stall")

    # a guest lost after a stall: infrastructure with "note", the kernel's crash with "violation"
    res = _lost()
    assert not crashed_of_splat(res, seen, traced=False) and res.infra_error
    res = _lost()
    assert crashed_of_splat(res, seen, traced=False, stalls="violation") and res.infra_error is None


def test_stall_policy_auto_counts_stalls_only_under_kvm_with_a_cpu_per_vcpu():
    for name in scen.available():
        assert scen.load(name)["vm"]["stalls"] == "auto"
    assert stall_policy("auto", "kvm")[0] == "violation" and stall_policy("auto", "tcg")[0] == "note"
    assert stall_policy("auto", "")[0] == "note", "an unknown accelerator is not trusted with stalls"
    assert stall_policy("note", "kvm")[0] == "note" and stall_policy("violation", "tcg")[0] == "violation"
    # the original hunt: 10 guests of 4 vCPUs on a host; here, 2 guests x 2 vCPUs on 2 CPUs
    policy, why = stall_policy("auto", "kvm", overcommit=True)
    assert policy == "note" and "overcommit" in why
    assert stall_policy("violation", "kvm", overcommit=True)[0] == "violation", "forced stays forced"
    assert stall_policy("auto", "host")[0] == "note"


def test_stall_policies_are_a_closed_set_the_scenario_schema_offers():
    assert [p.value for p in scen.Stalls] == ["auto", "note", "violation"]
    assert scen.SCHEMA["vm"]["stalls"].json == {"enum": ["auto", "note", "violation"]}
    assert stall_policy("auto", "kvm")[0] is scen.Stalls.VIOLATION
    with pytest.raises(ValueError):
        stall_policy("sometimes", "kvm")
    raw = scen.load("generic-rx-race").data
    assert scen.from_data(raw, path="generic-rx-race.toml",
                          overrides={"vm.stalls": "violation"})["vm"]["stalls"] == "violation"
    from lab.run import BadInput
    with pytest.raises(BadInput, match="vm.stalls"):
        scen.from_data(raw, path="generic-rx-race.toml", overrides={"vm.stalls": "count"})


def test_the_fleet_knows_which_hosts_its_vcpus_overcommit():
    from lab.fleet import overcommitted
    assert overcommitted(1, 2, ("a",), {"a": 2}) == set()
    assert overcommitted(2, 2, ("a",), {"a": 2}) == {"a"}
    assert overcommitted(3, 2, ("a", "b"), {"a": 4, "b": 2}) == set()   # a: guests 0 and 2, b: guest 1
    assert overcommitted(4, 2, ("a", "b"), {"a": 4, "b": 2}) == {"b"}


def test_a_stall_under_overcommitted_kvm_is_a_note_that_says_why(tmp_path):
    """Before: under KVM "auto" counted it, even with the lab's own overcommit note."""
    policy, why = stall_policy("auto", "kvm", overcommit=True)
    evs = _clean_run()
    res = _run_on_vm(tmp_path, [BOOT, *evs[:5], STALL, *evs[5:]], stalls=policy, stalls_why=why)
    assert res.by_kind == {}
    (note,) = [n for n in res.notes if n.startswith("guest stall")]
    assert "overcommit the host CPUs" in note
    assert _row([res]).verdict == "NOT REPRODUCED"


# --- a guest lost right after a splat ---------------------------------------------

def _lost(**kw):
    return TargetResult(label="k/vm-0", kernel="k", packets=1234, infra_error="LostSSH: connection lost",
                        timeline=[(1.0, 600, 0), (2.5, 1234, 0)], load_started_host=0.0, **kw)


def test_a_guest_lost_after_an_oops_crashed_of_the_kernel(tmp_path):
    seen = follow(tmp_path, BOOT, OOPS, load_after=0)
    res = _lost()
    assert crashed_of_splat(res, seen, traced=True, last_progress=seen[0].seen_at - 0.5)
    assert res.infra_error is None and res.reason == "guest-crashed"
    assert res.packets == 1234 and res.load_seconds == 2.5
    assert res.evidence == {"available": False, "note": "guest crashed: its flight recorder died with it"}
    assert "guest crashed" in res.notes[0] and "BUG: kernel NULL pointer dereference" in res.notes[0]


def test_a_guest_lost_without_a_splat_just_before_stays_an_infrastructure_loss(tmp_path):
    for chunks, load_after in (((BOOT,), 0), ((BOOT, STALL), 0), ((BOOT, OOPS), None)):
        seen = follow(tmp_path, *chunks, load_after=load_after)
        res = _lost()
        assert not crashed_of_splat(res, seen, traced=True), chunks[-1][:30]
        assert res.infra_error == "LostSSH: connection lost" and res.reason == ""
    # a WARN early in the load, then 50 s of stats, then the SSH session drops: not its crash
    early = [Splat(WARNING.rstrip(), seen_at=100.0, after_load=True)]
    res = _lost()
    assert not crashed_of_splat(res, early, traced=False, last_progress=100.0 + CRASH_WINDOW + 40)
    assert crashed_of_splat(_lost(), early, traced=False, last_progress=100.5)
    ok = _lost()
    ok.infra_error = None
    assert not crashed_of_splat(ok, early, traced=False, last_progress=100.5) and ok.reason == ""


# --- one crash, one splat, all of its text ---------------------------------------

CRASH = """\
[   21.649064] BUG: kernel NULL pointer dereference, address: 00000000000000c4
[   21.649064] #PF: supervisor read access in kernel mode
[   21.649064] #PF: error_code(0x0000) - not-present page
[   21.649064] PGD 0 P4D 0
[   21.649064] Oops: 0000 [#1] PREEMPT SMP NOPTI
[   21.649064] CPU: 1 PID: 0 Comm: swapper/1 Not tainted 6.1.192 #1
[   21.649064] RIP: 0010:__xsk_rcv_zc+0x16/0xc0
[   21.649064] Call Trace:
[   21.649064]  <IRQ>
[   21.649064]  xsk_generic_rcv+0x4f/0x90
[   21.649064]  </IRQ>
[   21.649064] Modules linked in: veth
[   21.649064] CR2: 00000000000000c4
[   21.649064] ---[ end trace 0000000000000000 ]---
[   21.649064] RIP: 0010:__xsk_rcv_zc+0x16/0xc0
[   21.649064] RSP: 0018:ffffc90000003d38 EFLAGS: 00010246
[   21.675722] Kernel panic - not syncing: Fatal exception in interrupt
[   21.675722] Kernel Offset: disabled
[   21.675722] ---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---
"""


def _warning(n):
    return (f"[   3{n}.000001] ------------[ cut here ]------------\n"
            f"[   3{n}.000002] WARNING: CPU: 0 PID: 9{n} at net/core/dev.c:100 f+0x1/0x2\n"
            f"[   3{n}.000003] Call Trace:\n"
            f"[   3{n}.000004] ---[ end trace 000000000000000{n} ]---\n")


def test_one_crash_is_one_splat_with_its_whole_text_across_reads(tmp_path):
    lines = CRASH.splitlines(keepends=True)
    # the console arrives in pieces, each read seeing only part of the oops
    seen = follow(tmp_path, BOOT, *["".join(lines[i:i + 3]) for i in range(0, len(lines), 3)])
    assert len(seen) == 1                       # BUG:, Oops: and the panic are one crash
    text = seen[0].text
    assert text.startswith("[   21.649064] BUG: kernel NULL pointer dereference")
    for later in ("Oops: 0000", "xsk_generic_rcv", "---[ end trace", "Kernel panic - not syncing",
                  "---[ end Kernel panic"):
        assert later in text, later
    assert splat_kind(text) == "kernel-splat"


def test_two_warnings_are_two_splats(tmp_path):
    seen = texts(follow(tmp_path, BOOT, _warning(1), _warning(2)))
    assert len(seen) == 2
    assert "PID: 91" in seen[0] and "PID: 92" in seen[1]
    assert "end trace 0000000000000001" in seen[0] and "PID: 92" not in seen[0]


def test_a_splat_without_an_end_is_closed_after_its_window(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("")
    seen = []
    with SplatWatcher(log, seen.append, interval=0.05, window=0.3):
        with open(log, "a") as f:
            f.write(STALL)
        deadline = time.monotonic() + 30        # the watcher's thread closes it after 0.3 s
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(seen) == 1                   # reported while the guest still runs
        with open(log, "a") as f:
            f.write("[   40.0] rcu: INFO: rcu_sched self-detected stall on CPU\n")
    assert len(seen) == 2


def test_a_panic_long_after_an_earlier_splat_is_its_own(tmp_path):
    later = "".join(f"[   5{i}.0] some line {i}\n" for i in range(40))
    seen = follow(tmp_path, _warning(1), later, "[   60.0] Kernel panic - not syncing: Attempted to kill init!\n")
    assert len(seen) == 2 and seen[1].text.startswith("[   60.0] Kernel panic")


# --- the netns backend: this machine's /dev/kmsg ----------------------------------

# /dev/kmsg records as read(2) returns them: "PRI,SEQ,USEC,FLAGS;text", dictionary lines after
KMSG_BOOT = "6,1,0,-;Linux version 6.18.0\n6,2,1000,-;Command line: root=/dev/vda\n"
KMSG_SETUP = ("4,900,5000000,-;------------[ cut here ]------------\n"
              "4,901,5000001,-;WARNING: CPU: 0 PID: 7 at net/core/filter.c:10 bpf_prog_x+0x1/0x2\n"
              "4,902,5000002,-;---[ end trace 0000000000000000 ]---\n")
KMSG_LOAD = ("6,903,6000000,-;veth0: entered promiscuous mode\n SUBSYSTEM=net\n DEVICE=n5\n"
             "14,904,6100000,-;racelab-test: WARNING: this line came from user space\n"
             "4,905,7000000,-;------------[ cut here ]------------\n"
             "4,906,7000001,-;WARNING: CPU: 1 PID: 812 at net/xdp/xsk.c:211 __xsk_rcv+0x1a/0x90\n"
             "4,907,7000002,-;Modules linked in: veth\\x0a(tab)\n"
             "4,908,7000003,-;---[ end trace 0000000000000001 ]---\n")


def test_kmsg_records_read_as_dmesg_prints_them():
    assert kmsg_line("4,906,7000001,-;WARNING: CPU: 1 PID: 812") == "[    7.000001] WARNING: CPU: 1 PID: 812"
    assert kmsg_line("4,907,12,-;a\\x0ab") == "[    0.000012] a\nb"
    assert kmsg_line(" SUBSYSTEM=net") is None and kmsg_line("garbage") is None
    assert kmsg_line("14,904,6100000,-;from user space") is None, "facility 1 (user) is not the kernel"
    assert kmsg_line("14,904,6100000,-;from user space", kernel_only=False) is not None


def _fds():
    return set(os.listdir("/proc/self/fd"))


def test_the_host_kernel_log_counts_splats_after_load_start_only(tmp_path):
    kmsg = tmp_path / "kmsg"            # a file stands in for /dev/kmsg: the host cannot WARN on demand
    kmsg.write_text(KMSG_BOOT)
    before = _fds()
    with KmsgWatcher(kmsg, interval=0.05) as w:
        assert len(_fds()) == len(before) + 1
        with open(kmsg, "a") as f:
            f.write(KMSG_SETUP)
        time.sleep(0.2)
        w.on_agent_event({"type": "load-start"})
        with open(kmsg, "a") as f:
            f.write(KMSG_LOAD)
        w.on_agent_event({"type": "stats"})
    assert _fds() == before, "the kernel log's fd is closed"
    assert [s.after_load for s in w.splats] == [False, True], "the boot is not read; set-up is before"
    assert not any("Linux version" in line for line in w.lines)
    res = TargetResult(label="local", kernel="host:6.18", load_started_host=w.splats[1].seen_at - 1)
    host_splats(res, w, "auto", traced=False, out=tmp_path)
    assert res.by_kind == {"kernel-splat": 1}
    assert "net/xdp/xsk.c:211" in res.violations[0]["text"] and "Modules linked in: veth\n(tab)" in \
        res.violations[0]["text"]
    assert "bpf_prog_x" in res.pre_load_splats[0]
    assert "user space" not in "".join(s.text for s in w.splats)
    log = (tmp_path / "evidence" / "host-kmsg.log").read_text()
    assert "[    7.000001] WARNING: CPU: 1" in log and res.evidence["kernel_log"].endswith("host-kmsg.log")


def test_a_host_without_a_readable_kernel_log_says_so(tmp_path):
    before = _fds()
    with KmsgWatcher(tmp_path / "no-such-kmsg") as w:
        pass
    assert _fds() == before and "cannot read" in w.unavailable
    res = TargetResult(label="local", kernel="host")
    host_splats(res, w, "auto", traced=False, out=tmp_path)
    assert res.by_kind == {} and "host kernel log not watched" in res.notes[0]


@pytest.mark.root
def test_the_real_dev_kmsg_is_read_from_its_end_and_closed():
    """The real /dev/kmsg: one record per read(2), seeked to its end.  The line is
    written with user facility, so no watcher in kernel_only mode (every racelab
    run) takes it for the kernel's."""
    marker = f"racelab-test {os.getpid()}-{time.time_ns()}: a user-space line, not a kernel warning"
    before = _fds()
    with KmsgWatcher(kernel_only=False, interval=0.05) as anything, KmsgWatcher(interval=0.05) as kernel:
        assert not anything.unavailable, anything.unavailable
        anything.on_agent_event({"type": "load-start"})
        with open("/dev/kmsg", "w") as f:
            f.write(f"<12>{marker} WARNING: CPU: 0\n")
        time.sleep(0.3)
    assert _fds() == before
    assert any(marker in line for line in anything.lines), anything.lines[-5:]
    assert [s.after_load for s in anything.splats if marker in s.text] == [True]
    assert not any(marker in line for line in kernel.lines)


@pytest.mark.root
def test_a_netns_run_watches_the_host_kernel_log(tmp_path):
    """racelab run --backend netns reads /dev/kmsg from before its load to its end:
    the log is kept as evidence, and on this fixed host kernel it holds no splat."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "lab.cli", "run", "generic-rx-race", "--backend", "netns",
                        "--duration", "3s", "--out", str(tmp_path)], cwd=root, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stdout + p.stderr
    (target,) = json.loads((tmp_path / "summary.json").read_text())["targets"]
    assert target["evidence"]["kernel_log"] == str(tmp_path / "evidence" / "host-kmsg.log")
    assert (tmp_path / "evidence" / "host-kmsg.log").exists()
    assert target["by_kind"] == {} and target["pre_load_splats"] == []
    assert not any("host kernel log not watched" in n for n in target["notes"])
