"""The host's side of running things: lab.agent.run, plus the cache and the source tree.

run(), spawn(), the tool hints and the typed errors (BadInput, InfraError and its
children) live in lab.agent.run, because the guest needs them too; they are
imported here so that host code has one module to import them from.  What only
the host needs is defined here: the cache directory, the source tree, logging.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from lab.agent.run import (EXIT_BAD_INPUT, EXIT_INFRA, EXIT_MISMATCH, EXIT_OK, TOOL_PACKAGES, BadInput,
                           BuildFailed, CommandFailed, InfraError, LostSSH, LostVM, RacelabError,
                           log, require_tools, run, spawn, stop, tool_hint)

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_INFRA", "EXIT_MISMATCH", "EXIT_OK", "TOOL_PACKAGES", "BadInput",
    "BuildFailed", "CommandFailed", "InfraError", "LostSSH", "LostVM", "RacelabError",
    "log", "require_tools", "run", "spawn", "stop", "tool_hint",
    "require_root", "cache_dir", "project_root", "writable_dir_problem", "slug", "setup_logging",
]


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BadInput(f"{what} needs root (network namespaces, XDP, AF_XDP)",
                       hint="run it with sudo, or as root")


def cache_dir() -> Path:
    """~/.cache/racelab, or $RACELAB_CACHE."""
    p = Path(os.environ.get("RACELAB_CACHE") or Path.home() / ".cache" / "racelab")
    p.mkdir(parents=True, exist_ok=True)
    return p


def project_root() -> Path:
    """The source tree (scenarios/, kernels/, csrc/ live beside lab/)."""
    return Path(__file__).resolve().parent.parent


def writable_dir_problem(path: Path) -> str | None:
    """None if path is, or can be made, a directory this process can write; else what is wrong.

    Tried for real (root passes every permission check, not a read-only file system or a
    path under a regular file), and nothing is left behind: the directories it made for
    the probe are removed again."""
    p = Path(os.path.abspath(path))
    missing = []
    q = p
    while not q.exists() and not q.is_symlink() and q != q.parent:
        missing.append(q)
        q = q.parent
    if not q.is_dir():
        return f"{q} is not a directory"
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        probe = p / f".racelab-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
    return None


def slug(text: str, limit: int | None = None) -> str:
    """text as a file or domain name: runs of anything but [A-Za-z0-9_.-] become one "_";
    limit: at most that many characters (VM names and result directories keep 40)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
    return s if limit is None else s[:limit]


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose > 0 else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(message)s" if verbose == 0 else "%(asctime)s %(name)s: %(message)s")
    # paramiko narrates every connection at INFO; only its problems matter here
    logging.getLogger("paramiko").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
