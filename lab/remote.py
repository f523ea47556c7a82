"""SshHost: the Host protocol (lab/host.py) for a guest, over paramiko.

One SSH connection per guest, pinned to the lab's fixed guest host key,
authenticated with the per-lab client key (both from lab/image.py).  Every
command runs remotely as

    exec env PYTHONPATH=... [K=V...] sh -c 'echo "<marker> $$" >&2; exec "$@"' sh ARGV...

sshd makes each session's process a session (and process group) leader, so
`$$` is the process group of the command: terminate() and the cleanup on
exit kill that whole group, and no remote process outlives its spawn().
stderr is drained by a thread (an unread stderr would stall stdout once the
shared SSH window fills) and the group id is taken from its first line.

A connection that breaks raises LostSSH (an infrastructure loss, never a
verdict).  `python -m lab.remote PORT -- CMD...` runs a command in a guest
that is already up (for debugging).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import paramiko

from lab.host import Result
from lab.image import GUEST_BIN, GUEST_LAB_ROOT, GUEST_SITE
from lab.run import BadInput, CommandFailed, InfraError, LostSSH, RacelabError, run

log = logging.getLogger("racelab.remote")
# paramiko logs each failed attempt of a boot-time connect with a traceback at
# ERROR.  Those go to this muted channel; the failure reaches us as an exception.
_BOOT_LOG = "paramiko.transport.racelab-connect"
logging.getLogger(_BOOT_LOG).propagate = False
logging.getLogger(_BOOT_LOG).disabled = True   # also drops pytest's capture handlers

GUEST_PYTHONPATH = f"{GUEST_LAB_ROOT}:{GUEST_SITE}"   # the agent package, then pyroute2
_PGID_MARK = "racelab-pgid"
# A file transfer that makes no progress this long is from a guest that hung (a soft lockup
# once held a trace fetch for 10 minutes): as long as the agent's own silence limit.
SFTP_IDLE_S = 60.0
# `sh -c SCRIPT sh ARGV...`: report the process group, then become the command.
_WRAPPER = f'echo "{_PGID_MARK} $$" >&2; exec "$@"'


# P-256 first: the guest's sshd runs it through OpenSSL's assembly, where its own
# curve25519 (paramiko's first choice the guest supports) is portable C.  Under TCG
# that is about 0.3 s of every connection's key exchange.
_FAST_KEX = ("ecdh-sha2-nistp256",)


def _prefer_fast_kex(t: paramiko.Transport) -> None:
    opts = t.get_security_options()
    offered = tuple(opts.kex)
    opts.kex = tuple(k for k in _FAST_KEX if k in offered) + tuple(k for k in offered if k not in _FAST_KEX)


class SshHost:
    """A guest reached over SSH on address:port (a QEMU user-net port forward)."""

    python = "python3"
    lab_root = GUEST_LAB_ROOT
    # -S: no site module.  Under TCG it costs 0.6 s of every agent start, for paths the
    # agent does not use; the two it does use are given here (the image's racelab.pth
    # names the same two for everything else)
    agent_python: tuple[str, ...] = ("python3", "-S")
    agent_path = GUEST_PYTHONPATH
    bin_dir = GUEST_BIN

    def __init__(self, name: str, port: int, key_path: Path, host_pubkey: str, *,
                 address: str = "127.0.0.1", user: str = "root",
                 sock_factory: Callable[[], socket.socket] | None = None,
                 describe_loss: Callable[[], str] | None = None) -> None:
        """host_pubkey is "ssh-ed25519 AAAA..." (the pinned guest key).
        sock_factory, if given, makes the TCP stream (e.g. a tunnel through a
        remote libvirt host) instead of connecting to address:port.
        describe_loss() adds context (VM state, console tail) to LostSSH."""
        self.name = name
        self.port = port
        self.address = address
        self.user = user
        self.key_path = Path(key_path)
        parts = host_pubkey.split()
        if len(parts) < 2:
            raise BadInput(f"bad pinned host key for {name}: {host_pubkey!r}")
        self.host_key_type, self.host_key_b64 = parts[0], parts[1]
        self._sock_factory = sock_factory
        self._describe_loss = describe_loss
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._procs: set[SshProcess] = set()
        self._lock = threading.Lock()

    # --- connection --------------------------------------------------------

    def connect(self, timeout: float = 60.0) -> None:
        """Connect, retrying while the guest boots, until timeout seconds pass."""
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        attempts = 0
        while True:
            attempts += 1
            try:
                self._transport = self._open(pkey, max(1.0, min(10.0, deadline - time.monotonic())))
                log.debug("%s: SSH up after %d attempt(s)", self.name, attempts)
                return
            except _HostKeyMismatch as e:
                raise InfraError(f"{self.name}: guest host key mismatch: {e}",
                                 hint="the guest is not booted from the lab image, or the "
                                      "port forward reached another guest") from None
            except (OSError, EOFError, paramiko.SSHException) as e:
                last = e
            if time.monotonic() >= deadline:
                raise LostSSH(f"{self.name}: no SSH on {self.address}:{self.port} after "
                              f"{timeout:.0f}s ({attempts} attempts; last: {last!r})"
                              + self._loss_context())
            time.sleep(0.1)

    def _open(self, pkey: paramiko.PKey, timeout: float) -> paramiko.Transport:
        if self._sock_factory is not None:
            sock = self._sock_factory()
        else:
            sock = socket.create_connection((self.address, self.port), timeout=timeout)
        t = paramiko.Transport(sock)
        t.set_log_channel(_BOOT_LOG)
        _prefer_fast_kex(t)
        try:
            # QEMU's forward accepts before the guest listens; the banner then never
            # comes.  Short, retried waits beat one long one.
            t.banner_timeout = timeout
            t.handshake_timeout = timeout
            t.start_client(timeout=timeout)
            key = t.get_remote_server_key()
            if (key.get_name(), key.get_base64()) != (self.host_key_type, self.host_key_b64):
                raise _HostKeyMismatch(f"got {key.get_name()} {key.get_base64()[:24]}..., "
                                       f"pinned {self.host_key_type} {self.host_key_b64[:24]}...")
            t.auth_publickey(self.user, pkey)
            t.set_keepalive(15)
            sock.settimeout(None)
            t.set_log_channel("paramiko.transport")
            return t
        except BaseException:
            t.close()
            raise

    def close(self) -> None:
        """Kill every remote process still running from spawn(), then disconnect."""
        for p in list(self._procs):
            try:
                p.kill()
            except RacelabError:
                pass
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # noqa: BLE001 - a dead connection is fine here
                pass
            self._sftp = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> SshHost:
        if self._transport is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def _loss_context(self) -> str:
        if self._describe_loss is None:
            return ""
        try:
            return "\n" + self._describe_loss()
        except Exception as e:  # noqa: BLE001 - context is best effort
            return f"\n(no more context: {e!r})"

    def lost(self, what: str) -> LostSSH:
        return LostSSH(f"{self.name}: SSH connection lost {what}" + self._loss_context(),
                       hint="the guest died or stopped answering; see its console log")

    def _channel(self, what: str) -> paramiko.Channel:
        t = self._transport
        if t is None or not t.is_active():
            raise self.lost(f"before {what}")
        try:
            return t.open_session(timeout=30)
        except (paramiko.SSHException, OSError, EOFError) as e:
            if not t.is_active():
                raise self.lost(f"opening a session for {what}") from None
            raise InfraError(f"{self.name}: cannot open an SSH session for {what}: {e}") from None

    # --- Host protocol -----------------------------------------------------

    def command_line(self, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
        """The remote shell line that runs argv (see the module docstring)."""
        if not argv:
            raise BadInput("empty command")
        assigns = [f"PYTHONPATH={GUEST_PYTHONPATH}"]
        for k, v in (env or {}).items():
            if not k.isidentifier():
                raise BadInput(f"bad environment variable name {k!r}")
            assigns.append(f"{k}={v}")
        return shlex.join(["exec", "env", *assigns, "sh", "-c", _WRAPPER, "sh", *argv])

    def start(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              input: str | None = None) -> SshProcess:
        """Start argv; the caller must close() the process (spawn() does)."""
        argv = [str(a) for a in argv]
        chan = self._channel(shlex.join(argv))
        line = self.command_line(argv, env)
        log.debug("+ [%s] %s", self.name, shlex.join(argv))
        try:
            chan.exec_command(line)
            proc = SshProcess(self, chan, argv)
            if input is not None:
                chan.sendall(input.encode())
            chan.shutdown_write()  # no stdin (or all of it): the command sees EOF
        except (paramiko.SSHException, OSError, EOFError) as e:
            chan.close()
            if not self.connected:
                raise self.lost(f"starting {shlex.join(argv)}") from None
            raise InfraError(f"{self.name}: cannot start {shlex.join(argv)}: {e}") from None
        with self._lock:
            self._procs.add(proc)
        return proc

    def cmd(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:
        deadline = None if timeout is None else time.monotonic() + timeout
        proc = self.start(argv, input=input)
        try:
            out = proc.read_all(timeout)
            # stdout is closed; a command that detached from it may still run
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                rc = proc.wait(left)
            except subprocess.TimeoutExpired:
                proc._timeout(timeout, [out.encode()])
            err = proc.stderr_text()
        finally:
            proc.close()
        if check and rc != 0:
            raise CommandFailed(proc.argv, rc, out, err, hint=f"on guest {self.name}")
        return Result(rc, out, err)

    @contextmanager
    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None
              ) -> Iterator[SshProcess]:
        proc = self.start(argv, env=env)
        try:
            yield proc
        finally:
            proc.close()

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            t = self._transport
            if t is None or not t.is_active():
                raise self.lost("before SFTP")
            self._sftp = paramiko.SFTPClient.from_transport(t)
            if self._sftp is None:
                raise InfraError(f"{self.name}: cannot open SFTP")
            chan = self._sftp.get_channel()
            if chan is not None:
                chan.settimeout(SFTP_IDLE_S)   # a read that waits longer raises
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        try:
            sftp = self._sftp_client()
            sftp.put(str(local), remote)
            sftp.chmod(remote, stat.S_IMODE(os.stat(local).st_mode))
        except (OSError, EOFError, paramiko.SSHException) as e:
            if not self.connected:
                raise self.lost(f"during put {local} -> {remote}") from None
            raise InfraError(f"{self.name}: put {local} -> {remote} failed: {e}") from None

    def get(self, remote: str, local: Path) -> None:
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._sftp = None        # a timed-out channel is not used again
            if not self.connected:
                raise self.lost(f"during get {remote}") from None
            raise InfraError(f"{self.name}: get {remote} -> {local} failed: {e}") from None

    def kill_group(self, pgid: int, sig: str = "TERM") -> None:
        """Signal a remote process group (best effort: it may be gone already)."""
        t = self._transport
        if t is None or not t.is_active():
            return
        try:
            chan = t.open_session(timeout=10)
            chan.exec_command(f"kill -{sig} -- -{pgid} 2>/dev/null")
            chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError):
            pass

    # --- for humans --------------------------------------------------------

    def ssh_argv(self, known_hosts: Path) -> list[str]:
        """An OpenSSH command line that reaches this guest with the pinned key."""
        return ["ssh", "-i", str(self.key_path), "-p", str(self.port),
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                "-o", "LogLevel=ERROR", f"{self.user}@{self.address}"]

    def interactive_shell(self, argv: Sequence[str] = ()) -> int:
        """Hand the terminal to OpenSSH (a login shell, or argv); its exit status."""
        with tempfile.TemporaryDirectory(prefix="racelab-ssh-") as d:
            kh = Path(d) / "known_hosts"
            host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
            kh.write_text(f"{host} {self.host_key_type} {self.host_key_b64}\n")
            extra = ["-t", *argv] if argv else []
            return run([*self.ssh_argv(kh), *extra], check=False, capture=False).returncode


class _HostKeyMismatch(Exception):
    pass


class SshProcess:
    """A command running in a guest (see lab.host.Process)."""

    def __init__(self, host: SshHost, chan: paramiko.Channel, argv: list[str]) -> None:
        self.host = host
        self.argv = argv
        self._chan = chan
        self._stdout = chan.makefile("rb")
        self._err: list[bytes] = []
        self.pgid: int | None = None
        self._pgid_seen = threading.Event()
        self._signalled: int | None = None
        self._closed = False
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True,
                                       name=f"stderr-{host.name}")
        self._drain.start()

    def _drain_stderr(self) -> None:
        head = b""
        try:
            while True:
                data = self._chan.recv_stderr(65536)
                if not data:
                    break
                if self.pgid is None:
                    head += data
                    if b"\n" not in head:
                        continue
                    first, _, rest = head.partition(b"\n")
                    mark, _, num = first.decode(errors="replace").partition(" ")
                    if mark == _PGID_MARK and num.isdigit():
                        self.pgid = int(num)
                    else:
                        rest = head  # not ours (sh failed early?): keep it all
                        self.pgid = 0
                    self._pgid_seen.set()
                    data = rest
                if data:
                    self._err.append(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            if head and self.pgid is None:
                self._err.append(head)
            self._pgid_seen.set()

    def lines(self) -> Iterator[str]:
        try:
            for raw in self._stdout:
                yield raw.decode(errors="replace").rstrip("\r\n")
        except (OSError, EOFError, paramiko.SSHException):
            pass
        self._raise_if_lost("while reading output of " + shlex.join(self.argv))

    def read_all(self, timeout: float | None = None) -> str:
        """All of stdout.  On timeout the remote process group is killed."""
        chunks: list[bytes] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._timeout(timeout, chunks)
                self._chan.settimeout(left)
            try:
                data = self._chan.recv(65536)
            except TimeoutError:
                self._timeout(timeout, chunks)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                break
            chunks.append(data)
        self._chan.settimeout(None)
        self._raise_if_lost("while running " + shlex.join(self.argv))
        return b"".join(chunks).decode(errors="replace")

    def _timeout(self, timeout: float | None, chunks: list[bytes]) -> None:
        self.kill()
        raise CommandFailed(self.argv, -1, b"".join(chunks).decode(errors="replace"),
                            self.stderr_text(0.5),
                            hint=f"timed out after {timeout}s on guest {self.host.name}")

    def _raise_if_lost(self, what: str) -> None:
        # EOF on stdout: normal end, or the connection died under us.
        if not self.host.connected and not (self._chan.exit_status_ready()
                                             and self._chan.exit_status != -1):
            raise self.host.lost(what)

    def poll(self) -> int | None:
        if not self._chan.exit_status_ready():
            return None
        return self._returncode()

    def wait(self, timeout: float | None = None) -> int:
        if not self._chan.status_event.wait(timeout):
            raise subprocess.TimeoutExpired(self.argv, timeout or 0)
        return self._returncode()

    def _returncode(self) -> int:
        rc = self._chan.exit_status
        if rc == -1:
            # closed without an exit status: killed by a signal (paramiko drops
            # exit-signal) or the connection went away.
            if not self.host.connected:
                raise self.host.lost("while waiting for " + shlex.join(self.argv))
            return -(self._signalled or 9)
        return rc

    def stderr_text(self, timeout: float = 5.0) -> str:
        self._drain.join(timeout)
        return b"".join(self._err).decode(errors="replace")

    def _signal(self, sig: str, num: int) -> None:
        if self._chan.exit_status_ready():
            return
        self._pgid_seen.wait(5)
        if self.pgid:
            self._signalled = num
            self.host.kill_group(self.pgid, sig)

    def terminate(self) -> None:
        self._signal("TERM", 15)

    def kill(self) -> None:
        self._signal("KILL", 9)

    def abandon(self) -> None:
        """Give up on a guest that stopped answering: close the channel now, which
        wakes a reader blocked in lines() (it sees EOF), without asking the guest
        to kill anything (a hung guest would never reply).  Safe from any thread."""
        self._chan.close()

    def close(self, grace: float = 5.0) -> None:
        """Stop the remote group (TERM, then KILL after grace) and free the channel."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._chan.exit_status_ready() and self.host.connected:
                self.terminate()
                if not self._chan.status_event.wait(grace):
                    self.kill()
                    self._chan.status_event.wait(grace)
        finally:
            self._chan.close()
            with self.host._lock:
                self.host._procs.discard(self)


def shell_or_command(host: SshHost, command: list[str]) -> int:
    """An interactive shell, or the command's output streamed line by line; the exit status."""
    if not command:
        return host.interactive_shell()
    with host.spawn(command) as p:
        for line in p.lines():
            print(line, flush=True)
        rc = p.wait()
        sys.stderr.write(p.stderr_text())
    return rc


def cli_run(port: int, command: list[str]) -> int:
    """`racelab dev remote PORT -- CMD...`: CMD (else a shell) in a running guest whose SSH
    is forwarded to 127.0.0.1:PORT; its exit status."""
    from lab.image import ensure_keys

    if not 0 < port < 65536:
        raise BadInput(f"port {port} is not a TCP port", hint="the guest's SSH forward, e.g. 40022: its "
                                                             "console log and `racelab -v vm shell` say it")
    keys = ensure_keys()
    h = SshHost(f"port-{port}", port, keys.client, keys.host_pub)
    if not command:
        return h.interactive_shell()
    with h:
        return shell_or_command(h, command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.remote ...` is `racelab dev remote ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.remote", argv)


if __name__ == "__main__":
    sys.exit(main())
