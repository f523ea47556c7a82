"""debsrc:linux-source-X.Y: Debian's kernel source package, the tarball it puts under /usr/src.

The identity is the installed package version, so an upgrade of
linux-source-6.1 is a new cache key (and a fresh extraction).
"""

from __future__ import annotations

import re
from pathlib import Path

from lab.run import BadInput, run
from lab.kernels.sources import tarball
from lab.kernels.sources.common import Resolved, SourceRef
from lab.kernels.sources.tree import PatchStack

KIND = "debsrc"
EXAMPLE = "debsrc:linux-source-6.1"
_PKG = re.compile(r"linux-source-(\d+\.\d+)")


def parse(arg: str) -> SourceRef:
    if not _PKG.fullmatch(arg):
        raise BadInput(f"not a Debian kernel source package: {arg!r}", hint="e.g. debsrc:linux-source-6.1")
    return SourceRef(KIND, arg)


def resolve(ref: SourceRef) -> Resolved:
    pkg = ref.arg
    path = Path("/usr/src") / f"{pkg}.tar.xz"
    proc = run(["dpkg-query", "-W", "-f", "${Status}|${Version}", pkg], check=False)
    status, _, pkgver = proc.stdout.partition("|")
    if proc.returncode != 0 or "installed" not in status.split() or not path.is_file():
        raise BadInput(f"{pkg} is not installed ({path} missing)", hint=f"apt-get install {pkg}")
    upstream = pkgver.split("-")[0]
    return Resolved(ref, f"debsrc:{pkg}={pkgver}", f"debsrc-{pkg}-{pkgver}", upstream, path)


def series(ref: SourceRef) -> str:
    """The package name says it: linux-source-6.1 -> 6.1."""
    m = _PKG.fullmatch(ref.arg)
    return m.group(1) if m else ""


def prepare(res: Resolved, stack: PatchStack) -> list[str]:
    return tarball.prepare(res, stack)        # the same: one tarball, extracted once
