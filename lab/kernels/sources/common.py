"""What every source kind shares: the parsed and the pinned source, and the two
interfaces a kind module implements (one for trees built here, one for kernels
used as shipped).

A kind module is the implementation itself (no classes): lab.kernels.sources.git
has KIND, parse(), resolve(), series() and prepare() at module level, and
lab.kernels.sources lists the modules in a table.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lab.cache import atomic_write
from lab.run import cache_dir

if TYPE_CHECKING:
    from lab.kernels.sources.tree import PatchStack


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string, before anything is fetched or resolved."""

    kind: str        # one of lab.kernels.sources.SOURCE_KINDS
    arg: str         # what follows "kind:" (package, path, URL, repo)
    ref: str = ""    # git only: the ref after '@'

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" + (f"@{self.ref}" if self.ref else "")

    @property
    def builds(self) -> bool:
        """True for sources that are compiled here (patches, fragments apply)."""
        from lab.kernels.sources import BUILDERS      # the table lives beside the modules it lists
        return self.kind in BUILDERS


@dataclass(frozen=True)
class Resolved:
    """A source pinned down: what exactly will be built or fetched."""

    ref: SourceRef
    identity: str          # goes into the cache key: changes when the content changes
    build_id: str          # names the persistent build directory ("" for binaries)
    version: str           # upstream version when known ("6.1.192"), else ""
    origin: Path | None    # the tarball / repo / file on disk, when there is one


@dataclass(frozen=True)
class Fetched:
    """What a binary source put into a cache entry besides bzImage, config and System.map."""

    version: str                          # what `uname -r` reports in the guest
    log: str                              # the entry's build.log: where it came from
    modules: bool = False                 # dest/modules holds a /lib/modules/<version> subset
    load_order: tuple[str, ...] = ()      # .ko paths relative to modules/, dependencies first


class BuildSource(Protocol):
    """A kind whose tree is compiled here: debsrc, tarball, git."""

    KIND: str
    EXAMPLE: str       # for hints: a well-formed source string of this kind

    def parse(self, arg: str) -> SourceRef:
        """Check what follows 'KIND:' (no I/O); BadInput naming the problem."""
        ...

    def resolve(self, ref: SourceRef) -> Resolved:
        """Pin the exact content (package version, commit, sha256) for the cache key."""
        ...

    def series(self, ref: SourceRef) -> str:
        """The kernel series ('6.1') if it can be told cheaply (no download, no extraction), else ''."""
        ...

    def prepare(self, res: Resolved, stack: PatchStack) -> list[str]:
        """Make stack.tree hold exactly res's content, keeping build output where
        it can; the patch stack is the caller's.  Returns what it did, for the log."""
        ...


class BinarySource(Protocol):
    """A kind used as shipped: deb, bzimage."""

    KIND: str
    EXAMPLE: str

    def parse(self, arg: str) -> SourceRef:
        ...

    def resolve(self, ref: SourceRef) -> Resolved:
        ...

    def fetch(self, res: Resolved, dest: Path, wanted_modules: Sequence[str]) -> Fetched:
        """Put bzImage, config and System.map (and modules/ if any) into dest."""
        ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def series_of(version: str) -> str:
    """'6.1.192' -> '6.1' (which patch files fit)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else ""


def memo(name: str) -> dict[str, str]:
    """A small JSON memo in the cache (digests, apt candidates); {} when absent or torn."""
    try:
        data: dict[str, str] = json.loads((cache_dir() / name).read_text())
        return data
    except (OSError, ValueError):
        return {}


def save_memo(name: str, data: dict[str, str]) -> None:
    atomic_write(cache_dir() / name, json.dumps(data, indent=1))
