"""The kernel-splat detector: a console log followed as the guest writes it."""
import time

from lab.fleet import SplatWatcher, splat_kind

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
STALL = """\
[   36.656669] rcu: INFO: rcu_sched self-detected stall on CPU
[   36.656669] rcu: 	0-...!: (5185 ticks this GP) idle=9184/1/0x4000000000000000 softirq=1170/1170 fqs=0
[   36.656669] rcu: rcu_sched kthread starved for 5250 jiffies! g1409 f0x0 RCU_GP_WAIT_FQS(5)
"""


def follow(tmp_path, *chunks):
    log = tmp_path / "console.log"
    log.write_text("")
    seen = []
    with SplatWatcher(log, seen.append, interval=0.05):
        for c in chunks:
            with open(log, "a") as f:
                f.write(c)
            time.sleep(0.2)
    return seen


def test_a_clean_boot_log_is_silent(tmp_path):
    assert follow(tmp_path, BOOT, BOOT) == []


def test_a_warning_fires_with_its_context(tmp_path):
    seen = follow(tmp_path, BOOT, WARNING[:40], WARNING[40:])   # split mid-line, as a console writes
    assert len(seen) == 1
    assert seen[0].startswith("[   12.000002] WARNING: CPU: 1") and "Modules linked in" in seen[0]
    assert splat_kind(seen[0]) == "kernel-splat"


def test_a_stall_is_seen_but_counted_as_a_note(tmp_path):
    seen = follow(tmp_path, BOOT, STALL)
    assert len(seen) == 1 and splat_kind(seen[0]) == "stall"
    assert splat_kind("[ 1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [ksoftirqd/0:15]") == "stall"
    assert splat_kind("[ 1.0] BUG: KASAN: use-after-free in xsk_flush+0x2c/0x40") == "kernel-splat"


OOPS = """\
[   21.649064] BUG: kernel NULL pointer dereference, address: 00000000000000c4
[   21.649064] RIP: 0010:__xsk_rcv_zc+0x16/0xc0
[   21.675722] Kernel panic - not syncing: Fatal exception in interrupt
"""


def _lost(**kw):
    from lab.workload import TargetResult
    return TargetResult(label="k/vm-0", kernel="k", packets=1234, infra_error="LostSSH: connection lost",
                        timeline=[(1.0, 600, 0), (2.5, 1234, 0)], **kw)


def test_a_guest_lost_after_an_oops_crashed_of_the_kernel(tmp_path):
    from lab.fleet import crashed_of_splat
    seen = follow(tmp_path, BOOT, OOPS)
    res = _lost()
    assert crashed_of_splat(res, seen, traced=True)
    assert res.infra_error is None and res.reason == "guest-crashed"
    assert res.packets == 1234 and res.load_seconds == 2.5
    assert res.evidence == {"available": False, "note": "guest crashed: its flight recorder died with it"}
    assert "guest crashed" in res.notes[0]


def test_a_guest_lost_without_a_splat_or_after_a_stall_stays_an_infrastructure_loss(tmp_path):
    from lab.fleet import crashed_of_splat
    for chunks in ((BOOT,), (BOOT, STALL)):
        res = _lost()
        assert not crashed_of_splat(res, follow(tmp_path, *chunks), traced=True)
        assert res.infra_error == "LostSSH: connection lost" and res.reason == ""
    ok = _lost()
    ok.infra_error = None
    assert not crashed_of_splat(ok, [OOPS], traced=False) and ok.reason == ""


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
    text = seen[0]
    assert text.startswith("[   21.649064] BUG: kernel NULL pointer dereference")
    for later in ("Oops: 0000", "xsk_generic_rcv", "---[ end trace", "Kernel panic - not syncing",
                  "---[ end Kernel panic"):
        assert later in text, later
    assert splat_kind(text) == "kernel-splat"


def test_two_warnings_are_two_splats(tmp_path):
    seen = follow(tmp_path, BOOT, _warning(1), _warning(2))
    assert len(seen) == 2
    assert "PID: 91" in seen[0] and "PID: 92" in seen[1]
    assert "end trace 0000000000000001" in seen[0] and "PID: 92" not in seen[0]


def test_a_bug_inside_a_stall_report_is_not_hidden_in_the_note(tmp_path):
    seen = follow(tmp_path, BOOT, STALL + "[   36.7] BUG: KASAN: use-after-free in xsk_flush+0x2c/0x40\n")
    assert [splat_kind(t) for t in seen] == ["stall", "kernel-splat"]


def test_a_splat_without_an_end_is_closed_after_its_window(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("")
    seen = []
    with SplatWatcher(log, seen.append, interval=0.05, window=0.3):
        with open(log, "a") as f:
            f.write(STALL)
        time.sleep(0.6)
        assert len(seen) == 1                   # reported while the guest still runs
        with open(log, "a") as f:
            f.write("[   40.0] rcu: INFO: rcu_sched self-detected stall on CPU\n")
    assert len(seen) == 2


def test_a_panic_long_after_an_earlier_splat_is_its_own(tmp_path):
    later = "".join(f"[   5{i}.0] some line {i}\n" for i in range(40))
    seen = follow(tmp_path, _warning(1), later, "[   60.0] Kernel panic - not syncing: Attempted to kill init!\n")
    assert len(seen) == 2 and seen[1].startswith("[   60.0] Kernel panic")


# --- [vm] stalls = "auto" | "note" | "violation" -------------------------------------

def test_stalls_are_notes_by_default_and_violations_on_request(tmp_path):
    from lab.fleet import crashed_of_splat, record_splats
    from lab.workload import TargetResult

    seen = follow(tmp_path, BOOT, STALL)
    noted = TargetResult(label="k/vm-0", kernel="k")
    record_splats(noted, seen)                        # the scenario default, "note"
    assert noted.by_kind == {} and noted.violations == []
    assert "guest stall, not counted" in noted.notes[0]

    counted = TargetResult(label="k/vm-0", kernel="k")
    record_splats(counted, seen, stalls="violation")
    assert counted.by_kind == {"kernel-splat": 1} and counted.notes == []
    assert counted.violations[0]["text"].startswith("[   36.656669] rcu: INFO: rcu_sched self-detected stall")
    assert splat_kind(seen[0], "violation") == "kernel-splat"

    # a guest lost after a stall: infrastructure with "note", the kernel's crash with "violation"
    res = _lost()
    assert not crashed_of_splat(res, seen, traced=False) and res.infra_error
    res = _lost()
    assert crashed_of_splat(res, seen, traced=False, stalls="violation") and res.infra_error is None


def test_the_shipped_scenarios_count_stalls_under_kvm_only():
    from lab import scenario
    from lab.fleet import stall_policy
    for name in scenario.available():
        assert scenario.load(name)["vm"]["stalls"] == "auto"
    assert stall_policy("auto", "kvm") == "violation" and stall_policy("auto", "tcg") == "note"
    assert stall_policy("auto", "") == "note", "an unknown accelerator is not trusted with stalls"
    assert stall_policy("note", "kvm") == "note" and stall_policy("violation", "tcg") == "violation"
    raw = scenario.load("generic-rx-race").data
    assert scenario.from_data(raw, path="generic-rx-race.toml",
                              overrides={"vm.stalls": "violation"})["vm"]["stalls"] == "violation"
    import pytest
    from lab.run import BadInput
    with pytest.raises(BadInput, match="vm.stalls"):
        scenario.from_data(raw, path="generic-rx-race.toml", overrides={"vm.stalls": "count"})


def test_a_splat_after_load_start_times_the_first_violation(tmp_path):
    """A guest that oopses before the checker reports anything still has a time to
    first violation: the splat's, from when the console watcher read it."""
    from lab.fleet import record_splats
    from lab.workload import TargetResult

    seen = follow(tmp_path, BOOT, OOPS)
    res = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0)
    record_splats(res, seen, seen_at=[102.5])
    assert res.by_kind == {"kernel-splat": 1} and res.first_violation_s == 2.5

    early = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0, first_violation_s=0.4)
    record_splats(early, seen, seen_at=[102.5])
    assert early.first_violation_s == 0.4, "the checker's earlier violation stays the first"

    boot = TargetResult(label="k/vm-0", kernel="k", load_started_host=100.0)
    record_splats(boot, seen, seen_at=[99.0])
    assert boot.first_violation_s is None, "a splat before the load is not timed against it"

    unstarted = TargetResult(label="k/vm-0", kernel="k")
    record_splats(unstarted, seen, seen_at=[102.5])
    assert unstarted.first_violation_s is None and unstarted.by_kind == {"kernel-splat": 1}
