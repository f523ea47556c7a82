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
