"""bzimage:PATH: a kernel someone built; config and System.map are taken from beside it,
or from the top of its build tree (PATH = TREE/arch/x86/boot/bzImage)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from lab.run import BadInput
from lab.kernels.bzimage import version as bzimage_version
from lab.kernels.sources.common import Fetched, Resolved, SourceRef, sha256_file

KIND = "bzimage"
EXAMPLE = "bzimage:/path/bzImage"
# what to copy from beside the bzImage, and under which names it may be there
SIBLINGS = (("config", (".config", "config")), ("System.map", ("System.map",)))


def parse(arg: str) -> SourceRef:
    return SourceRef(KIND, arg)


def resolve(ref: SourceRef) -> Resolved:
    path = Path(ref.arg).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"bzImage not found: {path}")
    return Resolved(ref, f"bzimage:sha256={sha256_file(path)}", "", bzimage_version(path), path)


def search_dirs(bzimage: Path) -> list[Path]:
    """Where a bzImage's config and System.map may be: beside it, or at the top of the
    build tree it was built in (arch/x86/boot/bzImage is three levels down)."""
    dirs = [bzimage.parent]
    if bzimage.parent.name == "boot" and len(bzimage.parents) > 3 and \
            (bzimage.parents[3] / "Makefile").is_file():
        dirs.append(bzimage.parents[3])
    return dirs


def fetch(res: Resolved, dest: Path, wanted_modules: Sequence[str] = ()) -> Fetched:
    """Copy it; a missing config or System.map becomes an empty file (the guest side checks)."""
    assert res.origin is not None
    shutil.copyfile(res.origin, dest / "bzImage")
    for name, cands in SIBLINGS:
        found = next((d / c for d in search_dirs(res.origin) for c in cands if (d / c).is_file()), None)
        if found is not None:
            shutil.copyfile(found, dest / name)
        else:
            (dest / name).write_text("")
    return Fetched(res.version, f"# {res.identity}\n# copied from {res.origin}\n")
