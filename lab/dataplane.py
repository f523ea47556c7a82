"""Building the C data plane (csrc/): xskcheck, xsksend, xskamp and xsktrace, and
racelab-init, the guest's PID 1 (lab.image installs it as GUEST_INIT).

The binaries are static, so the same build runs on the host and in any guest.
A build is keyed by the hash of csrc/, so editing a source file rebuilds and
switching back reuses the older build.  How they are run and what they print
is lab.agent.dataplane (the agent runs them).

    python -m lab.dataplane build [--force]    prints the binary directory
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lab import cache
from lab.agent.dataplane import BINARIES
from lab.run import BadInput, BuildFailed, cache_dir, project_root, require_tools, run

# Built with the data plane but not run by the agent: lab.image puts it at GUEST_INIT.
INIT_BINARY = "racelab-init"
BUILT: tuple[str, ...] = (*BINARIES, INIT_BINARY)

_SRC_SUFFIXES = (".c", ".h")
_SRC_NAMES = ("Makefile",)


# ---------------------------------------------------------------- build

def source_dir() -> Path:
    return project_root() / "csrc"


def source_hash(src: Path | None = None) -> str:
    """sha256 over csrc/'s build inputs (names and contents), hex."""
    src = src or source_dir()
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.is_file() and (p.suffix in _SRC_SUFFIXES or p.name in _SRC_NAMES):
            h.update(p.name.encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _complete(d: Path) -> bool:
    return all(os.access(d / b, os.X_OK) for b in BUILT)


def build(force: bool = False) -> Path:
    """Build (or reuse) the binaries; returns cache_dir()/bin/<hash16>/.

    The build happens in a temporary directory renamed into place, so a
    concurrent build (another pytest worker) or a crash never leaves a half
    directory under the final name.
    """
    src = source_dir()
    if not (src / "Makefile").is_file():
        raise BuildFailed(f"no data-plane sources at {src}", hint="is this a complete racelab checkout?")
    root = cache_dir() / "bin"
    final = root / source_hash(src)[:16]
    if not force and _complete(final):
        return final
    require_tools("gcc", "make")
    require_static_libc()
    # a concurrent builder's complete build (another pytest worker) stays: its binaries may be running
    with cache.building(final, directory=True, replace=force or (final.exists() and not _complete(final))
                        ) as tmp:
        proc = run(["make", "-C", src, f"OUT={tmp}"], check=False)
        output = ((proc.stdout or "") + (proc.stderr or "")).strip()
        if proc.returncode != 0 or not _complete(tmp):
            hint = "needs gcc, make and static glibc: apt-get install build-essential linux-libc-dev"
            raise BuildFailed(f"building the data plane (csrc/) failed, make exit {proc.returncode}:\n"
                              f"{output[-6000:]}", hint=hint)
    return final


def require_static_libc() -> None:
    """The binaries are static (they run in any guest): gcc must find libc.a and the uapi headers."""
    out = run(["gcc", "-print-file-name=libc.a"], check=False).stdout.strip()
    missing = []
    if not out or not os.path.isabs(out) or not os.path.exists(out):
        missing.append(("static glibc (libc.a)", "libc6-dev"))
    if not Path("/usr/include/linux/if_xdp.h").exists():
        missing.append(("kernel uapi headers (linux/if_xdp.h)", "linux-libc-dev"))
    if missing:
        raise BadInput(f"the data plane cannot be built: missing {', '.join(w for w, _ in missing)}",
                       hint=f"apt-get install {' '.join(p for _, p in missing)}  (or run ./bootstrap install)")


# ---------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.dataplane ...` is `racelab dev dataplane ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.dataplane", argv)


if __name__ == "__main__":
    sys.exit(main())
