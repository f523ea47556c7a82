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
