"""racelab's cache (~/.cache/racelab, or $RACELAB_CACHE): what takes the space, and its clean-up.

`racelab cache du` sizes every area; `racelab cache gc` removes what is old or dead:

- kernels: all but the --keep most recently used entries (as `racelab kernel gc`);
- build trees: a tree unused for --older-than, or whose source can no longer be had
  (a Debian source package upgraded or removed: its tree's identity is gone for good);
- ccache: objects unused for --older-than (ccache --evict-older-than);
- downloads, boot kernels, initrds, data-plane binaries, fixtures: unused for --older-than;
- images: every guest image and base rootfs unused for --older-than, except the most
  recently used of each (the next run would rebuild it, in minutes, with downloads).

Removal happens under the lock that guards the entry when there is one (taken without
waiting: a held lock means it is in use, and it stays).  VM directories are never
removed here: `racelab cleanup` removes those of a dead racelab.

It is also the one home of how an entry is made, for every cache of the lab (kernels,
data-plane builds, images, initrds, boot kernels, memos): atomic_write() for a file,
building() for a file or directory made in a temporary place beside it and renamed into
place (or thrown away), lock() for the file lock beside an entry, prune() for keeping
the N most recently used.  A reader therefore sees an entry whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from lab.run import BadInput, cache_dir, log, run


# --- making entries ------------------------------------------------------------------

def lock(path: Path) -> FileLock:
    """The file lock at path (FileLock: reentrant in a process, shared between processes)."""
    return FileLock(str(path))


def _tmp_beside(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write path whole or not at all: a temporary file beside it, renamed over it."""
    with building(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        if mode is not None:
            tmp.chmod(mode)


@contextmanager
def building(final: Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Make one cache entry: yields a temporary path beside final (a fresh, empty directory
    when directory=True) that the block fills; when it ends without an exception the temporary
    is renamed to final, else removed.  replace=False: if final appeared meanwhile (another
    process built it first) ours is thrown away and theirs stays; True: ours replaces it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(final)
    _rm(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if final.exists() and not replace:
            log.debug("%s was made meanwhile by another process; ours is dropped", final)
        elif directory and final.is_dir():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{threading.get_ident()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _rm(old)
        else:
            os.replace(tmp, final)
    finally:
        _rm(tmp)


def prune(paths: Iterable[Path], keep: int) -> list[Path]:
    """Remove all but the `keep` most recently used (by mtime) of paths; the removed ones."""
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    old = sorted(paths, key=mtime, reverse=True)[max(keep, 0):]
    for p in old:
        log.debug("removing old cache entry %s", p)
        _rm(p)
    return old


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Area:
    """One directory of the cache and how gc treats it."""

    name: str        # as `racelab cache du` prints it
    path: str        # under cache_dir()
    what: str        # what it holds
    gc: str          # what `racelab cache gc` removes from it


AREAS = (
    Area("kernels", "kernels", "built or fetched kernels (bzImage, config, System.map, build log)",
         "all but the --keep most recently used"),
    Area("build", "build", "source trees, one per source, kept for incremental rebuilds",
         "trees unused for --older-than, and trees of a source that is gone"),
    Area("ccache", "ccache", "compiler cache of the kernel builds", "objects unused for --older-than"),
    Area("downloads", "downloads", "kernel tarballs fetched from URLs", "unused for --older-than"),
    Area("images", "images", "guest images and the base rootfs they are made from",
         "unused for --older-than, except the most recently used image and base"),
    Area("boot", "boot", "PVH kernels extracted from bzImages (QEMU loads them directly)",
         "unused for --older-than"),
    Area("initrd", "initrd", "initramfs of deb: kernels", "unused for --older-than"),
    Area("bin", "bin", "data-plane binaries, per source hash", "unused for --older-than"),
    Area("fixtures", "fixtures", "test fixtures (the synthetic bisection history)", "unused for --older-than"),
    Area("vms", "vms", "VM directories (overlays, consoles) of running guests",
         "never: `racelab cleanup` removes a dead racelab's"),
)


def usage(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, files) under path; sparse images count what they hold."""
    total = files = 0
    try:
        st = path.lstat()
    except OSError:
        return 0, 0
    if not path.is_dir() or path.is_symlink():
        return st.st_blocks * 512, 1
    for root, dirs, names in os.walk(path):
        for n in names + dirs:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
        files += len(names)
    return total, files


def last_used(path: Path) -> float:
    """The newest mtime of path and its direct children (the cache touches what it hands out;
    a build rewrites its tree's top files)."""
    newest = 0.0
    for p in (path, *(path.iterdir() if path.is_dir() and not path.is_symlink() else ())):
        try:
            newest = max(newest, p.lstat().st_mtime)
        except OSError:
            pass
    return newest


@dataclass(frozen=True)
class AreaUsage:
    area: Area
    bytes: int
    files: int


def du() -> list[AreaUsage]:
    """Every area, then anything else in the cache as "other"."""
    root = cache_dir()
    out = [AreaUsage(a, *usage(root / a.path)) for a in AREAS]
    known = {a.path for a in AREAS}
    rest = [p for p in root.iterdir() if p.name not in known]
    other_bytes = other_files = 0
    for p in rest:
        b, f = usage(p)
        other_bytes, other_files = other_bytes + b, other_files + f
    out.append(AreaUsage(Area("other", ".", "small state: accelerator probe, keys, amplifier plans, locks",
                              "never"), other_bytes, other_files))
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class Removed:
    area: str
    path: Path
    bytes: int
    why: str


@contextmanager
def held(lock: Path | None) -> Iterator[bool]:
    """True when the lock is ours (or there is none); False when someone holds it.  Taken
    without waiting: gc code removes only what nobody is building or using."""
    if lock is None:
        yield True
        return
    fl = FileLock(str(lock))
    try:
        fl.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        fl.release()


def _remove(area: str, path: Path, why: str, dry_run: bool, lock: Path | None = None) -> Removed | None:
    with held(lock) as ours:
        if not ours:
            log.info("cache gc: %s is in use (locked), kept", path)
            return None
        size = usage(path)[0]
        if not dry_run:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return Removed(area, path, size, why)


def _old_entries(area: str, older_than: float, dry_run: bool, now: float,
                 keep: Callable[[Path], bool] = lambda p: False,
                 lock: Callable[[Path], Path | None] = lambda p: None) -> list[Removed]:
    d = cache_dir() / area
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.suffix == ".lock" or keep(p):
            continue
        age = now - last_used(p)
        if age > older_than:
            r = _remove(area, p, f"unused for {age / 86400:.0f} days", dry_run, lock(p))
            if r:
                out.append(r)
    return out


def _dead_tree(tree_dir: Path) -> str | None:
    """Why a build tree can never be used again, or None: its source is a Debian package
    whose installed version is another one (or none)."""
    import json

    from lab.kernels import sources

    try:
        identity = json.loads((tree_dir / "state.json").read_text()).get("identity", "")
    except (OSError, ValueError):
        return None
    if not identity.startswith("debsrc:"):
        return None
    pkg = identity.removeprefix("debsrc:").partition("=")[0]
    try:
        now = sources.resolve_source(sources.parse_source(f"debsrc:{pkg}")).identity
    except BadInput:
        return f"{pkg} is no longer installed"
    return None if now == identity else f"{identity} was replaced by {now}"


def gc(keep: int = 5, older_than: float = 14 * 86400, dry_run: bool = False) -> list[Removed]:
    """Remove what is old or dead in every area (see the module docstring); dry_run: only say."""
    from lab.kernels import kernel

    if keep < 0:
        raise BadInput(f"--keep must be >= 0, got {keep}")
    now = time.time()
    removed: list[Removed] = []
    # kernels: by use order, under each entry's lock (kernel.gc)
    if dry_run:
        removed += [Removed("kernels", a.dir, usage(a.dir)[0], f"beyond the {keep} most recently used")
                    for a, _ in kernel._entries()[keep:]]
    else:
        sizes = {a.dir: usage(a.dir)[0] for a, _ in kernel._entries()}
        removed += [Removed("kernels", p, sizes.get(p, 0), f"beyond the {keep} most recently used")
                    for p in kernel.gc(keep)]
    # build trees: dead ones whatever their age, then old ones; each under its tree lock
    build = cache_dir() / "build"
    for d in sorted(build.iterdir()) if build.is_dir() else []:
        if not d.is_dir():
            continue
        why = _dead_tree(d)
        used = max(last_used(d), last_used(d / "linux"))    # .config, vmlinux: rewritten by builds
        if why is None and now - used > older_than:
            why = f"unused for {(now - used) / 86400:.0f} days"
        if why:
            r = _remove("build", d, why, dry_run, Path(f"{d}.lock"))
            if r:
                removed.append(r)
    # ccache evicts by its own use stamps
    cc = cache_dir() / "ccache"
    if cc.is_dir():
        before = usage(cc)[0]
        if not dry_run and shutil.which("ccache"):
            run(["ccache", f"--evict-older-than={max(1, int(older_than))}s"], env={"CCACHE_DIR": str(cc)})
            freed = before - usage(cc)[0]
            if freed > 0:
                removed.append(Removed("ccache", cc, freed, "objects unused for --older-than"))
    for area in ("downloads", "boot", "initrd", "bin", "fixtures"):
        removed += _old_entries(area, older_than, dry_run, now)
    # images: the most recently used image and base stay, whatever their age
    images = cache_dir() / "images"
    newest: set[Path] = set()
    for pattern in ("racelab-*.img", "base-*"):
        found = sorted(images.glob(pattern), key=last_used) if images.is_dir() else []
        newest.update(found[-1:])
    removed += _old_entries("images", older_than, dry_run, now, keep=lambda p: p in newest,
                            lock=lambda p: images / ".lock")
    return removed


def cli_du() -> None:
    rows = du()
    total = sum(r.bytes for r in rows)
    print(f"{'AREA':<10} {'SIZE':>10} {'FILES':>8}  WHAT")
    for r in rows:
        print(f"{r.area.name:<10} {human(r.bytes):>10} {r.files:>8}  {r.area.what}")
    print(f"{'total':<10} {human(total):>10}           in {cache_dir()}")


def cli_gc(keep: int, older_than: float, dry_run: bool) -> list[Removed]:
    removed = gc(keep, older_than, dry_run)
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        print(f"{verb} {r.area}: {r.path} ({human(r.bytes)}; {r.why})")
    print(f"{len(removed)} {verb}, {human(sum(r.bytes for r in removed))} "
          f"{'to free' if dry_run else 'freed'} in {cache_dir()}")
    return removed


__all__ = ["AREAS", "Area", "du", "gc", "usage", "cli_du", "cli_gc"]
