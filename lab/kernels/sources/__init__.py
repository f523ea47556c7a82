"""Kernel sources: where a tree or a binary kernel comes from.  One module per kind:

    debsrc:PKG         debsrc.py    Debian's linux-source-X.Y tarball under /usr/src
    tarball:PATH|URL   tarball.py   a kernel tarball (a URL is fetched through a mirror)
    git:/repo@REF      git.py       a tree at a ref, in one worktree per repository
    deb:PKGVER         deb.py       a Debian binary kernel (linux-image-PKGVER), with modules
    bzimage:PATH       bzimage.py   a kernel someone built

Every kind parses its string and pins an identity for the cache key
(common.py).  Kinds built here prepare a persistent tree (tree.py carries
the patch stack); kinds used as shipped fetch into a cache entry.  This
module is the table of kinds and the dispatch over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lab.run import BadInput
from lab.kernels.sources import bzimage, deb, debsrc, git, tarball
from lab.cache import atomic_write
from lab.kernels.sources.common import (BinarySource, BuildSource, Fetched, Resolved, SourceRef, series_of,
                                        sha256_file)
from lab.kernels.sources.tree import PatchStack, apply_patch

BUILDERS: dict[str, BuildSource] = {m.KIND: m for m in (debsrc, tarball, git)}
BINARIES: dict[str, BinarySource] = {m.KIND: m for m in (deb, bzimage)}
SOURCE_KINDS: tuple[str, ...] = (*BUILDERS, *BINARIES)


def parse_source(text: str) -> SourceRef:
    kind, sep, arg = text.partition(":")
    mod: BuildSource | BinarySource | None = BUILDERS.get(kind) or BINARIES.get(kind)
    if not sep or mod is None or not arg:
        kinds: list[BuildSource | BinarySource] = [*BUILDERS.values(), *BINARIES.values()]
        examples = ", ".join(m.EXAMPLE for m in kinds)
        raise BadInput(f"not a kernel source: {text!r}",
                       hint=f"use {examples}, or a catalog name (racelab kernel list)")
    return mod.parse(arg)


def resolve_source(ref: SourceRef) -> Resolved:
    return (BUILDERS.get(ref.kind) or BINARIES[ref.kind]).resolve(ref)


def series(ref: SourceRef) -> str:
    """The kernel series of a source build ('6.1'), told cheaply; '' when it cannot be."""
    return BUILDERS[ref.kind].series(ref) if ref.kind in BUILDERS else ""


def prepare_tree(res: Resolved, build_dir: Path, patches: Sequence[Path], logf: IO[str] | None = None) -> PatchStack:
    """The persistent tree for this source, at the right content, carrying exactly `patches`.

    Caller holds the build directory's lock.  What was done goes to logf.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    stack = PatchStack(build_dir)
    done = BUILDERS[res.ref.kind].prepare(res, stack)
    done += [f"patch stack: {line}" for line in stack.switch(patches)]
    if logf:
        logf.writelines(f"# {line}\n" for line in done)
    return stack


def fetch(res: Resolved, dest: Path, wanted_modules: Sequence[str]) -> Fetched:
    """A binary kernel into dest (bzImage, config, System.map, maybe modules/)."""
    return BINARIES[res.ref.kind].fetch(res, dest, wanted_modules)


__all__ = ["SOURCE_KINDS", "BUILDERS", "BINARIES", "SourceRef", "Resolved", "Fetched", "PatchStack",
           "parse_source", "resolve_source", "series", "prepare_tree", "fetch", "apply_patch",
           "sha256_file", "atomic_write", "series_of"]
