"""xskamp, the run-time race-window amplifier, on a real kernel with kprobes: the lab's
6.1.192 in a guest (this host's kernel has none).

The probe sits on getppid(), a syscall path the test drives itself from the guest's
python3, at the first instruction after the __fentry__ call: a kprobe there traps (int3)
like the one at the veth race window, where +0 would be an ftrace-based probe.

Needs root, libvirtd and the catalog kernel 6.1.192 (`racelab kernel build 6.1.192`, or
RACELAB_TEST_BUILD=1 / RACELAB_ALL_TESTS=1 to build it here).  Run under the VM lock:
  flock /tmp/racelab-vm.lock .venv/bin/python -m pytest tests/test_amplifier_vm.py -m "vm or slow"
"""
import json
import os
import shutil

import pytest

from lab import image as imagemod
from lab import vm as vmmod

KERNEL = "6.1.192"
# __x64_sys_getppid in the lab's 6.1.192: +0 is `call __fentry__` (5 bytes), so +5 is an
# instruction boundary that traps and +1 is inside the call.
PROBE = "__x64_sys_getppid+5"
INSIDE = "__x64_sys_getppid+1"
OPT = "/proc/sys/debug/kprobes-optimization"
CALLS = 4000

# ns per getppid() call, over n calls (the list comprehension keeps the interpreter's own
# share small under TCG)
GETPPID = ("import os, sys, time; n = int(sys.argv[1]); g = os.getppid; t = time.perf_counter_ns(); "
           "[g() for _ in range(n)]; print((time.perf_counter_ns() - t) / n)")


@pytest.fixture(scope="module")
def kernel6():
    if os.geteuid() != 0:
        pytest.skip("needs root: run as root (sudo ./bootstrap test)")
    missing = [t for t in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "virsh")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install libvirt-daemon libvirt-clients "
                    "qemu-system-x86 qemu-utils (or ./bootstrap install)")
    from lab.kernels import kernel
    build = os.environ.get("RACELAB_ALL_TESTS") or os.environ.get("RACELAB_TEST_BUILD")
    if not kernel.show(KERNEL)["cached"] and not build:
        pytest.skip(f"catalog kernel {KERNEL} is not built: `racelab kernel build {KERNEL}` "
                    "(or RACELAB_TEST_BUILD=1 to build it here, ~15 min)")
    return kernel.ensure(kernel.resolve(KERNEL), progress=False)


@pytest.fixture(scope="module")
def image(kernel6):
    return imagemod.ensure_image(progress=False)


def per_call_ns(host, calls: int = CALLS) -> float:
    return float(host.cmd([host.python, "-c", GETPPID, str(calls)], timeout=300).stdout)


def amplified(host, *args: str, calls: int = CALLS) -> tuple[dict, float, dict, str]:
    """Start xskamp with args, time getppid() under it, stop it with SIGTERM:
    (ready, ns per call, done, the sysctl's value while the probes stood)."""
    with host.spawn([f"{host.bin_dir}/xskamp", *args, "--stats-ms", "500"]) as p:
        lines = p.lines()
        ready = None
        for line in lines:
            if line.startswith("{") and json.loads(line)["type"] == "ready":
                ready = json.loads(line)
                break
        assert ready is not None, f"xskamp {' '.join(args)} did not start: {p.stderr_text()}"
        during = host.cmd(["cat", OPT]).stdout.strip()
        ns = per_call_ns(host, calls)
        p.terminate()
        events = [json.loads(x) for x in lines if x.startswith("{")]
        assert p.wait(30) == 0, p.stderr_text()
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 1, events
    assert any(e["type"] == "stats" for e in events) or done[0]["t"] < 0.5
    return ready, ns, done[0], during


def refused(host, *args: str) -> tuple[int, str, str]:
    r = host.cmd([f"{host.bin_dir}/xskamp", *args, "--duration", "5"], check=False, timeout=60)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.vm
@pytest.mark.slow
def test_xskamp_counts_delays_refuses_and_restores_in_a_guest(kernel6, image, tmp_path):
    with vmmod.VM(kernel6, image, name="amp", results_dir=tmp_path, vcpus=2) as vm:
        h = vm.host
        assert h.cmd(["cat", OPT]).stdout.strip() == "1"
        base = per_call_ns(h)

        # (a) the probe alone: every call is a hit, on the CPUs it ran on
        ready, plain, done, during = amplified(h, "--probe", PROBE)
        assert ready["probes"] == [{"probe": "__x64_sys_getppid+0x5", "cpus": 2, "hold": False}]
        assert (ready["method"], ready["delay_ns"], ready["loop"]) == ("kprobe", 0, None)
        assert ready["optimisation_was"] == "1" and during == "0"
        assert len(done["hits"]) == 2 and sum(done["hits"]) == done["hits_total"]
        assert done["hits_total"] >= CALLS
        assert done["runs"] == 0 and done["optimisation_restored"] is True
        # (c) the sysctl is back after SIGTERM
        assert h.cmd(["cat", OPT]).stdout.strip() == "1"

        # (a) with a 20 us busy-wait, through either loop: the calls really slow down
        for loop in ("bpf_loop", "bounded"):
            ready, slow, done, during = amplified(h, "--probe", PROBE, "--delay-ns", "20000", "--loop", loop)
            assert (ready["method"], ready["loop"], ready["delay_ns"]) == ("kprobe-delay", loop, 20000)
            assert during == "0"
            assert done["hits_total"] >= CALLS
            # the program runs once per hit on any CPU (attached to one per-CPU event only)
            assert CALLS <= done["runs"] <= done["hits_total"] * 1.1, done
            assert done["capped"] == 0
            # a host that preempts the vCPU thread mid-wait makes a few waits of
            # milliseconds: the average is only loosely bound, most waits tightly
            assert 20000 <= done["waited_ns_avg"] <= 5 * 20000, done
            assert done["waited_under_2n"] >= 0.5 * done["runs"], done
            assert slow >= 5 * base, f"{loop}: {slow:.0f} ns per call with the delay, {base:.0f} without"
            assert slow > plain
            assert h.cmd(["cat", OPT]).stdout.strip() == "1"

        # (b) probes the kernel refuses: exit 2 before the run, naming the probe and why
        rc, out, err = refused(h, "--probe", INSIDE, "--delay-ns", "1000")
        assert rc == 2 and out == ""
        assert "__x64_sys_getppid+0x1" in err and "not an instruction boundary" in err, err
        rc, out, err = refused(h, "--probe", "racelab_no_such_function+0")
        assert rc == 2 and out == ""
        assert "no such symbol racelab_no_such_function" in err, err
        # (c) the error paths restore the sysctl too
        assert h.cmd(["cat", OPT]).stdout.strip() == "1"


# a process that stays inside clock_nanosleep() (time.sleep) on CPU 1 for 3 s: the gate's
# "inside" flag is
# per CPU, set by the entry probe and cleared by the return probe
SLEEPER = "import os, time; os.sched_setaffinity(0, {1}); time.sleep(120)"


@pytest.mark.vm
@pytest.mark.slow
def test_the_gate_waits_only_while_another_cpu_is_inside_the_gate_function(kernel6, image, tmp_path):
    """--gate SYM: the delay program waits only while another CPU is inside SYM (the veth
    race's interleaving is a receive while another CPU is in veth_poll()); any other hit
    passes at once, still counted."""
    with vmmod.VM(kernel6, image, name="gate", results_dir=tmp_path, vcpus=2) as vm:
        h = vm.host
        pin0 = ("import os, sys, time; os.sched_setaffinity(0, {0}); n = int(sys.argv[1]); "
                "g = os.getppid; [g() for _ in range(n)]")
        args = ["--probe", PROBE, "--delay-ns", "20000", "--gate", "__x64_sys_clock_nanosleep",
                "--stats-ms", "500"]

        def run(with_sleeper: bool, *more: str, calls: str = pin0) -> dict:
            with h.spawn([f"{h.bin_dir}/xskamp", *args, *more]) as p:
                lines = p.lines()
                ready = next(json.loads(x) for x in lines if x.startswith("{") and '"ready"' in x)
                assert ready["gate"] == "__x64_sys_clock_nanosleep", ready
                if with_sleeper:
                    with h.spawn([h.python, "-c", SLEEPER]) as s:
                        import time
                        time.sleep(1.0)                  # it is inside clock_nanosleep() on CPU 1 now
                        # (and stays there until stopped: a loaded host once took the 3 s it
                        # slept to start the guest's python for the calls, which then never waited)
                        h.cmd([h.python, "-c", calls, "2000"], timeout=300)
                        s.terminate()
                        s.wait(30)
                else:
                    h.cmd([h.python, "-c", calls, "2000"], timeout=300)
                p.terminate()
                events = [json.loads(x) for x in lines if x.startswith("{")]
                assert p.wait(30) == 0, p.stderr_text()
            return next(e for e in events if e["type"] == "done")

        alone = run(False)
        assert alone["hits_total"] >= 2000, alone
        assert alone["runs"] < 50, alone            # nobody inside clock_nanosleep elsewhere: (almost) no waits
        held = run(True)
        assert held["hits_total"] >= 2000, held
        assert held["runs"] >= 1000, held           # CPU 1 inside clock_nanosleep: the calls on CPU 0 wait
        assert held["waited_under_2n"] >= 0.5 * held["runs"], held
        # --hold: a probe that waits on every hit, gate or not (the veth race's flushing side):
        # nobody inside clock_nanosleep, and each of 2,000 getpid() calls waits all the same
        getpid = pin0.replace("os.getppid", "os.getpid")
        hold = run(False, "--hold", "__x64_sys_getpid+0", "--hold-ns", "10000", calls=getpid)
        by = {b["probe"]: b for b in hold["by_probe"]}
        assert by["__x64_sys_getpid+0x0"]["hold"] is True and by["__x64_sys_getpid+0x0"]["hits_total"] >= 2000, hold
        assert by["__x64_sys_getppid+0x5"]["hold"] is False, hold
        assert hold["runs"] >= 2000 and hold["waited_ns_avg"] >= 10000, hold
        assert h.cmd(["cat", OPT]).stdout.strip() == "1"
