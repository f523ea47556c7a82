"""VM lifecycle and SSH: unit tests (domain XML, remote command lines), then real
guests through a real libvirtd (marked vm + slow; TCG here, KVM where it works).

The vm tests need root, libvirtd/virtlogd/qemu and kernels:
  - a Debian kernel (deb:6.1.0-47-amd64, fetched with apt on first use);
  - the catalog kernel 6.1.192 if it is cached (`racelab kernel build 6.1.192`);
    RACELAB_TEST_BUILD=1 or RACELAB_ALL_TESTS=1 (tests/run-all) builds it here
    (~15 min) instead of skipping.
After every vm test no racelab domain or VM directory of this process or its
children is left (the autouse fixture in conftest.py checks).
"""
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import pytest

from lab import image as imagemod
from lab import vm as vmmod
from lab.remote import SshHost
from lab.run import BadInput, CommandFailed, InfraError, LostSSH, LostVM, project_root

DEB_KERNEL = "deb:6.1.0-47-amd64"
SOURCE_KERNEL = "6.1.192"


# --- unit: domain XML ----------------------------------------------------------------

def _spec(**kw):
    base = dict(name="racelab-1-1", kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.gz"),
                cmdline="console=ttyS0 root=/dev/vda", disk=Path("/v/root.qcow2"),
                backing=Path("/i/racelab.img"), console=Path("/r/vm.console.log"), ssh_port=40022,
                metadata={"pid": "1", "start": "2", "host": "h", "dir": "/v"})
    base.update(kw)
    return vmmod.DomainSpec(**base)


def test_domain_xml_tcg_with_user_net_forward_and_console():
    xml = vmmod.domain_xml(_spec())
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.find("os/kernel").text == "/k/vmlinux"
    assert root.find("os/initrd").text == "/k/initrd.gz"
    assert root.find("os/type").get("machine") == "q35"
    assert root.find("devices/serial/source").get("path") == "/r/vm.console.log"
    assert root.find("devices/disk/source").get("file") == "/v/root.qcow2"
    assert root.find("devices/disk/backingStore/source").get("file") == "/i/racelab.img"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert "user,id=racelabnet,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22" in args
    assert "virtio-net-pci,netdev=racelabnet,bus=pcie.0,addr=0x10,romfile=" in args   # no iPXE ROM to run
    assert root.find("cputune") is None
    assert root.find("on_reboot").text == "destroy"     # panic=-1 -> gone -> LostVM
    assert root.find("seclabel/label").text == "+0:+0"
    assert root.find("features/tcg/tb-cache") is not None


def test_domain_xml_kvm_pinning_and_no_initrd():
    root = ET.fromstring(vmmod.domain_xml(_spec(accel="kvm", initrd=None, vcpus=4, pin=("0", "1"))))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("os/initrd") is None
    pins = [(p.get("vcpu"), p.get("cpuset")) for p in root.findall("cputune/vcpupin")]
    assert pins == [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]


def test_domain_xml_escapes_the_cmdline():
    root = ET.fromstring(vmmod.domain_xml(_spec(cmdline="a=<b> c='d' & e")))
    assert root.find("os/cmdline").text == "a=<b> c='d' & e"


def test_remote_command_line_quotes_and_sets_pythonpath():
    h = SshHost("g", 1, Path("/nonexistent"), "ssh-ed25519 AAAA")
    line = h.command_line(["echo", "a b", "$HOME", "it's"], env={"X": "1 2"})
    out = subprocess.run(["sh", "-c", line.replace("exec env", "exec env -u RACELAB_NONE", 1)],
                         capture_output=True, text=True)
    assert out.stdout == "a b $HOME it's\n"
    assert out.stderr.startswith("racelab-pgid ")
    assert "PYTHONPATH=/opt/racelab:/opt/racelab/site" in line
    with pytest.raises(BadInput, match="bad environment variable name 'BAD NAME'"):
        h.command_line(["true"], env={"BAD NAME": "x"})


def test_pinning_spreads_guests_over_host_cpus():
    from lab.fleet import overcommit_notes, pin_map
    # two 2-vCPU guests on a 4-CPU host: disjoint CPUs, not both on 0 and 1
    assert [pin_map(g, 2, 4) for g in range(2)] == [[0, 1], [2, 3]]
    # a third wraps around; one 4-vCPU guest on 2 CPUs overcommits them twice
    assert pin_map(2, 2, 4) == [0, 1]
    assert pin_map(0, 4, 2) == [0, 1, 0, 1]
    assert [pin_map(g, 1, 3) for g in range(4)] == [[0], [1], [2], [0]]
    cpus = {"qemu:///system": 2}
    assert overcommit_notes(1, 2, ("qemu:///system",), cpus) == []
    (note,) = overcommit_notes(2, 2, ("qemu:///system",), cpus)
    assert "4 vCPUs on 2 host CPUs" in note
    # guests alternate between URIs: 3 guests on two hosts = 2 + 1
    two = {"a": 4, "b": 2}
    assert overcommit_notes(3, 2, ("a", "b"), two) == []
    assert len(overcommit_notes(4, 2, ("a", "b"), two)) == 1


def test_owner_lineage_names_the_processes_that_started_the_owner():
    out = subprocess.run([sys.executable, "-c", "from lab.vm import _owner_meta; "
                          "print(_owner_meta('')['lineage'])"],
                         cwd=project_root(), capture_output=True, text=True, check=True).stdout
    assert str(os.getpid()) in out.strip().split(",")
    assert vmmod._owner_meta("")["lineage"].split(",")[0] == str(os.getppid())


def test_the_tunnel_reaches_a_host_as_libvirt_does_with_the_uris_ssh_settings(tmp_path):
    argv = vmmod.tunnel_argv("qemu+ssh://lab2/system", 5000, 2222)
    assert argv == ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                    "-L", "127.0.0.1:5000:127.0.0.1:2222", "--", "lab2"]
    key = tmp_path / "a key"
    key.write_text("")   # ssh drops an -i file that does not exist
    uri = f"qemu+ssh://root@lab2:2200/system?keyfile={quote(str(key))}&no_verify=1&command=/opt/ssh"
    argv = vmmod.tunnel_argv(uri, 5000, 2222)
    assert argv[0] == "/opt/ssh" and argv[-2:] == ["--", "root@lab2"]
    assert argv[argv.index("-i") + 1] == str(key) and argv[argv.index("-p") + 1] == "2200"
    assert "StrictHostKeyChecking=no" in argv
    assert "StrictHostKeyChecking=no" not in vmmod.tunnel_argv(uri.replace("no_verify=1", "no_verify=0"), 1, 2)
    with pytest.raises(Exception, match="no_verify"):
        vmmod.tunnel_argv(uri.replace("no_verify=1", "no_verify=yes"), 1, 2)
    if shutil.which("ssh"):
        # what OpenSSH itself makes of that command line (-G: print the settings, connect nowhere)
        out = subprocess.run(["ssh", "-G", *argv[1:]], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        conf = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if " " in line}
        assert conf["user"] == "root" and conf["hostname"] == "lab2" and conf["port"] == "2200"
        assert f"identityfile {key}" in lines and conf["stricthostkeychecking"] == "false"
        assert conf["localforward"] == "[127.0.0.1]:5000 [127.0.0.1]:2222"
        assert conf["batchmode"] == "yes" and conf["exitonforwardfailure"] == "yes"


def _fleet_that_raises(monkeypatch, tmp_path, exc, uris=("qemu:///system",)):
    from contextlib import contextmanager

    from lab import fleet, scenario
    from lab.config import RunConfig
    from lab.session import Progress

    @contextmanager
    def booted(*a, **kw):
        raise exc
        yield  # unreachable: a generator, as the real one

    monkeypatch.setattr(fleet, "booted", booted)
    monkeypatch.setattr(fleet, "host_cpus", lambda uri: 2)
    s = scenario.load("generic-rx-race")
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", kernels=("a", "b"), vms=1,
                    uris=uris)
    return fleet.run_fleets(cfg, s, ["a", "b"], [object(), object()], None, tmp_path, Progress(False))


def test_a_bad_input_in_a_fleet_thread_aborts_the_run_with_its_message(monkeypatch, tmp_path):
    from lab.run import BadInput
    with pytest.raises(BadInput, match="no such knob"):
        _fleet_that_raises(monkeypatch, tmp_path, BadInput("no such knob"))
    with pytest.raises(ZeroDivisionError):           # a bug is raised, not a row "no packets"
        _fleet_that_raises(monkeypatch, tmp_path, ZeroDivisionError("bug"))
    runs = _fleet_that_raises(monkeypatch, tmp_path, LostVM("guest died while booting"))
    assert [t.infra_error for kr in runs for t in kr.targets] == \
        ["LostVM: guest died while booting"] * 2
    # two 2-vCPU guests on 2 host CPUs: every target says so
    assert all(any("4 vCPUs on 2 host CPUs" in n for n in t.notes) for kr in runs for t in kr.targets)
    # where each guest was to run is kept even when it never booted: guests take the URIs in turn
    assert [kr.uris for kr in runs] == [{"a/vm-0": "qemu:///system"}, {"b/vm-0": "qemu:///system"}]
    runs = _fleet_that_raises(monkeypatch, tmp_path, LostVM("gone"), uris=("qemu:///system", "qemu+ssh://h/system"))
    assert [kr.uris for kr in runs] == [{"a/vm-0": "qemu:///system"}, {"b/vm-0": "qemu+ssh://h/system"}]


# --- vm tier ---------------------------------------------------------------------------

def _libvirt_ready() -> str | None:
    missing = [t for t in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "virsh")
               if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install libvirt-daemon libvirt-clients " \
               "qemu-system-x86 qemu-utils (or ./bootstrap install)"
    return None


@pytest.fixture(scope="module")
def image():
    if os.geteuid() != 0:
        pytest.skip("needs root: run as root (sudo ./bootstrap test)")
    why = _libvirt_ready()
    if why:
        pytest.skip(why)
    return imagemod.ensure_image(progress=False)


@pytest.fixture(scope="module")
def deb_kernel(image):
    from lab.kernels import kernel
    try:
        return kernel.ensure(kernel.resolve(DEB_KERNEL), progress=False)
    except Exception as e:  # noqa: BLE001 - no mirror, no dpkg-deb: name it and skip
        pytest.skip(f"no Debian kernel {DEB_KERNEL}: {e}")


@pytest.fixture(scope="module")
def source_kernel(image):
    from lab.kernels import kernel
    build = os.environ.get("RACELAB_ALL_TESTS") or os.environ.get("RACELAB_TEST_BUILD")
    if not kernel.show(SOURCE_KERNEL)["cached"] and not build:
        pytest.skip(f"catalog kernel {SOURCE_KERNEL} is not built: `racelab kernel build "
                    f"{SOURCE_KERNEL}` (or RACELAB_TEST_BUILD=1 to build it here, ~15 min; "
                    "tests/run-all, which sets RACELAB_ALL_TESTS, always builds it)")
    return kernel.ensure(kernel.resolve(SOURCE_KERNEL), progress=False)


def _check_boot(vm: vmmod.VM, version: str) -> None:
    assert vm.host.cmd(["uname", "-r"]).stdout.strip() == version
    assert imagemod.READY_MARKER in vm.console_path.read_text(errors="replace")
    assert vm.accel in ("kvm", "tcg") and vm.accel_reason
    assert vm.boot_seconds > 0
    if vm.accel == "tcg":
        # MTTCG: one host thread per vCPU ("CPU n/TCG"), not one "ALL CPUs/TCG"
        assert vm.tcg_threads() == [f"CPU {i}/TCG" for i in range(vm.vcpus)]


@pytest.mark.vm
@pytest.mark.slow
def test_boot_debian_kernel_and_run_uname(deb_kernel, image, tmp_path):
    with vmmod.VM(deb_kernel, image, name="deb", results_dir=tmp_path) as vm:
        _check_boot(vm, deb_kernel.version)
        assert vm.console_path.parent == tmp_path
    assert (tmp_path / "deb.qemu.log").exists()


@pytest.mark.vm
@pytest.mark.slow
def test_boot_catalog_source_kernel_and_run_uname(source_kernel, image, tmp_path):
    with vmmod.VM(source_kernel, image, name="src", results_dir=tmp_path) as vm:
        _check_boot(vm, source_kernel.version)
        _check_init(vm, "src", "10.0.2.15/24")      # no initramfs: the kernel runs the init itself


def _check_init(vm: vmmod.VM, host: str, cidr: str) -> None:
    """PID 1 is the static C init (csrc/racelab-init.c), and it did the shell init's job."""
    h = vm.host
    # a script's PID 1 would be /bin/sh running it: the executable itself is the init
    assert h.cmd(["readlink", "/proc/1/exe"]).stdout.strip().endswith("/racelab-init")
    assert h.cmd(["head", "-c", "4", imagemod.GUEST_INIT]).stdout == "\x7fELF"
    marker = re.search(r"racelab-init: ready host=(\S+) nic=(\S+) uptime=\d+\.\d\ds\r?$",
                       vm.console_path.read_text(errors="replace"), re.M)
    assert marker and marker.group(1) == host, "no ready marker in the script's format"
    assert h.cmd(["hostname"]).stdout.strip() == host
    addrs = h.cmd(["ip", "-4", "-o", "addr", "show", "dev", marker.group(2)]).stdout
    assert f"inet {cidr} " in addrs and " brd " not in addrs       # what `ip addr add` made
    assert "UP" in h.cmd(["ip", "-o", "link", "show", "lo"]).stdout
    mounts = {line.split()[1]: line.split()[2] for line in h.cmd(["cat", "/proc/mounts"]).stdout.splitlines()}
    for target, fstype in (("/proc", "proc"), ("/dev", "devtmpfs"), ("/dev/pts", "devpts"), ("/run", "tmpfs"),
                           ("/sys/kernel/tracing", "tracefs"), ("/sys/kernel/debug", "debugfs")):
        assert mounts.get(target) == fstype, (target, mounts.get(target))
    # sshd: started by PID 1 with the shell init's umask (its environ is not readable:
    # sshd writes its process title over it)
    sshd = h.cmd(["pgrep", "-o", "-x", "sshd"]).stdout.strip()
    status = h.cmd(["cat", f"/proc/{sshd}/status"]).stdout
    assert re.search(r"^PPid:\s+1$", status, re.M) and re.search(r"^Umask:\s+0022$", status, re.M)
    assert h.cmd(["test", "-f", "/run/racelab/sshd.log"], check=False).returncode == 0


@pytest.mark.vm
@pytest.mark.slow
def test_the_c_init_takes_hostname_and_address_from_the_cmdline(deb_kernel, image, tmp_path):
    # /25, not QEMU's /24: the address must come from racelab.ip= (hostfwd still reaches .15)
    with vmmod.VM(deb_kernel, image, name="init-check", results_dir=tmp_path,
                  cmdline="racelab.ip=10.0.2.15/25") as vm:
        _check_init(vm, "init-check", "10.0.2.15/25")


@pytest.mark.vm
@pytest.mark.slow
def test_guest_killed_mid_command_is_infrastructure_loss(deb_kernel, image, tmp_path):
    with vmmod.VM(deb_kernel, image, name="victim", results_dir=tmp_path) as vm:
        with vm.host.spawn(["sh", "-c", "echo started; exec sleep 300"]) as p:
            lines = p.lines()
            assert next(lines) == "started"
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", vm.domain_name],
                           check=True, capture_output=True)
            with pytest.raises(LostVM) as e:
                list(lines)
            assert isinstance(e.value, LostSSH)
            assert "gone" in str(e.value)         # the VM's state is in the message
        assert not vm.alive()
        with pytest.raises(LostVM):
            vm.host.cmd(["true"])


@pytest.mark.vm
@pytest.mark.slow
def test_host_protocol_over_ssh(deb_kernel, image, tmp_path):
    with vmmod.VM(deb_kernel, image, name="proto", results_dir=tmp_path, vcpus=2) as vm:
        h = vm.host
        assert (h.python, h.lab_root, h.bin_dir) == ("python3", "/opt/racelab", "/opt/racelab/bin")
        r = h.cmd(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        with pytest.raises(CommandFailed) as e:
            h.cmd(["false"])
        assert e.value.returncode == 1
        assert h.cmd(["cat"], input="fed to stdin\n").stdout == "fed to stdin\n"
        # the lab and pyroute2 import in the guest (PYTHONPATH and the .pth file)
        r = h.cmd([h.python, "-c", "import lab.agent.run, pyroute2; print(lab.agent.run.__file__)"])
        assert r.stdout.strip() == "/opt/racelab/lab/agent/run.py"
        # ... and with the agent's own interpreter (no site module: PYTHONPATH only)
        r = h.cmd(["env", f"PYTHONPATH={h.agent_path}", *h.agent_python, "-c",
                   "import sys, lab.agent.topology as t; t._iproute_class(); print(sys.flags.no_site)"])
        assert r.stdout.strip() == "1"
        # put/get keep bytes and mode
        src = tmp_path / "payload"
        src.write_bytes(os.urandom(300_000))
        src.chmod(0o751)
        h.put(src, "/tmp/payload")
        assert h.cmd(["stat", "-c", "%a %s", "/tmp/payload"]).stdout.split() == ["751", "300000"]
        h.get("/tmp/payload", tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
        # spawn streams stdout live: the first line arrives while the command still runs.  The
        # command waits (up to 60 s) for a file made only once "one" was read: had the output
        # come at the end, it would say "late" instead of "two" (no timing, so no flake on a
        # loaded host)
        wait_go = "echo one; i=0; while [ ! -e /tmp/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; " \
                  "[ -e /tmp/go ] && echo two || echo late"
        with h.spawn(["sh", "-c", wait_go], env={"RL": "x"}) as p:
            it = p.lines()
            assert next(it) == "one"
            assert p.poll() is None
            h.cmd(["touch", "/tmp/go"])
            assert list(it) == ["two"] and p.wait(10) == 0
        # terminate() kills the whole remote process group
        with h.spawn(["sh", "-c", "sleep 4242 & sleep 4243 & wait"]) as p:
            _wait_for(lambda: h.cmd(["pgrep", "-f", "^sleep 424"], check=False).stdout.count("\n") == 2)
            p.terminate()
            assert p.wait(10) < 0
        assert h.cmd(["pgrep", "-f", "^sleep 424"], check=False).stdout == ""
        # leaving spawn() without waiting also kills the group
        with h.spawn(["sleep", "4244"]):
            _wait_for(lambda: h.cmd(["pgrep", "-f", "^sleep 4244"], check=False).returncode == 0)
        assert h.cmd(["pgrep", "-f", "^sleep 4244"], check=False).returncode == 1
        # a timeout kills the command and says so
        t0 = time.monotonic()
        with pytest.raises(CommandFailed, match="timed out"):
            h.cmd(["sleep", "4245"], timeout=2)
        assert time.monotonic() - t0 < 10
        assert h.cmd(["pgrep", "-f", "^sleep 4245"], check=False).returncode == 1
        # a wrong pinned host key is rejected at once, not retried
        other = SshHost("impostor", vm.port, image.ssh_key,
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        t0 = time.monotonic()
        with pytest.raises(InfraError, match="host key mismatch"):
            other.connect(timeout=30)
        assert time.monotonic() - t0 < 10
        # PID 1 reaps orphans: no zombie after a double fork
        h.cmd(["sh", "-c", "(sleep 0.1 &) ; true"])
        time.sleep(1)
        assert " Z" not in h.cmd(["ps", "-eo", "pid,stat"]).stdout


def _wait_for(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


@pytest.mark.vm
@pytest.mark.slow
def test_interrupt_at_any_point_leaves_nothing(deb_kernel, image, tmp_path, monkeypatch):
    # Ctrl-C inside the with block
    with pytest.raises(KeyboardInterrupt), vmmod.VM(deb_kernel, image, name="int1", results_dir=tmp_path):
        raise KeyboardInterrupt
    # Ctrl-C while the guest boots (domain defined, not ready yet)
    def interrupted(self, deadline):
        assert self.alive()
        raise KeyboardInterrupt
    monkeypatch.setattr(vmmod.VM, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt), vmmod.VM(deb_kernel, image, name="int2", results_dir=tmp_path):
        pass


@pytest.mark.vm
@pytest.mark.slow
def test_guest_that_cannot_boot_is_lost_vm_with_its_console(deb_kernel, image, tmp_path):
    with (pytest.raises(LostVM) as e,
          vmmod.VM(deb_kernel, image, name="broken", results_dir=tmp_path, cmdline="init=/does-not-exist")):
        pass
    assert "/does-not-exist" in str(e.value)    # the console tail explains why


@pytest.mark.vm
@pytest.mark.slow
def test_two_guests_boot_in_parallel_with_distinct_ports(deb_kernel, image, tmp_path):
    vms: list = []
    errors: list = []

    def boot(i):
        try:
            vms.append(vmmod.VM(deb_kernel, image, name=f"par{i}", results_dir=tmp_path).__enter__())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len({v.port for v in vms}) == 2
        assert {v.host.cmd(["hostname"]).stdout.strip() for v in vms} == {"par0", "par1"}
    finally:
        for v in vms:
            v.close()


def test_uri_kinds():
    from lab.libvirtd import check_uri, is_local
    assert is_local("qemu:///system")
    assert not is_local("qemu+ssh://lab2/system") and not is_local("qemu+unix:///system")
    with pytest.raises(Exception, match="QEMU"):
        check_uri("xen:///system")


@pytest.mark.vm
@pytest.mark.slow
def test_guest_through_the_remote_path(deb_kernel, image, tmp_path):
    """qemu+unix:// takes the code path of a remote host (uploads, pool overlay,
    streamed console), without needing a second machine."""
    import libvirt

    from lab.libvirtd import POOL_NAME
    uri = "qemu+unix:///system"
    with vmmod.VM(deb_kernel, image, name="remote", results_dir=tmp_path, uri=uri) as vm:
        assert not vm.local
        assert vm.host.cmd(["uname", "-r"]).stdout.strip() == deb_kernel.version
        text = vm.console_path.read_text(errors="replace")
        assert text.startswith("[    0.000000] Linux version")   # streamed from the first line
        assert imagemod.READY_MARKER in text
        overlay = f"{vm.domain_name}.qcow2"
        conn = libvirt.open(uri)
        try:
            pool = conn.storagePoolLookupByName(POOL_NAME)
            assert overlay in pool.listVolumes()
        finally:
            conn.close()
    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
        pool.refresh(0)
        assert overlay not in pool.listVolumes()
    finally:
        conn.close()


@pytest.mark.vm
@pytest.mark.slow
def test_cli_vm_run_streams_output_and_returns_the_exit_status(deb_kernel, image):
    """`racelab vm run K -- CMD` as a user types it: output, exit status, nothing left behind."""
    p = subprocess.Popen([sys.executable, "-m", "lab.cli", "vm", "run", DEB_KERNEL, "--",
                          "sh", "-c", "uname -r; echo to-stderr >&2; exit 7"],
                         cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(project_root())})
    out, err = p.communicate(timeout=600)
    assert p.returncode == 7, err[-2000:]
    assert out.splitlines()[-1] == deb_kernel.version, out
    assert "to-stderr" in err
    # the accelerator and why: "tcg (kvm unusable: ...)", "kvm (KVM probe booted ...)"
    assert re.search(r"accelerator: (tcg \(kvm unusable: |tcg \(forced|kvm \()", err), err[-2000:]
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert [n for n in names if n.startswith(f"racelab-{p.pid}-")] == []


# --- guests lost in the middle of a scenario -------------------------------------------

def _domains(prefix: str) -> list[str]:
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                           capture_output=True, text=True, check=True).stdout.split()
    return [n for n in names if n.startswith(prefix)]


@pytest.mark.vm
@pytest.mark.slow
def test_a_paused_guest_is_an_infrastructure_loss_not_a_clean_run(source_kernel, image, tmp_path,
                                                                   monkeypatch):
    """A guest that hangs but stays "running" for libvirt (here: paused) is found by
    the silence watchdog, reported as lost, and its domain still destroyed."""
    import libvirt

    from lab import fleet, scenario
    from lab.config import RunConfig
    from lab.verdict import INCONCLUSIVE

    s = scenario.load("generic-rx-race", {"vm.silence": "20s"})
    cfg = RunConfig(scenario=s.name, scenario_data=s.data, backend="vm", kernels=(SOURCE_KERNEL,),
                    duration=60.0, vms=1, out=str(tmp_path / "out"))
    paused: dict = {}
    real = fleet.run_target

    def run_target(host, spec, **kw):
        inner = kw["on_event"]

        def on_event(label, ev):
            inner(label, ev)
            if ev.get("type") == "load-start":
                paused["load"] = True
            elif ev.get("type") == "stats" and paused.get("load") and "at" not in paused \
                    and "error" not in paused:
                # the guest's own domain (host.name), not a prefix search: another test on
                # this worker may have a domain of the same process going at the same time
                try:
                    conn = libvirt.open("qemu:///system")
                    try:
                        conn.lookupByName(host.name).suspend()
                    finally:
                        conn.close()
                except Exception as e:  # noqa: BLE001 - said by the assertion below
                    paused["error"] = repr(e)
                    raise
                paused["at"] = time.monotonic()
                paused["name"] = host.name
        kw["on_event"] = on_event
        return real(host, spec, **kw)

    monkeypatch.setattr(fleet, "run_target", run_target)
    outcome = fleet.run_vm(cfg, progress=False)
    (t,) = outcome.targets
    assert "at" in paused, (f"the guest was not paused: {paused}; the target ended with "
                            f"reason={t.reason!r} infra_error={t.infra_error!r} notes={t.notes}")
    lost_after = time.monotonic() - paused["at"]
    assert t.infra_error and "guest stopped answering (no output for 20 s)" in t.infra_error
    assert outcome.rows[0].verdict == INCONCLUSIVE
    assert lost_after < 60          # found by the watchdog, not by the end of the 60 s run
    assert _domains(paused["name"]) == []


@pytest.mark.vm
@pytest.mark.slow
def test_a_guest_killed_mid_scenario_is_infrastructure_loss_through_the_cli(source_kernel, image,
                                                                            tmp_path):
    """`racelab run --backend vm --vms 2` with one guest destroyed mid-run: that
    target is lost, the other finishes, the row is INCONCLUSIVE and the exit is 3."""
    import json
    import signal

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", "generic-rx-race", "--backend", "vm",
                          "--kernel", SOURCE_KERNEL, "--vms", "2", "--duration", "40s", "--out", str(out)],
                         cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(project_root())})
    try:
        deadline = time.monotonic() + 400
        victim = None
        while victim is None:
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "vm-1 never started its load"
            time.sleep(0.5)
            try:
                events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()
                          if x.strip()]
            except (OSError, ValueError):
                continue
            if any(e.get("type") == "stats" and e.get("target") == f"{SOURCE_KERNEL}/vm-1"
                   for e in events):
                (victim,) = [n for n in _domains(f"racelab-{p.pid}-") if n.endswith("-1")]
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", victim], check=True,
                       capture_output=True)
        stdout, stderr = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)    # its own teardown; the autouse fixture checks
            p.communicate(timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    targets = {t["label"]: t for t in summary["targets"]}
    lost, ok = targets[f"{SOURCE_KERNEL}/vm-1"], targets[f"{SOURCE_KERNEL}/vm-0"]
    assert lost["infra_error"] and "Lost" in lost["infra_error"], lost["infra_error"]
    assert ok["infra_error"] is None and ok["packets"] > 0
    assert summary["rows"][0]["verdict"] == "INCONCLUSIVE"
    assert "NOT REPRODUCED" not in stdout
    assert p.returncode == 3, stderr[-3000:]
    assert _domains(f"racelab-{p.pid}-") == []


@pytest.mark.vm
@pytest.mark.slow
def test_bench_boot_interrupted_while_guests_boot_leaves_none(deb_kernel, image):
    import signal

    # SIGINT as a terminal gives it: a runner that started us in the background (bash's `&`
    # ignores SIGINT) would pass that on, and a Python started with SIGINT ignored never
    # raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, str(project_root() / "bench" / "boot"), "--kernel", DEB_KERNEL,
                          "--boots", "0", "--fleet", "2"],
                         cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: len(_domains(f"racelab-{p.pid}-")) == 2 or p.poll() is not None, 300)
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert _domains(f"racelab-{p.pid}-") == []


def test_one_slug_for_file_and_domain_names():
    from lab.run import slug
    assert slug("6.1.192+revert-generic-rx/vm 3") == "6.1.192_revert-generic-rx_vm_3"
    long = "k" * 60
    assert slug(long) == long and slug(long, 40) == "k" * 40


def test_reap_skips_a_guest_directory_removed_while_it_looks(monkeypatch, tmp_path):
    """Another guest's teardown removes its directory between the glob and the look at its
    age (a dangling link stands in for that moment): the reap goes on, and a VM start
    that reaps first is not failed by someone else's teardown."""
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path))
    vms = tmp_path / "vms"
    vms.mkdir()
    (vms / "racelab-1-pytest-0").symlink_to(tmp_path / "gone")
    stale = vms / "racelab-2-x-0"
    stale.mkdir()
    import json
    (stale / "owner").write_text(json.dumps({**vmmod._owner_meta(""), "pid": "999999999"}))   # gone

    class Conn:
        def listAllDomains(self):
            return []

    assert vmmod.reap_stale(Conn()) == []
    assert not stale.exists(), "a dead owner's directory still goes"
