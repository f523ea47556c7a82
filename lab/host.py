"""The Host protocol: where scenario code runs, without knowing which.

Two implementations: LocalHost (this machine; the netns backend) here, and
SshHost (a guest, over paramiko) in lab/remote.py.  Scenario code only uses
cmd(), spawn(), put() and get(), plus `python` and `lab_root`, to start the
agent (python -m lab.agent) that builds topologies and runs the data plane
where the kernel under test is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from lab import run as runmod


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Process(Protocol):
    """A running command on a Host.  Always used through Host.spawn()."""

    def lines(self) -> Iterator[str]:
        """stdout, line by line, until the process closes it."""
        ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr (valid after it ended)."""
        ...

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM to its process group); spawn() also kills."""
        ...


class Host(Protocol):
    name: str          # for logs and results: "local", "vm-3"
    python: str        # interpreter to run lab code with
    lab_root: str      # directory holding the `lab` package (PYTHONPATH)
    agent_python: tuple[str, ...]   # how the agent's interpreter starts (argv before -m)
    agent_path: str    # the agent's PYTHONPATH: the lab and what it imports
    bin_dir: str       # directory holding xskcheck and xsksend

    def cmd(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result: ...

    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None
              ) -> AbstractContextManager[Process]: ...

    def put(self, local: Path, remote: str) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...


class LocalProcess:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._stderr: str | None = None

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            yield line.rstrip("\n")

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        if self._stderr is None and self.proc.stderr is not None and self.proc.poll() is not None:
            try:
                self._stderr = self.proc.stderr.read()
            except (OSError, ValueError):
                self._stderr = ""
        return self._stderr or ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass


class LocalHost:
    """This machine's own kernel: the netns backend."""

    name = "local"

    def __init__(self, bin_dir: str | None = None) -> None:
        self.python = sys.executable
        self.lab_root = str(runmod.project_root())
        self.agent_python: tuple[str, ...] = (self.python,)     # the venv's site-packages hold pyroute2
        self.agent_path = self.lab_root
        self.bin_dir = bin_dir or ""

    def cmd(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:
        p = runmod.run(argv, check=check, timeout=timeout, input=input)
        return Result(p.returncode, p.stdout or "", p.stderr or "")

    @contextmanager
    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None
              ) -> Iterator[LocalProcess]:
        # stderr goes to a temp file so a chatty process can never block on a full pipe
        import tempfile

        with (tempfile.TemporaryFile("w+") as errf,
              runmod.spawn(argv, stderr=errf.fileno(), env=env, die_with_parent=True,
                           stdin=subprocess.DEVNULL) as proc):
            yield _FileErrProcess(proc, errf)

    def put(self, local: Path, remote: str) -> None:
        if Path(local).resolve() != Path(remote).resolve():
            shutil.copy2(local, remote)

    def get(self, remote: str, local: Path) -> None:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copy2(remote, local)


class _FileErrProcess(LocalProcess):
    def __init__(self, proc: subprocess.Popen[str], errf: IO[str]) -> None:
        super().__init__(proc)
        self._errf = errf

    def stderr_text(self) -> str:
        try:
            self._errf.flush()
            self._errf.seek(0)
            return self._errf.read()
        except (OSError, ValueError):
            return ""
