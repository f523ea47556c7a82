"""The one way racelab runs external commands, and its typed errors (host and guest).

Every external command goes through run() or spawn(): argv lists only, never
shell strings, `+ cmd` logged at debug level, and a typed error that carries
stdout and stderr.  Errors come in two channels (see STYLE.md, point 6):

- BadInput: something the user can fix (exit 2), always with a hint;
- InfraError and its children: the lab itself lost something (a VM, an SSH
  session, a build) (exit 3).  Such a loss is never a verdict.

It lives in lab.agent because the guest needs it too (standard library only);
the host reaches it through lab.run, which adds the cache and the source tree.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

log = logging.getLogger("racelab")

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_INFRA = 3


class RacelabError(Exception):
    """Base error: a short message plus a hint for what to do about it."""

    exit_code = EXIT_INFRA

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class BadInput(RacelabError):
    """The user's input is wrong (unknown name, malformed file, not root...)."""

    exit_code = EXIT_BAD_INPUT


class InfraError(RacelabError):
    """The lab lost a part it needs; the thing under test is not to blame."""

    exit_code = EXIT_INFRA


class CommandFailed(InfraError):
    """An external command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str = "",
                 stderr: str = "", hint: str | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout).strip().splitlines()[-15:]
        msg = f"command failed (exit {returncode}): {shlex.join(self.argv)}"
        if tail:
            msg += "\n    " + "\n    ".join(tail)
        super().__init__(msg, hint)


class BuildFailed(InfraError):
    """A kernel, image or data-plane build failed."""


class LostVM(InfraError):
    """A guest died or stopped answering.  Never a 'not reproduced'."""


class LostSSH(LostVM):
    """The SSH session to a guest broke."""


def run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True,
        capture: bool = True, input: str | bytes | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None, timeout: float | None = None,
        hint: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv to completion.  Raises CommandFailed (with output) on failure."""
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    full_env = None
    if env is not None:
        full_env = {**os.environ, **env}
    text_input = input.decode() if isinstance(input, bytes) else input
    try:
        proc = subprocess.run(
            args, check=False, text=True, input=text_input, cwd=cwd, env=full_env,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise BadInput(f"missing tool: {args[0]}",
                       hint=f"install it (see README, 'Install'); {tool_hint(args[0])}") from None
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(args, -1, _s(e.stdout), _s(e.stderr),
                            hint=f"timed out after {timeout}s") from None
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stdout or "", proc.stderr or "", hint)
    return proc


def _s(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


@contextmanager
def spawn(argv: Sequence[str | os.PathLike[str]], *, stdout: int | None = subprocess.PIPE,
          stderr: int | None = subprocess.PIPE, cwd: str | os.PathLike[str] | None = None,
          env: Mapping[str, str] | None = None, stop_signal: int = signal.SIGTERM,
          grace: float = 5.0, die_with_parent: bool = False,
          stdin: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A background process as a context manager: always stopped on exit.

    It runs in its own process group so that Ctrl-C reaches only racelab, which
    then stops the group itself in a known order.  die_with_parent: the
    kernel SIGKILLs it if racelab dies, even by SIGKILL (PR_SET_PDEATHSIG).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s &", shlex.join(args))
    full_env = {**os.environ, **env} if env is not None else None
    try:
        proc = subprocess.Popen(args, stdout=stdout, stderr=stderr, stdin=stdin, cwd=cwd,
                                env=full_env, text=True, start_new_session=True, bufsize=1,
                                preexec_fn=_pdeathsig if die_with_parent else None)
    except FileNotFoundError:
        raise BadInput(f"missing tool: {args[0]}", hint=tool_hint(args[0])) from None
    try:
        yield proc
    finally:
        stop(proc, stop_signal, grace)


def _pdeathsig() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop a process group started by spawn(): sig, then SIGKILL after grace."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


# Which Debian package provides each tool the lab calls.
TOOL_PACKAGES: dict[str, str] = {
    "gcc": "build-essential", "cc": "build-essential", "make": "build-essential",
    "ip": "iproute2", "tc": "iproute2", "ethtool": "ethtool", "iperf3": "iperf3",
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
    "libvirtd": "libvirt-daemon libvirt-daemon-driver-qemu", "virtlogd": "libvirt-daemon",
    "virsh": "libvirt-clients", "mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs",
    "ccache": "ccache", "bison": "bison", "flex": "flex", "bc": "bc", "cpio": "cpio",
    "zstd": "zstd", "xz": "xz-utils", "git": "git", "apt-get": "apt",
    "dpkg-deb": "dpkg", "ssh-keygen": "openssh-client", "ssh": "openssh-client",
    "busybox": "busybox-static",
}


def tool_hint(tool: str) -> str:
    pkg = TOOL_PACKAGES.get(os.path.basename(tool))
    if pkg:
        return f"apt-get install {pkg}  (or run ./bootstrap install)"
    return "install it, or run ./bootstrap install"


def require_tools(*tools: str) -> None:
    """Fail early, naming every missing tool and its package at once."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        raise BadInput(f"missing tool(s): {', '.join(missing)}",
                       hint=f"apt-get install {' '.join(pkgs)}  (or run ./bootstrap install)")
