"""A fleet over two libvirt hosts, the second one reached over qemu+ssh://.

This machine stands in for the second host: a throwaway sshd on 127.0.0.1 (its own
config, host key and authorized key, all in a temporary directory) lets root in with a
throwaway client key, and libvirt's ssh transport reaches this machine's libvirtd through
it.  The guest on that "host" is then booted from uploads into its storage pool, its
console streamed back and its SSH reached through `ssh -L`, exactly as on a real second
machine.  Nothing under ~/.ssh or /etc/ssh is read for it or written: the URI names the
key (keyfile=) and an ssh wrapper (command=) that pins the host key in a known_hosts of
its own.

The sshd fixture lives here rather than in lab/pytest_plugin.py: an sshd that lets root
in is this suite's stand-in for a second machine, not something a user of the plugin
should get by naming a fixture.
"""
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parent.parent
PRIVSEP_DIR = Path("/run/sshd")   # compiled into Debian's sshd; systemd's unit makes it


@dataclass
class SshLibvirtHost:
    uri: str        # qemu+ssh://root@127.0.0.1:PORT/system?keyfile=...&command=...
    port: int
    log: Path       # sshd's own log (-E)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc), while they are still its."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """sshd and every session it forked: sessions call setsid(), so a process group
    kill would miss them; they are found as its descendants, by pid."""
    pids = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ssh_libvirt_host():
    """A second libvirt "host": this machine's libvirtd behind an sshd of our own on
    127.0.0.1:<free port>.  Function scope; depends on sshd (openssh-server) and
    ssh/ssh-keygen (openssh-client).  sshd is stopped (with every session it forked),
    its directory removed, and /run/sshd removed again if it made it, on every exit path."""
    if os.geteuid() != 0:
        pytest.skip("needs root: run as root (sudo ./bootstrap test)")
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if sshd is None:
        pytest.skip("sshd missing: apt-get install openssh-server (or ./bootstrap install)")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("ssh missing: apt-get install openssh-client (or ./bootstrap install)")
    made_privsep = not PRIVSEP_DIR.exists()
    d = Path(tempfile.mkdtemp(prefix="racelab-sshd-"))
    proc = None
    try:
        if made_privsep:
            PRIVSEP_DIR.mkdir(mode=0o755)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"racelab-test-{name}",
                            "-f", str(d / name)], check=True, timeout=60)
        shutil.copyfile(d / "client_key.pub", d / "authorized_keys")
        port = _free_port()
        # root only, by this key only; StrictModes off because the temporary directory
        # sits under the world-writable /tmp, which sshd's path check refuses
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nAllowUsers root\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowTcpForwarding yes\n")
        host_key = " ".join((d / "host_key.pub").read_text().split()[:2])
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key}\n")
        (d / "ssh_config").write_text(
            f"UserKnownHostsFile {d}/known_hosts\nGlobalKnownHostsFile /dev/null\n"
            "StrictHostKeyChecking yes\nIdentitiesOnly yes\nLogLevel ERROR\n")
        # libvirt's command=: the ssh it runs, here with our config instead of ~/.ssh's
        (d / "ssh").write_text(f'#!/bin/sh\nexec ssh -F {d}/ssh_config "$@"\n')
        (d / "ssh").chmod(0o755)
        log = d / "sshd.log"
        proc = subprocess.Popen([sshd, "-D", "-f", str(d / "sshd_config"), "-E", str(log)],
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, f"sshd exited {proc.returncode}: {log.read_text() if log.exists() else ''}"
            assert time.monotonic() < deadline, "sshd did not listen within 30 s"
            time.sleep(0.1)
        uri = (f"qemu+ssh://root@127.0.0.1:{port}/system"
               f"?keyfile={quote(str(d / 'client_key'))}&command={quote(str(d / 'ssh'))}")
        yield SshLibvirtHost(uri=uri, port=port, log=log)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(d, ignore_errors=True)
        if made_privsep:
            try:
                PRIVSEP_DIR.rmdir()
            except OSError:
                pass   # someone else's sshd put something there meanwhile: theirs


def test_the_throwaway_sshd_reaches_libvirt_as_root_only(ssh_libvirt_host):
    """The stand-in host itself: virsh over the URI answers; another user is refused."""
    p = subprocess.run(["virsh", "-c", ssh_libvirt_host.uri, "hostname"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == socket.gethostname()
    keyfile = ssh_libvirt_host.uri.split("keyfile=")[1].split("&")[0]
    wrapper = ssh_libvirt_host.uri.split("command=")[1]
    q = subprocess.run([wrapper, "-i", keyfile, "-p", str(ssh_libvirt_host.port), "-o", "BatchMode=yes",
                        "nobody@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
    assert q.returncode != 0
    log = ssh_libvirt_host.log.read_text()
    assert "Accepted publickey for root" in log and "User nobody from 127.0.0.1 not allowed" in log, log


@pytest.mark.slow
def test_repro_over_two_libvirt_hosts_one_reached_by_ssh(ssh_libvirt_host, tmp_path):
    """`racelab repro generic-rx-race --uri qemu:///system --uri qemu+ssh://...`: the
    affected kernel's guest on the first URI, the fixed one's on the second, both
    verdicts right, and where each guest ran recorded in the summary."""
    home_ssh = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".ssh"
    had_home_ssh = home_ssh.exists()
    local, remote = "qemu:///system", ssh_libvirt_host.uri
    p = subprocess.run([sys.executable, "-m", "lab.cli", "repro", "generic-rx-race", "--uri", local,
                        "--uri", remote, "--budget", "90s", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    from lab import results
    assert results.problems(summary) == []
    affected, fixed = summary["config"]["kernels"]
    assert affected.endswith("+revert-generic-rx") and not fixed.endswith("+revert-generic-rx")
    rows = {r["kernel"]: r for r in summary["rows"]}
    assert rows[affected]["verdict"] == "REPRODUCED", rows[affected]
    assert rows[fixed]["verdict"] == "NOT REPRODUCED", rows[fixed]
    assert rows[fixed]["packets"] > 10_000
    assert all(t["infra_error"] is None and t["packets"] > 0 for t in summary["targets"])
    # guests take the URIs in turn: the affected kernel's on this host, the fixed one's over ssh
    kernels = summary["provenance"]["kernels"]
    assert kernels[affected]["uris"] == {f"{affected}/vm-0": local}
    assert kernels[fixed]["uris"] == {f"{fixed}/vm-0": remote}
    assert summary["config"]["uris"] == [local, remote]
    assert f"--uri {remote}" in summary["provenance"]["rerun"].replace("'", "")
    # and it really went over ssh: libvirt's connection and the guest's tunnel logged in as root
    log = ssh_libvirt_host.log.read_text()
    assert log.count("Accepted publickey for root from 127.0.0.1") >= 2, log
    console = Path(next(t for t in summary["targets"] if t["kernel"] == fixed)["evidence"]["console"])
    assert console.read_text(errors="replace").startswith("[    0.000000] Linux version")  # streamed back
    assert home_ssh.exists() == had_home_ssh, "the user's ~/.ssh was not touched"
