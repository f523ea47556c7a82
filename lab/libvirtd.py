"""libvirtd for racelab: start it when nothing else does, and connect to it.

There is no systemd on the lab machines, so for qemu:///system racelab starts
`virtlogd -d` and `libvirtd -d` itself when their sockets do not answer.  The
daemons are shared by every racelab process (and by anyone else), so they are
left running: stopping them would kill other runs' guests.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import libvirt

from lab.run import BadInput, InfraError, cache_dir, require_root, require_tools, run

log = logging.getLogger("racelab.libvirtd")

SYSTEM_URI = "qemu:///system"
RUN_DIR = Path("/run/libvirt")
LIBVIRTD_SOCK = RUN_DIR / "libvirt-sock"
VIRTLOGD_SOCK = RUN_DIR / "virtlogd-sock"
LOG_DIR = Path("/var/log/libvirt")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_USER = "libvirt-qemu"   # Debian's build default; libvirtd refuses to start without it

# libvirt-python prints every error to stderr unless a handler is set; racelab
# reports errors itself, with context.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def is_local(uri: str) -> bool:
    """True for URIs served by a daemon on this machine (no host part)."""
    u = urlparse(uri)
    return not u.hostname and "+" not in u.scheme


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_libvirtd(uri: str = SYSTEM_URI, timeout: float = 30.0) -> None:
    """Make sure a libvirtd serves uri; start virtlogd/libvirtd for qemu:///system.

    Remote URIs (qemu+ssh://...) are the remote host's business: nothing to do."""
    if uri != SYSTEM_URI:
        return
    if _answers(LIBVIRTD_SOCK) and _answers(VIRTLOGD_SOCK):
        return
    require_root("starting libvirtd")
    require_tools("libvirtd", "virtlogd")
    from filelock import FileLock

    with FileLock(str(cache_dir() / ".libvirtd.lock")):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        _ensure_qemu_setup()
        if not _answers(VIRTLOGD_SOCK):
            log.info("starting virtlogd (no systemd here)")
            run(["virtlogd", "-d"])
            _wait_for(VIRTLOGD_SOCK, timeout, "virtlogd", LOG_DIR / "virtlogd.log")
        if not _answers(LIBVIRTD_SOCK):
            log.info("starting libvirtd (no systemd here)")
            run(["libvirtd", "-d"])
            _wait_for(LIBVIRTD_SOCK, timeout, "libvirtd", LOG_DIR / "libvirtd.log")


def _ensure_qemu_setup() -> None:
    """What libvirt-daemon-system would have set up.  Without its user
    libvirtd's QEMU driver fails to start ("Failed to parse user 'libvirt-qemu'")."""
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        log.info("creating system user %s (libvirt-daemon-system is not installed)", QEMU_USER)
        run(["groupadd", "--system", "-f", QEMU_USER])
        run(["useradd", "--system", "--gid", QEMU_USER, "--home-dir", "/var/lib/libvirt",
             "--no-create-home", "--shell", "/usr/sbin/nologin", QEMU_USER])
    # Without libvirt-daemon-system there is no qemu.conf either.  Then QEMU
    # would run as libvirt-qemu, which cannot open a root-only /dev/kvm, while
    # the capability probe sees KVM: libvirt then throws its capability cache
    # away and re-probes QEMU ~30 times per domain start (a minute each boot).
    # Running QEMU as root (as racelab's domains ask anyway) keeps the two views equal.
    if not QEMU_CONF.exists():
        log.info("writing %s (user = root): no libvirt-daemon-system here", QEMU_CONF)
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(
            "# Written by racelab (lab/libvirtd.py): libvirt-daemon-system is not installed.\n"
            "# QEMU runs as root, so libvirt's view of /dev/kvm matches QEMU's.\n"
            'user = "root"\ngroup = "root"\n')


def _wait_for(sock: Path, timeout: float, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(sock):
            return
        time.sleep(0.1)
    tail = ""
    try:
        tail = "\n    " + "\n    ".join(logfile.read_text(errors="replace").splitlines()[-10:])
    except OSError:
        pass
    raise InfraError(f"{what} did not come up within {timeout:.0f}s ({sock}){tail}",
                     hint=f"see {logfile}; try running `{what} -v` by hand")


def connect(uri: str = SYSTEM_URI) -> libvirt.virConnect:
    """An open libvirt connection (starting the local daemon if needed)."""
    if os.environ.get("LIBVIRT_DEFAULT_URI") and not uri:
        uri = os.environ["LIBVIRT_DEFAULT_URI"]
    ensure_libvirtd(uri)
    ensure_event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        hint = ("for qemu+ssh:// the remote user needs passwordless SSH and libvirt access"
                if not is_local(uri) else "is libvirtd running? (racelab starts it as root)")
        raise InfraError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}",
                         hint=hint) from None
    if conn is None:  # pragma: no cover - old bindings returned None
        raise InfraError(f"cannot connect to libvirt at {uri}")
    return conn


def check_uri(uri: str) -> None:
    """Reject URIs racelab cannot drive, before anything boots."""
    u = urlparse(uri)
    if not u.scheme.startswith("qemu"):
        raise BadInput(f"unsupported libvirt URI {uri!r}: racelab drives QEMU only",
                       hint="use qemu:///system or qemu+ssh://HOST/system")
    if u.path not in ("/system", "/session"):
        raise BadInput(f"bad libvirt URI {uri!r}: the path must be /system or /session")


# --- files and console on a libvirt host that may not be this one ------------------
#
# A remote libvirtd (qemu+ssh://HOST/system) cannot see this machine's files, and
# its guests' serial files live over there.  Everything then goes through the
# libvirt API: the image, kernel and initrd are uploaded once into a storage
# pool (volume names carry content hashes, so a name is its content), each
# guest's overlay is a pool volume, and the console is streamed back.

POOL_NAME = "racelab"
POOL_DIR = "/var/lib/libvirt/racelab"


def storage_pool(conn: libvirt.virConnect) -> libvirt.virStoragePool:
    """The racelab directory pool on conn's host (a transient pool, made if missing)."""
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
        if not pool.isActive():
            pool.create(0)
    except libvirt.libvirtError:
        xml = (f"<pool type='dir'><name>{POOL_NAME}</name>"
               f"<target><path>{POOL_DIR}</path></target></pool>")
        try:
            pool = conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        except libvirt.libvirtError:  # another racelab made it meanwhile
            pool = conn.storagePoolLookupByName(POOL_NAME)
    pool.refresh(0)
    return pool


def upload(conn: libvirt.virConnect, local: Path, name: str) -> str:
    """Put a local file into the pool as `name` (once); its path on conn's host.

    A `<name>.ok` marker volume is written after the data, so a half-done
    upload (a crash, a concurrent racelab) is never mistaken for a done one."""
    pool = storage_pool(conn)
    try:
        pool.storageVolLookupByName(name + ".ok")
        done: str = pool.storageVolLookupByName(name).path()
        return done
    except libvirt.libvirtError:
        pass
    try:
        pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass
    size = local.stat().st_size
    log.info("uploading %s to %s (%d MiB)", local.name, conn.getURI(), size >> 20)
    vol = pool.createXML(f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
                         "<target><format type='raw'/></target></volume>", 0)
    stream = conn.newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        with open(local, "rb") as f:
            stream.sendAll(lambda _st, n, fh: fh.read(n), f)
        stream.finish()
    except BaseException:
        stream.abort()
        vol.delete(0)
        raise
    pool.createXML(f"<volume><name>{name}.ok</name><capacity unit='bytes'>0</capacity>"
                   "<target><format type='raw'/></target></volume>", 0)
    _prune_pool(pool, name)
    path: str = vol.path()
    return path


# Uploads pile up (a new image for every change to lab/): keep the newest few of a kind.
_KEEP = {"racelab-": 3, "kernel-": 8}


def _prune_pool(pool: libvirt.virStoragePool, just_uploaded: str) -> None:
    """Delete older uploads of the same kind.  A running guest keeps its backing
    file open, so removing it under the guest is harmless."""
    import xml.etree.ElementTree as ET

    prefix = next((p for p in _KEEP if just_uploaded.startswith(p)), None)
    if prefix is None:
        return
    suffix = ".img" if prefix == "racelab-" else ""
    stamped = []
    for name in pool.listVolumes():
        if not name.startswith(prefix) or not name.endswith(suffix) or name.endswith(".ok") \
                or name.endswith(".qcow2"):
            continue
        try:
            vol = pool.storageVolLookupByName(name)
            mtime = float(ET.fromstring(vol.XMLDesc(0)).findtext("target/timestamps/mtime") or 0)
        except (libvirt.libvirtError, ValueError):
            continue
        stamped.append((mtime, name))
    for _, name in sorted(stamped, reverse=True)[_KEEP[prefix]:]:
        if name == just_uploaded:
            continue
        for n in (name + ".ok", name):   # marker first: never a complete-looking partial
            try:
                pool.storageVolLookupByName(n).delete(0)
            except libvirt.libvirtError:
                pass
        log.debug("removed old upload %s", name)


def overlay_volume(conn: libvirt.virConnect, name: str, backing: str,
                   capacity: int) -> libvirt.virStorageVol:
    """A qcow2 volume over a raw backing file on conn's host (the guest's writes)."""
    pool = storage_pool(conn)
    try:
        pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass
    return pool.createXML(
        f"<volume><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
        "<target><format type='qcow2'/></target>"
        f"<backingStore><path>{backing}</path><format type='raw'/></backingStore></volume>", 0)


_events_lock = threading.Lock()
_events_started = False


def ensure_event_loop() -> None:
    """libvirt's default event loop, run by a daemon thread.  Without it a
    blocking console stream holds the connection and every other call on it
    (resume, isActive, destroy) waits behind the stream.  It must be
    registered before a connection is opened to serve that connection."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _events_started = True


class ConsoleStream:
    """Copies a domain's serial console (a pty on its host) into a local file.

    Non-blocking stream, served by the event loop (ensure_event_loop()).  The
    domain must be started paused and resumed after this is set up, or the
    first boot messages are lost."""

    _EVENTS = (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
               | libvirt.VIR_STREAM_EVENT_HANGUP)

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, path: Path) -> None:
        self._lock = threading.Lock()
        self._out = open(path, "wb")  # noqa: SIM115 - the stream's lifetime; closed by close()
        self._stream: libvirt.virStream | None = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._stream.eventAddCallback(self._EVENTS, self._on_event, None)

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        with self._lock:
            if self._stream is None:
                return
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                try:
                    data = stream.recv(65536)
                except libvirt.libvirtError:
                    data = b""
                if data == -2:   # would block
                    return
                if isinstance(data, bytes) and data:
                    self._out.write(data)
                    self._out.flush()
                    return
                self._close_locked()   # EOF: the domain is gone
                return
            if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
                self._close_locked()

    def _close_locked(self) -> None:
        st, self._stream = self._stream, None
        if st is not None:
            for step in (st.eventRemoveCallback, st.abort):
                try:
                    step()
                except libvirt.libvirtError:
                    pass
        self._out.close()

    def stop(self) -> None:
        with self._lock:
            self._close_locked()
