"""Which accelerator a guest runs on: KVM where it really boots the kernel, else TCG.

    accel, why = detect_accel(kernel, uri)   # (Accel.KVM or Accel.TCG, a sentence)

Why a probe and not a look at /dev/kvm: a /dev/kvm that opens is not a KVM that
boots a stock kernel.  Nested or paravirtual KVMs hang a guest before its /init,
or QEMU dies on an assertion in its KVM code; a guest configured for KVM there
would fail only after its whole boot timeout, every time.  So KVM is chosen only
once a probe has booted this very kernel under it, into a tiny initramfs
(lab.boot.probe_initrd) that prints lab.boot.PROBE_MARKER on the serial console
within PROBE_TIMEOUT.  Anything else is TCG, QEMU's emulation with one host thread
per vCPU (MTTCG): slower, but it boots everywhere.  The reason goes with the
answer, and accel_text() words it for the log ("tcg (kvm unusable: <why>)").

- This host (qemu:///system): no /dev/kvm, or one this process may not open, is
  TCG at once; otherwise QEMU itself is started with `-accel kvm`.
- Another libvirt host (qemu+ssh://...): TCG if its libvirt offers no kvm domain;
  otherwise the kernel and the probe initrd are uploaded to its pool and booted
  there as a transient kvm domain whose console is streamed back.  That domain
  is named and owned the way lab.vm names its guests, so a later reap_stale() on
  that host removes it if this process dies during the probe.

A probe costs a boot, so its result is cached in cache_dir()/accel.json (written
under its lock and replaced atomically, through lab.cache), keyed by what
decides it: here the kernel (its artifact key, else a hash of its bytes) and the
QEMU version; on another host that host's identity (its libvirt host UUID, so
two URIs to one host share a probe), the kernel and the QEMU version its libvirt
reports.  An answer from the cache says "(cached probe)"; a new kernel or a new
QEMU is probed again.  RACELAB_ACCEL=kvm|tcg overrides all of it.

Moved out of lab/vm.py, which keeps the guest's life cycle and asks this
module once per guest.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from lab import boot as bootmod
from lab.libvirtd import SYSTEM_URI, ConsoleStream, connect, is_local, upload
from lab.run import BadInput, cache_dir, require_tools, run, spawn

__all__ = ["Accel", "detect_accel", "accel_text", "QEMU"]

log = logging.getLogger("racelab.accel")

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 20.0                           # a KVM guest reaches /init in ~1 s


class Accel(enum.StrEnum):
    """How QEMU runs a guest: KVM where it really boots the kernel, else TCG (emulation)."""

    KVM = "kvm"
    TCG = "tcg"


def kernel_key(kernel: bootmod.KernelLike) -> str:
    """A stable identity for a kernel artifact (its cache key, else its bytes)."""
    key = getattr(kernel, "key", None)
    if key:
        return str(key)
    return hashlib.sha256(Path(kernel.bzimage).read_bytes()).hexdigest()[:24]


_qemu_versions: dict[tuple[str, float], str] = {}


def qemu_version() -> str:
    """QEMU's version (part of the accelerator probe's cache key), asked once
    per binary: under load even `--version` costs a few hundred ms."""
    require_tools(QEMU)
    binary = shutil.which(QEMU) or QEMU
    key = (binary, os.stat(binary).st_mtime)
    if key not in _qemu_versions:
        out = run([QEMU, "--version"]).stdout
        m = re.search(r"version (\S+)", out)
        _qemu_versions[key] = m.group(1) if m else out.strip().splitlines()[0]
    return _qemu_versions[key]


def detect_accel(kernel: bootmod.KernelLike, uri: str = SYSTEM_URI) -> tuple[Accel, str]:
    """("kvm" | "tcg", why).  KVM only if it really boots this kernel."""
    forced = os.environ.get("RACELAB_ACCEL", "").strip().lower()
    if forced:
        if forced not in tuple(Accel):
            raise BadInput(f"RACELAB_ACCEL={forced!r}", hint="use kvm or tcg")
        return Accel(forced), f"forced by RACELAB_ACCEL={forced}"
    if not is_local(uri):
        return _remote_accel(kernel, uri)
    if not os.path.exists("/dev/kvm"):
        return Accel.TCG, "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel.TCG, "/dev/kvm is not accessible (not root, not in group kvm?)"
    key = f"{kernel_key(kernel)}|qemu-{qemu_version()}"
    cached = _accel_cache_get(key)
    if cached:
        return Accel(cached[0]), f"{cached[1]} (cached probe)"
    accel, reason = _probe_kvm(kernel)
    _accel_cache_put(key, (accel, reason))
    # debug: a run names its accelerator once (lab.fleet), not once per kernel probed
    log.debug("accelerator for kernel %s: %s (%s)", getattr(kernel, "version", "?"), accel, reason)
    return accel, reason


def accel_text(accel: str, reason: str) -> str:
    """ "tcg (kvm unusable: <why>)", "kvm (<how the probe went>)", or the bare name."""
    if not reason:
        return accel
    if accel == Accel.TCG and not reason.startswith(("forced", "requested")):
        return f"tcg (kvm unusable: {reason})"
    return f"{accel} ({reason})"


def _probe_kvm(kernel: bootmod.KernelLike) -> tuple[Accel, str]:
    """Boot the kernel under KVM into a tiny initramfs that prints a marker."""
    import tempfile

    initrd = bootmod.probe_initrd()
    with tempfile.TemporaryDirectory(prefix="racelab-kvm-probe-") as d:
        console = Path(d) / "console"
        console.touch()
        argv = [QEMU, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256",
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-serial", f"file:{console}", "-kernel", str(kernel.bzimage),
                "-initrd", str(initrd), "-append", "console=ttyS0 rdinit=/init panic=-1 quiet"]
        t0 = time.monotonic()
        with spawn(argv, stdout=subprocess.DEVNULL, grace=2) as proc:
            while time.monotonic() - t0 < PROBE_TIMEOUT:
                if bootmod.PROBE_MARKER in console.read_text(errors="replace"):
                    return Accel.KVM, f"KVM probe booted the kernel in {time.monotonic() - t0:.1f}s"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                    if bootmod.PROBE_MARKER in console.read_text(errors="replace"):
                        return Accel.KVM, f"KVM probe booted the kernel in {time.monotonic() - t0:.1f}s"
                    return Accel.TCG, f"QEMU cannot use KVM: {(err or ['exited'])[-1]}"
                time.sleep(0.1)
    return Accel.TCG, (f"KVM probe did not reach the kernel's /init in {PROBE_TIMEOUT:.0f}s "
                   "(a nested or paravirtual KVM that hangs stock kernels)")


def _remote_accel(kernel: bootmod.KernelLike, uri: str) -> tuple[Accel, str]:
    """The KVM probe on another libvirt host, through libvirt itself: upload the
    kernel and the probe initramfs, boot them paused-then-resumed with the
    console streamed back, and look for the marker.  Cached like the local one."""
    import tempfile

    # The probe is a racelab guest like any other, named and owned as lab.vm names
    # and owns its guests (so reap_stale() knows it); lab.vm imports this module.
    from lab.vm import NS, _block_sigint, _file_sha, _next_name, _owner_meta, _restore_sigint

    conn = connect(uri)
    try:
        try:
            conn.getDomainCapabilities(None, "x86_64", "q35", "kvm")
        except libvirt.libvirtError:
            return Accel.TCG, f"{uri} offers no KVM"
        key = f"{_host_identity(conn, uri)}|{kernel_key(kernel)}|libvirt-qemu-{conn.getVersion()}"
        cached = _accel_cache_get(key)
        if cached:
            return Accel(cached[0]), f"{cached[1]} (cached probe)"
        boot, probe = bootmod.kernel_for_boot(kernel), bootmod.probe_initrd()
        kpath = upload(conn, boot, f"kernel-{_file_sha(boot)}")
        ipath = upload(conn, probe, probe.name)
        name = f"{_next_name()}-kvmprobe"
        meta = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in sorted(_owner_meta("").items()))
        xml = (f"<domain type='kvm'><name>{name}</name>"
               f"<metadata><racelab:vm xmlns:racelab='{NS}'>{meta}</racelab:vm></metadata>"
               "<memory unit='MiB'>256</memory><vcpu>1</vcpu>"
               f"<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{escape(kpath)}</kernel>"
               f"<initrd>{escape(ipath)}</initrd>"
               "<cmdline>console=ttyS0 rdinit=/init panic=-1 quiet</cmdline></os>"
               "<features><acpi/></features><cpu mode='host-passthrough'/>"
               "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
               "<on_crash>destroy</on_crash><devices><serial type='pty'><target port='0'/>"
               "</serial><memballoon model='none'/></devices>"
               "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
               "</domain>")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="racelab-kvm-probe-") as d:
            console = Path(d) / "console"
            dom: libvirt.virDomain | None = None
            stream: ConsoleStream | None = None
            old = _block_sigint()   # Ctrl-C between createXML and the finally would leak it
            try:
                try:
                    dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
                except libvirt.libvirtError as e:
                    result = (Accel.TCG, f"KVM guest did not start on {uri}: {e.get_error_message()}")
                    dom = None
                _restore_sigint(old)
                old = None
                if dom is not None:
                    stream = ConsoleStream(conn, dom, console)
                    dom.resume()
                    result = (Accel.TCG, f"KVM probe did not reach the kernel's /init in "
                                     f"{PROBE_TIMEOUT:.0f}s on {uri}")
                    while time.monotonic() - t0 < PROBE_TIMEOUT:
                        if bootmod.PROBE_MARKER in console.read_text(errors="replace"):
                            result = (Accel.KVM, f"KVM probe on {uri} booted the kernel in "
                                             f"{time.monotonic() - t0:.1f}s")
                            break
                        try:
                            running = dom.isActive()
                        except libvirt.libvirtError:
                            running = False
                        if not running and bootmod.PROBE_MARKER not in console.read_text(errors="replace"):
                            result = (Accel.TCG, f"the KVM probe guest on {uri} stopped before /init")
                            break
                        time.sleep(0.1)
            finally:
                _restore_sigint(old)
                if dom is not None:
                    try:
                        dom.destroy()
                    except libvirt.libvirtError:
                        pass
                if stream is not None:
                    stream.stop()
        _accel_cache_put(key, result)
        return result
    finally:
        conn.close()


def _host_identity(conn: libvirt.virConnect, uri: str) -> str:
    """What names a libvirt host in the probe cache: its host UUID (libvirt's
    capabilities), so two URIs to one host (another user, port, keyfile=) share
    one probe; the URI without its query when the UUID cannot be had."""
    try:
        uuid = ET.fromstring(conn.getCapabilities()).findtext("host/uuid")
    except (libvirt.libvirtError, ET.ParseError):
        uuid = None
    return f"host-uuid:{uuid}" if uuid else uri.split("?", 1)[0]


def _accel_cache_get(key: str) -> list[str] | None:
    try:
        known: dict[str, list[str]] = json.loads((cache_dir() / "accel.json").read_text())
        return known.get(key)
    except (OSError, ValueError):
        return None


def _accel_cache_put(key: str, value: tuple[str, str]) -> None:
    from lab import cache

    cache_file = cache_dir() / "accel.json"
    with cache.lock(Path(f"{cache_file}.lock")):
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        cached[key] = list(value)
        cache.atomic_write(cache_file, json.dumps(cached, indent=1, sort_keys=True))
