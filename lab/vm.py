"""One guest: a transient libvirt domain booted straight into a kernel, reached over SSH.

    with VM(kernel, image, name="vm-0", results_dir=out) as vm:
        vm.host.cmd(["uname", "-r"])

What a VM is made of (all of it removed on every exit path):
- a per-VM directory cache_dir()/vms/<domain>/ holding a qcow2 overlay over
  the shared raw image (the image itself is never written);
- a transient libvirt domain (createXML: nothing to undefine), q35, direct
  kernel boot (kernel, per-kernel initramfs for deb: kernels, cmdline);
- the serial console logged to <results_dir>/<name>.console.log;
- QEMU user networking through <qemu:commandline> (libvirt 9.0 has no passt):
  a virtio-net NIC at pcie.0 slot 0x10 and `hostfwd` 127.0.0.1:<free port> -> 22,
  with restrict=on so the guest can reach nothing but that forward;
- an SshHost (lab/remote.py) on that port, pinned to the image's host key.

Accelerator: KVM or TCG, as lab.accel decides it (a cached probe boot of the
kernel) when the caller does not say which.

Multiple URIs: a guest can live on any libvirt host (uri=qemu+ssh://HOST/system).
That host cannot see our files, so the boot kernel, initrd and image are
uploaded once into its "racelab" storage pool (volume names carry content
hashes), the overlay is a pool volume, the console (a pty there) is streamed
back into the local console file, and the guest's SSH forward (on that host's
127.0.0.1) is reached through `ssh -L` with the user's own SSH setup and the
URI's command=, keyfile= and no_verify=, as libvirt's qemu+ssh itself is
(tunnel_argv()).  lab.accel's KVM probe runs there through libvirt.  Tested through
qemu+unix:///system (the same API path without the tunnel) and through
qemu+ssh:// to a throwaway sshd on 127.0.0.1 (tests/test_remote_vm.py); what
is not done on remote hosts: libvirt's per-domain QEMU log is
not collected, and overlays of guests whose racelab died are reaped only
when that host's libvirtd still has their domain.

`python -m lab.vm run KERNEL -- CMD...` (`racelab vm run`) boots one guest, runs CMD, tears down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape, quoteattr

import libvirt

from lab import boot as bootmod
from lab import image as imagemod
from lab.accel import QEMU, Accel, detect_accel
from lab.libvirtd import (POOL_NAME, SYSTEM_URI, ConsoleStream, check_uri, connect,
                          ensure_libvirtd, is_local, overlay_volume, upload)
from lab.remote import SshHost
from lab.run import BadInput, InfraError, LostVM, cache_dir, require_tools, run, slug, spawn

__all__ = ["VM", "ensure_libvirtd", "reap_stale", "domain_xml", "DomainSpec"]

log = logging.getLogger("racelab.vm")

NS = "https://racelab.invalid/libvirt/vm/1"    # our <metadata> namespace
NIC_ADDR = "0x10"                              # free slot on q35's pcie.0
_counter = 0
_counter_lock = threading.Lock()


# --- the domain --------------------------------------------------------------------

@dataclass(frozen=True)
class DomainSpec:
    """Everything that goes into one domain's XML."""

    name: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    disk: Path                      # the qcow2 overlay
    backing: Path                   # the raw image under it
    console: Path | None            # serial log file; None: a pty (remote hosts stream it)
    ssh_port: int
    vcpus: int = 2
    memory_mib: int = 1024
    accel: Accel = Accel.TCG
    pin: tuple[str, ...] = ()       # host cpuset per vCPU (cycled), e.g. ("0", "1")
    title: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def domain_xml(s: DomainSpec) -> str:
    """libvirt XML for a racelab guest (pure: unit-tested without libvirt)."""
    a = quoteattr
    pins = ""
    if s.pin:
        pins = "<cputune>" + "".join(
            f"<vcpupin vcpu='{i}' cpuset={a(s.pin[i % len(s.pin)])}/>" for i in range(s.vcpus)
        ) + "</cputune>"
    meta = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in sorted(s.metadata.items()))
    initrd = f"<initrd>{escape(str(s.initrd))}</initrd>" if s.initrd else ""
    # TCG: libvirt 9.0 emits `-accel tcg`; QEMU >= 3.x turns MTTCG on by default
    # for x86 guests on x86 hosts (checked by VM.tcg_threads()).  The tb-cache
    # is capped so a fleet does not reserve 1 GiB of code cache per guest.
    if s.accel == Accel.KVM:
        dom_type, cpu, features = "kvm", "<cpu mode='host-passthrough'/>", "<acpi/>"
    else:
        dom_type, cpu = "qemu", "<cpu mode='maximum'/>"
        features = "<acpi/><tcg><tb-cache unit='MiB'>256</tb-cache></tcg>"
    if s.console is not None:
        serial = (f"<serial type='file'><source path={a(str(s.console))} append='off'/>"
                  "<target port='0'/></serial>")
    else:
        serial = "<serial type='pty'><target port='0'/></serial><console type='pty'/>"
    netdev = (f"user,id=racelabnet,restrict=on,"
              f"hostfwd=tcp:127.0.0.1:{s.ssh_port}-:22")
    # romfile= (none): SeaBIOS would otherwise load and run the NIC's iPXE option ROM
    # on every boot, for a guest that boots its kernel directly
    nic = f"virtio-net-pci,netdev=racelabnet,bus=pcie.0,addr={NIC_ADDR},romfile="
    return f"""<domain type='{dom_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(s.name)}</name>
  <title>{escape(s.title or s.name)}</title>
  <metadata><racelab:vm xmlns:racelab='{NS}'>{meta}</racelab:vm></metadata>
  <memory unit='MiB'>{s.memory_mib}</memory>
  <vcpu placement='static'>{s.vcpus}</vcpu>
  {pins}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(s.kernel))}</kernel>
    {initrd}
    <cmdline>{escape(s.cmdline)}</cmdline>
  </os>
  <features>{features}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file={a(str(s.disk))}/>
      <backingStore type='file'>
        <format type='raw'/>
        <source file={a(str(s.backing))}/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    {serial}
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value={a(netdev)}/>
    <qemu:arg value='-device'/>
    <qemu:arg value={a(nic)}/>
  </qemu:commandline>
</domain>
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _proc_start_time(pid: int) -> str:
    """Start time of a process (field 22 of /proc/PID/stat): pid + this is unique."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _ancestors(pid: int) -> list[int]:
    """pid's parent, grandparent, ... up to init (from /proc)."""
    chain: list[int] = []
    while pid > 1 and len(chain) < 64:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 0:
            break
        chain.append(pid)
    return chain


def _owner_meta(vm_dir: str) -> dict[str, str]:
    """Who made a domain: reap_stale() destroys it once that process is gone.
    lineage (the owner's ancestors) lets a test runner find the guests of the
    processes it started, even after they exited."""
    return {"pid": str(os.getpid()), "start": _proc_start_time(os.getpid()),
            "host": socket.gethostname(), "dir": vm_dir,
            "lineage": ",".join(str(p) for p in _ancestors(os.getpid()))}


def owner_of(dom: libvirt.virDomain) -> dict[str, str]:
    """The owner metadata of a racelab domain ({} for any other domain)."""
    try:
        meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS))
    except (libvirt.libvirtError, ET.ParseError):
        return {}
    return {c.tag: c.text or "" for c in meta}


def _owner_alive(pid: str, start: str, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's guest: not ours to judge
    return pid.isdigit() and _proc_start_time(int(pid)) == start


def _next_name() -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        return f"racelab-{os.getpid()}-{_counter}"


class VM:
    """A running guest as a context manager; see the module docstring."""

    def __init__(self, kernel: bootmod.KernelLike, image: imagemod.Image, *, name: str | None = None,
                 vcpus: int = 2, memory_mib: int = 1024, cmdline: str = "",
                 pin: Sequence[int | str] | None = None, results_dir: Path | None = None,
                 uri: str = SYSTEM_URI, accel: str | None = None,
                 ready_timeout: float | None = None) -> None:
        """kernel: a lab.kernels.kernel.KernelArtifact (bzimage, version, modules_dir,
        module_load_order); image: lab.image.ensure_image().
        name: label for logs, hostname and host.name; a name starting with
        "racelab-" is used as the domain name as is (it must carry the pid).
        pin: host CPU (or cpuset string) per vCPU, cycled; None: no pinning.
        results_dir: gets <name>.console.log and <name>.qemu.log; None keeps the
        console in the VM directory, which is removed at exit.
        accel: "kvm" | "tcg" | None (lab.accel.detect_accel()).  ready_timeout: seconds
        from start to SSH-ready (default 180 under TCG, 60 under KVM)."""
        problems = []
        if vcpus < 1:
            problems.append(f"vcpus must be >= 1, got {vcpus}")
        if memory_mib < 256:
            problems.append(f"memory_mib must be >= 256, got {memory_mib}")
        if accel is not None and accel not in tuple(Accel):
            problems.append(f"accel must be kvm, tcg or None (detect), got {accel!r}")
        if not Path(kernel.bzimage).is_file():
            problems.append(f"kernel image {kernel.bzimage} does not exist")
        if not Path(image.path).is_file():
            problems.append(f"guest image {image.path} does not exist")
        if pin is not None and len(pin) == 0:
            problems.append("pin must be None or a non-empty list of host CPUs")
        if problems:
            raise BadInput("bad VM settings:\n    " + "\n    ".join(problems))
        check_uri(uri)
        self.kernel = kernel
        self.image = image
        if name and name.startswith("racelab-"):
            self.domain_name = name  # the caller's racelab-<pid>-... name
        else:
            self.domain_name = _next_name() + (f"-{name}" if name else "")
        self.domain_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", self.domain_name)
        if (cache_dir() / "vms" / self.domain_name).exists():
            self.domain_name = f"{self.domain_name}-{_next_name().rsplit('-', 1)[1]}"
        self.name = name or self.domain_name
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.extra_cmdline = cmdline
        self.pin = tuple(str(p) for p in pin) if pin else ()
        self.results_dir = Path(results_dir) if results_dir else None
        self.uri = uri
        self.local = is_local(uri)
        self._stack = ExitStack()
        self.accel: str = Accel(accel) if accel else ""   # detected at boot when not given
        self.accel_reason = "requested by the caller" if accel else ""
        self.ready_timeout = ready_timeout
        self.dir = cache_dir() / "vms" / self.domain_name
        self.console_path = ((self.results_dir or self.dir) / f"{slug(self.name)}.console.log")
        self.port = 0
        self.boot_seconds = 0.0
        # host clock since the boot began: "domain" (libvirt and QEMU up), "marker" (init ready)
        self.phase_seconds: dict[str, float] = {}
        self.host: SshHost = None  # type: ignore[assignment]  # set by __enter__
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------

    def __enter__(self) -> VM:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        t0 = time.monotonic()
        self._conn = connect(self.uri)
        reap_stale(self._conn)
        if not self.accel:
            self.accel, self.accel_reason = detect_accel(self.kernel, self.uri)
        initrd = bootmod.initrd_for(self.kernel)
        boot_kernel = bootmod.kernel_for_boot(self.kernel)
        self.dir.mkdir(parents=True, exist_ok=False)
        (self.dir / "owner").write_text(json.dumps(self._owner()))
        self.console_path.parent.mkdir(parents=True, exist_ok=True)
        if self.local:
            require_tools("qemu-img", QEMU)
            disk, backing = self.dir / "root.qcow2", Path(self.image.path)
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                 str(backing), str(disk)])
            console: Path | None = self.console_path
        else:
            boot_kernel, initrd, disk, backing = self._place_remote(boot_kernel, initrd)
            console = None  # a pty, streamed back by ConsoleStream
        cmdline = " ".join(filter(None, [
            "console=ttyS0", "root=/dev/vda", "rw", f"init={imagemod.GUEST_INIT}",
            f"racelab.hostname={slug(self.name)[:63]}",
            "panic=-1",  # a panic reboots, on_reboot destroys: the host sees the loss at once
            # sshd blocks in getrandom() until the crng is seeded: seed it from
            # RDRAND and virtio-rng instead of waiting seconds for jitter entropy
            "random.trust_cpu=on",
            # the IO-APIC timer check is timed; a loaded host under TCG fails it and the
            # guest panics at boot ("IO-APIC + timer doesn't work!")
            "no_timer_check",
            *(bootmod.tcg_cmdline(self.kernel) if self.accel != Accel.KVM and self.local else []),
            self.extra_cmdline]))
        timeout = self._timeout = self.ready_timeout or (60.0 if self.accel == Accel.KVM else 180.0)
        last: Exception | None = None
        for _attempt in range(5):
            # Remote: a free port over there cannot be asked for; QEMU refuses a
            # taken one and we retry.
            self.port = _free_port() if self.local else random.randint(20000, 60999)
            spec = DomainSpec(
                name=self.domain_name, kernel=boot_kernel, initrd=initrd,
                cmdline=cmdline, disk=disk, backing=backing,
                console=console, ssh_port=self.port, vcpus=self.vcpus,
                memory_mib=self.memory_mib, accel=Accel(self.accel), pin=self.pin,
                title=f"racelab {self.name}", metadata=self._owner())
            flags = 0 if self.local else libvirt.VIR_DOMAIN_START_PAUSED
            try:
                self._dom = self._conn.createXML(domain_xml(spec), flags)
                break
            except libvirt.libvirtError as e:
                last = e
                msg = e.get_error_message() or str(e)
                if "hostfwd" in msg or "host forwarding" in msg:
                    log.debug("%s: port %d taken, retrying: %s", self.name, self.port, msg)
                    continue
                raise InfraError(f"{self.name}: libvirt could not start the guest: {msg}",
                                 hint=self._qemu_log_hint()) from None
        else:
            raise InfraError(f"{self.name}: no free SSH forward port after 5 tries: {last}")
        ssh_port = self.port
        self.phase_seconds["domain"] = time.monotonic() - t0   # libvirt and QEMU up
        if not self.local:
            console_stream = ConsoleStream(self._conn, self._dom, self.console_path)
            self._stack.callback(console_stream.stop)
            self._dom.resume()
            ssh_port = self._tunnel()
        log.debug("%s: domain %s started (%s), ssh on 127.0.0.1:%d", self.name,
                  self.domain_name, self.accel, ssh_port)
        self.host = SshHost(self.name, ssh_port, self.image.ssh_key, self.image.host_pubkey,
                            describe_loss=self.describe)
        self._wait_ready(t0 + timeout)
        self.phase_seconds["marker"] = time.monotonic() - t0   # firmware, kernel and init done
        self.host.connect(timeout=max(5.0, t0 + timeout - time.monotonic()))
        self.boot_seconds = time.monotonic() - t0
        log.debug("%s: ready in %.1fs", self.name, self.boot_seconds)

    def _place_remote(self, kernel: Path, initrd: Path | None
                      ) -> tuple[Path, Path | None, Path, Path]:
        """Upload what the guest boots from to the libvirt host (once per content)
        and make its overlay there: (kernel, initrd, disk, backing) as paths there."""
        assert self._conn is not None
        k = Path(upload(self._conn, kernel, f"kernel-{_file_sha(kernel)}"))
        i = Path(upload(self._conn, initrd, initrd.name)) if initrd else None
        backing = upload(self._conn, Path(self.image.path), Path(self.image.path).name)
        vol = overlay_volume(self._conn, f"{self.domain_name}.qcow2", backing,
                             self.image.size_bytes)
        self._stack.callback(_delete_volume, vol)
        return k, i, Path(vol.path()), Path(backing)

    def _tunnel(self) -> int:
        """For a libvirt host reached over SSH, forward a local port to its
        127.0.0.1:<guest port> the way libvirt reached that host (tunnel_argv()).
        Returns the port to connect to."""
        u = urlparse(self.uri)
        if not u.hostname:
            return self.port  # qemu+unix:// and friends: the forward is on this machine
        local = _free_port()
        argv = tunnel_argv(self.uri, local, self.port)
        require_tools(argv[0])
        proc = self._stack.enter_context(spawn(argv, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise InfraError(f"{self.name}: SSH tunnel to {u.hostname} failed: {err.strip()}",
                                 hint="racelab forwards the guest's SSH port with `ssh -L`; "
                                      "it needs the same passwordless SSH as qemu+ssh:// (with the "
                                      "URI's command=, keyfile= and no_verify=)")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", local)) == 0:
                    return local
            time.sleep(0.1)
        raise InfraError(f"{self.name}: SSH tunnel to {u.hostname} did not open in 30s")

    def _owner(self) -> dict[str, str]:
        return _owner_meta(str(self.dir))

    def _wait_ready(self, deadline: float) -> None:
        """Until the guest's init prints its ready marker (sshd listening)."""
        seen = 0
        tail = b""
        next_alive = 0.0
        while True:
            now = time.monotonic()
            try:
                with open(self.console_path, "rb") as f:
                    f.seek(seen)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                seen += len(chunk)
                tail = (tail + chunk)[-4096:]
                if imagemod.READY_MARKER.encode() in tail:
                    log.debug("%s: init ready marker on the console", self.name)
                    return
            if now >= next_alive:
                if not self.alive():
                    raise LostVM(f"{self.name}: the guest died while booting"
                                 + self._console_block(), hint=f"console: {self.console_path}")
                next_alive = now + 0.5
            if now >= deadline:
                raise LostVM(f"{self.name}: guest not ready after {self._timeout:.0f}s ({self.accel}; "
                             "no ready marker on the console)" + self._console_block(),
                             hint=f"console: {self.console_path}; a slow host? ready_timeout= "
                                  "raises the limit")
            time.sleep(0.05)

    def alive(self) -> bool:
        """Is the domain still running?  (False once destroyed or crashed.)"""
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False

    def destroy(self) -> None:
        """Kill the guest now (power cut).  close() still cleans up after it."""
        if self._dom is not None:
            try:
                self._dom.destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN,
                                              libvirt.VIR_ERR_OPERATION_INVALID):
                    raise InfraError(f"{self.name}: cannot destroy domain: {e}") from None

    def close(self) -> None:
        """Destroy the domain and remove everything this VM created.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Ctrl-C during cleanup must not leave a guest behind: finish first.
        old = _block_sigint()
        try:
            if self.host is not None:
                try:
                    self.host.close()
                except Exception as e:  # noqa: BLE001 - the guest may be gone already
                    log.debug("%s: closing SSH: %r", self.name, e)
            if self._dom is not None:
                try:
                    self.destroy()
                    if self._dom.isPersistent():
                        self._dom.undefine()
                except libvirt.libvirtError:
                    pass
                except InfraError as e:
                    log.warning("%s", e)
                self._dom = None
            try:
                self._stack.close()   # console stream, SSH tunnel, remote overlay
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log.warning("%s: cleanup: %s", self.name, e)
            if self.local:
                self._collect_qemu_log()
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
        finally:
            _restore_sigint(old)

    def _qemu_log(self) -> Path:
        return Path("/var/log/libvirt/qemu") / f"{self.domain_name}.log"

    def _collect_qemu_log(self) -> None:
        """libvirt keeps one log per domain name; ours are unique, so they would
        pile up.  Keep it with the results (if any), then remove it."""
        p = self._qemu_log()
        if not p.exists():
            return
        if self.results_dir is not None:
            try:
                shutil.copyfile(p, self.results_dir / f"{slug(self.name)}.qemu.log")
            except OSError:
                pass
        p.unlink(missing_ok=True)

    def _qemu_log_hint(self) -> str:
        p = self._qemu_log()
        try:
            tail = p.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        return "QEMU said: " + " | ".join(tail) if tail else f"see {p}"

    # --- diagnostics -----------------------------------------------------------

    def console_tail(self, lines: int = 40) -> str:
        try:
            with open(self.console_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def _console_block(self) -> str:
        tail = self.console_tail()
        return ("\n  console tail:\n    " + "\n    ".join(tail.splitlines())) if tail else ""

    def describe(self) -> str:
        """Domain state and console tail, for LostVM/LostSSH messages."""
        state = "running" if self.alive() else "gone (destroyed, crashed or powered off)"
        return f"  domain {self.domain_name}: {state}" + self._console_block()

    def tcg_threads(self) -> list[str]:
        """Names of QEMU's vCPU threads ("CPU 0/TCG"... under MTTCG), local only."""
        pid_file = Path("/run/libvirt/qemu") / f"{self.domain_name}.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return []
        names = []
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                names.append((t / "comm").read_text().strip())
            except OSError:
                pass
        return sorted(n for n in names if "CPU" in n)


def tunnel_argv(uri: str, local: int, guest_port: int) -> list[str]:
    """The `ssh -L` that forwards 127.0.0.1:local here to 127.0.0.1:guest_port on the
    host of a qemu+ssh:// URI, with the user's own ssh (their keys and config) and the
    URI's own ssh settings, read as libvirt's ssh transport reads them: command= is the
    ssh binary, keyfile= its -i, no_verify=1 its StrictHostKeyChecking=no.  So a host
    that libvirt reaches with `?keyfile=...` is tunnelled to with that key too."""
    u = urlparse(uri)
    if not u.hostname:
        raise BadInput(f"{uri!r} names no host to tunnel to")
    params = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    flag = params.get("no_verify", "0")
    if flag not in ("0", "1"):
        raise BadInput(f"bad libvirt URI {uri!r}: no_verify={flag!r}", hint="use no_verify=0 or no_verify=1")
    argv = [params.get("command") or "ssh", "-N", "-o", "ExitOnForwardFailure=yes",
            "-o", "BatchMode=yes", "-L", f"127.0.0.1:{local}:127.0.0.1:{guest_port}"]
    if u.port:
        argv += ["-p", str(u.port)]
    if params.get("keyfile"):
        argv += ["-i", params["keyfile"]]
    if flag == "1":
        argv += ["-o", "StrictHostKeyChecking=no"]
    argv += ["--", f"{u.username}@{u.hostname}" if u.username else u.hostname]
    return argv


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _delete_pool_volume(conn: libvirt.virConnect, name: str) -> None:
    """A remote guest's overlay, if this host's pool has one by that name."""
    try:
        conn.storagePoolLookupByName(POOL_NAME).storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass


def _delete_volume(vol: libvirt.virStorageVol) -> None:
    try:
        vol.delete(0)
    except libvirt.libvirtError as e:
        log.debug("cannot delete volume %s: %s", vol.name(), e)


def _block_sigint() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def _restore_sigint(old: Any) -> None:
    if old is not None:
        signal.signal(signal.SIGINT, old)


def reap_stale(conn: libvirt.virConnect | None = None) -> list[str]:
    """Destroy racelab domains and remove VM directories whose owning process
    is gone (a racelab killed with SIGKILL cannot clean up after itself)."""
    own = conn is None
    conn = conn or connect(SYSTEM_URI)
    removed: list[str] = []
    try:
        for dom in conn.listAllDomains():
            if not dom.name().startswith("racelab-"):
                continue
            owner = owner_of(dom)
            if not owner:
                continue  # not made by this module
            if _owner_alive(owner.get("pid", ""), owner.get("start", ""), owner.get("host", "")):
                continue
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
            _delete_pool_volume(conn, f"{dom.name()}.qcow2")
            removed.append(dom.name())
            log.info("removed stale guest %s (owner pid %s is gone)", dom.name(), owner.get("pid"))
    finally:
        if own:
            conn.close()
    vms = cache_dir() / "vms"
    for d in vms.glob("racelab-*") if vms.is_dir() else []:
        try:
            owner = json.loads((d / "owner").read_text())
        except (OSError, ValueError):
            try:
                if time.time() - d.stat().st_mtime < 60:
                    continue  # being created right now
            except FileNotFoundError:
                continue      # removed right now, by the guest's own teardown
            owner = {}
        if not _owner_alive(owner.get("pid", ""), owner.get("start", ""), owner.get("host", "")):
            shutil.rmtree(d, ignore_errors=True)
            Path(f"/var/log/libvirt/qemu/{d.name}.log").unlink(missing_ok=True)
    return removed


# --- standalone ------------------------------------------------------------------

@dataclass(frozen=True)
class BareKernel:
    """A bzImage with its drivers built in (no modules), for `python -m lab.vm`."""

    bzimage: Path
    version: str = "?"
    modules_dir: Path | None = None
    module_load_order: tuple[str, ...] = ()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.vm ...` is `racelab vm ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.vm", argv)


if __name__ == "__main__":
    sys.exit(main())
