"""Kernels on demand: the catalog, spec resolution, and the content-addressed cache.

    spec string --resolve()--> KernelSpec --ensure()--> KernelArtifact

A spec is a catalog name (kernels/catalog.toml), `NAME+patch...`, or a
source string (debsrc:, deb:, git:, tarball:, bzimage:; see lab.kernels.sources).
ensure() builds or fetches it once: the cache key covers the source identity,
the patch contents, the merged config fragment and the compiler, and an entry
under cache_dir()/kernels/<key>/ appears only when it is complete (built in a
temporary directory, renamed into place).  A lock per key makes concurrent
builds of one kernel (pytest-xdist) build it once.

Sources are compiled in one persistent tree per source (lab.kernels.sources), with
the config and make steps in lab.kernels.kbuild.

    python -m lab.kernels.kernel build 6.1.192+revert-generic-rx
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lab import cache
from lab.kernels import bzimage, kbuild, sources
from lab.run import BadInput, BuildFailed, cache_dir, log, project_root

KEY_SCHEME = 1          # bump when the build procedure changes what a key produces
DEFAULT_FRAGMENT = "config/lab.config"
SUMS = "sha256sums"     # in each entry, `sha256sum -c` format: every artifact file's hash
# entry files that are bookkeeping, not artifacts (they change, or say how it was made)
_UNHASHED = {"meta.json", "used", "build.log", SUMS}


def kernels_root() -> Path:
    """The kernels/ data directory of the source tree."""
    return project_root() / "kernels"


def store() -> Path:
    """cache_dir()/kernels: one directory per cache key."""
    p = cache_dir() / "kernels"
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------- catalog


@dataclass(frozen=True)
class CatalogPatch:
    name: str
    file: str                    # relative to kernels/, "{series}" substituted per source
    undoes: tuple[str, ...]
    affects: tuple[str, ...]
    note: str = ""

    def path(self, series: str, root: Path) -> Path:
        return root / self.file.format(series=series)


@dataclass(frozen=True)
class CatalogSource:
    spec: str
    series: str
    version: str
    affected: tuple[str, ...]


@dataclass(frozen=True)
class CatalogKernel:
    name: str
    source: str
    patches: tuple[str, ...]
    fragments: tuple[str, ...]
    affected: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Catalog:
    root: Path
    races: dict[str, tuple[str, ...]]
    sources: dict[str, CatalogSource]
    patches: dict[str, CatalogPatch]
    kernels: dict[str, CatalogKernel]
    deb_modules: tuple[str, ...]


def load_catalog(path: Path | None = None) -> Catalog:
    """Parse and validate kernels/catalog.toml; every problem is reported at once."""
    path = path or kernels_root() / "catalog.toml"
    root = path.parent
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read the kernel catalog {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: {e}") from None
    problems: list[str] = []

    def strs(where: str, d: dict[str, Any], key: str, required: bool = True) -> tuple[str, ...]:
        v = d.get(key, None if required else [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            problems.append(f"{where}.{key}: expected a list of strings")
            return ()
        return tuple(v)

    def text(where: str, d: dict[str, Any], key: str, required: bool = True) -> str:
        v = d.get(key, None if required else "")
        if not isinstance(v, str):
            problems.append(f"{where}.{key}: expected a string")
            return ""
        return v

    races = {n: strs(f"race.{n}", d, "fix") for n, d in data.get("race", {}).items()}
    tables = {}
    for n, d in data.get("source", {}).items():
        w = f"source.{n!r}"
        tables[n] = CatalogSource(n, text(w, d, "series"), text(w, d, "version"), strs(w, d, "affected"))
    patches = {}
    for n, d in data.get("patch", {}).items():
        w = f"patch.{n}"
        patches[n] = CatalogPatch(n, text(w, d, "file"), strs(w, d, "undoes"), strs(w, d, "affects"),
                                  text(w, d, "note", False))
    kernels = {}
    for n, d in data.get("kernel", {}).items():
        w = f"kernel.{n!r}"
        unknown = set(d) - {"source", "patches", "fragments", "affected", "note"}
        if unknown:
            problems.append(f"{w}: unknown field(s) {sorted(unknown)}")
        k = CatalogKernel(n, text(w, d, "source"), strs(w, d, "patches"), strs(w, d, "fragments"),
                          strs(w, d, "affected"), text(w, d, "note", False))
        kernels[n] = k
        for p in k.patches:
            if p not in patches:
                problems.append(f"{w}.patches: unknown patch {p!r} (known: {', '.join(patches)})")
        for r in k.affected:
            if r not in races:
                problems.append(f"{w}.affected: unknown race {r!r} (known: {', '.join(races)})")
        for f in k.fragments:
            if not (root / f).is_file():
                problems.append(f"{w}.fragments: {f} does not exist under {root}")
        try:
            ref = sources.parse_source(k.source)
        except BadInput as e:
            problems.append(f"{w}.source: {e.message}")
            continue
        if ref.kind == "debsrc":
            src = tables.get(k.source)
            if src is None:
                problems.append(f"{w}.source: {k.source} has no [source.{k.source!r}] table (series unknown)")
            else:
                for p in k.patches:
                    if p in patches and not patches[p].path(src.series, root).is_file():
                        problems.append(f"{w}: patch file {patches[p].path(src.series, root)} does not exist")
        elif k.patches or k.fragments:
            problems.append(f"{w}: a {ref.kind}: kernel is not built here; patches/fragments must be empty")
    deb_modules = strs("deb", data.get("deb", {}), "modules", False)
    if problems:
        raise BadInput(f"{path} has {len(problems)} problem(s):\n    " + "\n    ".join(problems))
    return Catalog(root, races, tables, patches, kernels, deb_modules)


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class KernelSpec:
    """What to build or fetch, fully named; frozen and JSON round-trippable."""

    name: str                          # catalog name, or the spec as the user typed it
    source: str                        # debsrc:/deb:/git:/tarball:/bzimage: string
    patches: tuple[str, ...] = ()      # absolute patch file paths, applied in order
    fragments: tuple[str, ...] = ()    # absolute fragment paths, merged in order
    affected: tuple[str, ...] | None = None   # races it is affected by; None = unknown
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelSpec:
        d = json.loads(text)
        aff = d.get("affected")
        return cls(d["name"], d["source"], tuple(d.get("patches", ())), tuple(d.get("fragments", ())),
                   None if aff is None else tuple(aff), d.get("note", ""))


def catalog_names(catalog: Catalog | None = None) -> list[str]:
    return list((catalog or load_catalog()).kernels)


def resolve(spec: str, *, fragments: Sequence[str | Path] = (), patches: Sequence[str | Path] = (),
            catalog: Catalog | None = None) -> KernelSpec:
    """A spec string (+ extra --fragment/--patch) -> KernelSpec.  Unknown names list close matches."""
    cat = catalog or load_catalog()
    spec = spec.strip()
    typed = spec
    spec, files_p, files_f = _split_files(spec, cat)
    patches, fragments = (*files_p, *patches), (*files_f, *fragments)
    base = _resolve_base(spec, cat)
    if not fragments and not patches:
        return base
    ref = sources.parse_source(base.source)
    if not ref.builds:
        raise BadInput(f"{spec}: a {ref.kind}: kernel is used as shipped; --fragment/--patch need a source build",
                       hint="use a debsrc:, git: or tarball: source")
    extra_p = [_patch_path(p, lambda: _series(base.source, cat), cat) for p in patches]
    extra_f = [_fragment_path(f, cat) for f in fragments]
    affected = base.affected
    if affected is not None:
        for p in patches:
            if isinstance(p, str) and p in cat.patches:
                affected = tuple(dict.fromkeys(affected + cat.patches[p].affects))
            else:
                affected = None          # an outside patch may change anything
                break
    label = typed if files_p or files_f else spec
    label += "".join(f" +{Path(str(x)).name}" for x in (*patches[len(files_p):], *fragments[len(files_f):]))
    return KernelSpec(label, base.source, base.patches + tuple(map(str, extra_p)),
                      base.fragments + tuple(map(str, extra_f)), affected, base.note)


def _split_files(spec: str, cat: Catalog) -> tuple[str, list[str], list[str]]:
    """NAME+x+y where some x are files: (NAME+the catalog patches, patch files, fragments).

    A `+` part that is not a catalog patch is a file: a config fragment if it ends in
    .config (or names one in kernels/config), else a patch.  `6.1.192+~/fix.patch`
    then means the same as `6.1.192 --patch ~/fix.patch`, wherever --kernel is taken."""
    head, *tail = spec.split("+")
    if not tail or head not in cat.kernels and head.partition(":")[0] != "debsrc":
        return spec, [], []
    names = [t for t in tail if t in cat.patches]
    others = [t for t in tail if t not in cat.patches]
    if not others:
        return spec, [], []
    patches: list[str] = []
    frags: list[str] = []
    if not any("/" in t or t.endswith((".patch", ".diff", ".config")) or _input_file(t, cat)
               or (cat.root / "config" / f"{t}.config").is_file() for t in others):
        return spec, [], []   # a misspelt catalog name: _resolve_base suggests close matches
    for t in others:
        if t.endswith(".config") or (_input_file(t, cat) is None and "/" not in t
                                     and any((cat.root / "config" / n).is_file() for n in (t, f"{t}.config"))):
            frags.append(t)
        elif _input_file(t, cat) is not None:
            patches.append(t)
        else:
            raise BadInput(f"{spec}: {t!r} is neither a catalog patch nor a file",
                           hint=f"catalog patches: {', '.join(cat.patches)}; or a path to a .patch file "
                                f"or a .config fragment (relative to . or {cat.root.parent})")
    return "+".join([head, *names]), patches, frags


def _resolve_base(spec: str, cat: Catalog) -> KernelSpec:
    if spec in cat.kernels:
        return _from_catalog(cat.kernels[spec], cat)
    # NAME+patch+patch over a catalog source build
    head, *tail = spec.split("+")
    if tail and head in cat.kernels and all(t in cat.patches for t in tail):
        k = cat.kernels[head]
        k2 = CatalogKernel(spec, k.source, k.patches + tuple(tail), k.fragments,
                           tuple(dict.fromkeys(k.affected + sum((cat.patches[t].affects for t in tail), ()))),
                           k.note)
        return _from_catalog(k2, cat)
    kind = spec.partition(":")[0]
    if kind not in sources.SOURCE_KINDS:
        close = difflib.get_close_matches(spec, list(cat.kernels), n=5, cutoff=0.5)
        hint = ("did you mean: " + ", ".join(close)) if close else "racelab kernel list shows the catalog"
        raise BadInput(f"unknown kernel {spec!r}", hint=hint)
    if kind == "debsrc":
        src, *names = spec.split("+")
        sources.parse_source(src)
        known = cat.sources.get(src)
        paths = tuple(str(_patch_path(n, lambda: _series(src, cat), cat)) for n in names)
        affected: tuple[str, ...] | None = None
        if known and all(n in cat.patches for n in names):
            affected = tuple(dict.fromkeys(known.affected + sum((cat.patches[n].affects for n in names), ())))
        return KernelSpec(spec, src, paths, (str(cat.root / DEFAULT_FRAGMENT),), affected)
    sources.parse_source(spec)
    frags = (str(cat.root / DEFAULT_FRAGMENT),) if kind in sources.BUILDERS else ()
    return KernelSpec(spec, spec, (), frags, None)


def _from_catalog(k: CatalogKernel, cat: Catalog) -> KernelSpec:
    series = cat.sources[k.source].series if k.source in cat.sources else ""
    return KernelSpec(k.name, k.source,
                      tuple(str(cat.patches[p].path(series, cat.root)) for p in k.patches),
                      tuple(str(cat.root / f) for f in k.fragments), k.affected, k.note)


def _series(source: str, cat: Catalog) -> str:
    """The kernel series of a source build ('6.1'): the catalog's word, else the source's
    own (package name, tarball name, the Makefile at a git ref); '' if it cannot tell."""
    if source in cat.sources:
        return cat.sources[source].series
    return sources.series(sources.parse_source(source))


def _patch_path(p: str | Path, series: Callable[[], str], cat: Catalog) -> Path:
    """A catalog patch name (the file for this source's series) or a patch file.

    `series` is only asked for a catalog name (on a git: source it reads the
    Makefile at the ref)."""
    if isinstance(p, str) and p in cat.patches:
        entry = cat.patches[p]
        have = sorted(q.relative_to(cat.root).as_posix() for q in cat.root.glob(entry.file.format(series="*")))
        s = series()
        if not s:
            raise BadInput(f"catalog patch {p!r}: cannot tell which kernel series this source is",
                           hint=f"pass the patch file instead: --patch {cat.root}/{have[0] if have else entry.file}")
        path = entry.path(s, cat.root)
        if not path.is_file():
            raise BadInput(f"catalog patch {p!r} has no version for kernel {s} ({path} does not exist)",
                           hint=f"it exists as {', '.join(have)}; pass a patch file rebased onto {s} instead")
        return path
    found = _input_file(p, cat)
    if found is None:
        raise BadInput(f"patch not found: {p}", hint=f"a file (relative to . or {cat.root.parent}), "
                                                     f"or a catalog patch: {', '.join(cat.patches)}")
    return found


def _input_file(p: str | Path, cat: Catalog) -> Path | None:
    """A file the user named: absolute, or relative to the current directory, then
    to the project root (so kernels/config/kcsan.config works from anywhere)."""
    path = Path(p).expanduser()
    for c in [path] if path.is_absolute() else [path, cat.root.parent / path]:
        if c.is_file():
            return c.resolve()
    return None


def _fragment_path(f: str | Path, cat: Catalog) -> Path:
    found = _input_file(f, cat)
    if found is not None:
        return found
    if isinstance(f, str) and "/" not in f:       # a bare name: kernels/config/NAME[.config]
        for c in (cat.root / "config" / f, cat.root / "config" / f"{f}.config"):
            if c.is_file():
                return c.resolve()
    avail = sorted(p.name for p in (cat.root / "config").glob("*.config"))
    raise BadInput(f"config fragment not found: {f}",
                   hint=f"a file (relative to . or {cat.root.parent}), or a name in kernels/config: {', '.join(avail)}")


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class KernelArtifact:
    """A built or fetched kernel in the cache (meta.json in its directory)."""

    name: str
    key: str
    dir: Path
    bzimage: Path
    config: Path
    system_map: Path
    build_log: Path
    version: str                              # what `uname -r` reports in the guest
    source: str
    source_identity: str = ""                 # exact source: package version, commit, sha256
    patches: tuple[str, ...] = ()
    fragments: tuple[str, ...] = ()
    affected: tuple[str, ...] | None = None   # None: not from the catalog, unknown
    vmlinux: Path | None = None
    modules_dir: Path | None = None           # deb: only: a /lib/modules/<version> subset
    module_load_order: tuple[str, ...] = ()   # .ko paths relative to modules_dir, dependencies first
    config_hash: str = ""                     # sha256 of the merged required fragment
    compiler: str = ""
    build_seconds: float = 0.0
    created: float = 0.0                      # unix time the entry was completed

    def to_json(self) -> str:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelArtifact:
        d = json.loads(text)
        kw: dict[str, Any] = {}
        paths = {"dir", "bzimage", "config", "system_map", "build_log", "vmlinux", "modules_dir"}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in paths:
                v = None if v is None else Path(v)
            elif f.name == "affected":
                v = None if v is None else tuple(v)
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)

    def relocated(self, new_dir: Path) -> KernelArtifact:
        """The same entry after its directory moved (paths follow it)."""
        def move(p: Path | None) -> Path | None:
            return None if p is None else new_dir / p.relative_to(self.dir)
        return KernelArtifact(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                 "dir": new_dir, "bzimage": move(self.bzimage), "config": move(self.config),
                                 "system_map": move(self.system_map), "build_log": move(self.build_log),
                                 "vmlinux": move(self.vmlinux), "modules_dir": move(self.modules_dir)})


def load_artifact(entry: Path) -> KernelArtifact | None:
    """The artifact in a complete cache entry, with paths rebased on where it is now."""
    meta = entry / "meta.json"
    try:
        art = KernelArtifact.from_json(meta.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if art.dir != entry:
        art = art.relocated(entry)
    return art if art.bzimage.is_file() else None


def _artifact_files(entry: Path) -> list[Path]:
    """Every file of an entry that a run uses (bzImage, config, System.map, vmlinux, modules)."""
    return sorted(p for p in entry.rglob("*")
                  if p.is_file() and p.relative_to(entry).as_posix() not in _UNHASHED)


def _record_sums(entry: Path) -> None:
    lines = [f"{sources.sha256_file(p)}  {p.relative_to(entry).as_posix()}\n" for p in _artifact_files(entry)]
    sources.atomic_write(entry / SUMS, "".join(lines))


def _recorded_sums(entry: Path) -> dict[str, str] | None:
    """relative path -> sha256 as recorded when the entry was made; None if it has none."""
    try:
        text = (entry / SUMS).read_text()
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            out[name] = digest
    return out


def _corruption(entry: Path) -> str:
    """The first artifact file whose hash is not the one recorded when the entry
    was made (and how); empty if every one matches.

    An entry made before hashes were recorded gets them now (trust on first
    use) if its bzImage is as long as its header says: such an entry was
    complete when it was renamed into place, and rebuilding every older entry
    would cost a full kernel build each; the header check still catches a
    truncated bzImage, the damage seen in practice."""
    sums = _recorded_sums(entry)
    if sums is None:
        bad = bzimage.truncation(entry / "bzImage")
        if bad:
            return f"bzImage {bad} (no hashes recorded)"
        _record_sums(entry)
        log.info("[kernel] cache entry %s was made before hashes were recorded: recorded them now "
                 "(its bzImage is whole by its header; the other files are trusted as they are)", entry.name)
        return ""
    for name, digest in sums.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        got = sources.sha256_file(path)
        if got != digest:
            return (f"{name} does not match its recorded sha256 "
                    f"({path.stat().st_size} bytes, {got[:12]} != {digest[:12]})")
    return ""


def _touch(entry: Path) -> None:
    """Mark a use: the mtime orders gc, the content (unique per use) tells gc the entry
    was used after it listed it, however coarse the file system's clock."""
    (entry / "used").write_text(f"{time.time_ns()} {os.getpid()} {threading.get_ident()}\n")


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class Plan:
    """A spec pinned to exact inputs, with its cache key."""

    spec: KernelSpec
    res: sources.Resolved
    options: dict[str, str] = field(default_factory=dict)   # merged required fragment
    compiler: str = ""
    key: str = ""


def cache_key(source_identity: str, patch_digests: Sequence[str], config_digest: str, compiler: str) -> str:
    material = json.dumps({"scheme": KEY_SCHEME, "arch": kbuild.ARCH, "base": "allnoconfig",
                           "source": source_identity, "patches": list(patch_digests),
                           "config": config_digest, "compiler": compiler}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def plan(spec: KernelSpec) -> Plan:
    ref = sources.parse_source(spec.source)
    if not ref.builds and (spec.patches or spec.fragments):
        raise BadInput(f"{spec.name}: patches/fragments need a source build, not {ref.kind}:")
    res = sources.resolve_source(ref)
    if not ref.builds:
        return Plan(spec, res, key=cache_key(res.identity, [], "", ""))
    for p in spec.patches:
        if not Path(p).is_file():
            raise BadInput(f"patch not found: {p}")
    options = kbuild.merge_fragments([Path(f) for f in spec.fragments])
    compiler = kbuild.compiler_version()      # the rest of the toolchain only when _build() runs
    key = cache_key(res.identity, [sources.sha256_file(Path(p)) for p in spec.patches],
                    kbuild.config_hash(options), compiler)
    return Plan(spec, res, options, compiler, key)


# ---------------------------------------------------------------- ensure


def ensure(spec: KernelSpec, *, progress: bool = True, want_vmlinux: bool = False) -> KernelArtifact:
    """The kernel for `spec`, from the cache or built/fetched now (once, under a lock)."""
    p = plan(spec)
    entry = store() / p.key
    # A hit takes the key lock too (for microseconds): gc removes an entry only
    # under that lock, and only if nobody used it since gc listed it.
    lock = FileLock(str(store() / f"{p.key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("[kernel] %s: another process is building or removing it (key %s); waiting", spec.name, p.key)
        lock.acquire()
    try:
        art = _usable(entry, want_vmlinux, spec)
        if art is not None:
            _touch(entry)
            return art
        # an existing entry (one without vmlinux, or a corrupt one) is replaced whole
        with cache.building(entry, directory=True) as tmp:
            art = _build(p, tmp, progress, want_vmlinux) if p.res.ref.builds else _fetch(p, tmp)
            art = art.relocated(entry) if art.dir != entry else art
            (tmp / "meta.json").write_text(art.to_json())
            _record_sums(tmp)
        _touch(entry)
        log.info("[kernel] %s ready: %s (%.0fs)", spec.name, entry, art.build_seconds)
        return art
    finally:
        lock.release()


def _usable(entry: Path, want_vmlinux: bool, spec: KernelSpec) -> KernelArtifact | None:
    """The cached entry, named as asked: one key can be reached by several specs
    (a catalog name, debsrc:...+patch), and `affected` follows the spec."""
    art = load_artifact(entry)
    if art is None or (want_vmlinux and art.vmlinux is None and sources.parse_source(art.source).builds):
        return None
    bad = _corruption(entry)
    if bad:
        again = "rebuilding it" if sources.parse_source(art.source).builds else "fetching it again"
        log.warning("[kernel] cache entry %s (%s) is corrupt: %s; %s", entry.name, spec.name, bad, again)
        return None
    return dataclasses.replace(art, name=spec.name, affected=spec.affected)


def _build(p: Plan, tmp: Path, progress: bool, want_vmlinux: bool) -> KernelArtifact:
    spec = p.spec
    kbuild.require_toolchain()
    build_dir = cache_dir() / "build" / p.res.build_id
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log_path = tmp / "build.log"
    tree_lock = FileLock(str(build_dir) + ".lock")
    try:
        tree_lock.acquire(timeout=0)
    except Timeout:
        log.info("[kernel] %s: the %s tree is busy with another build; waiting", spec.name, p.res.build_id)
        tree_lock.acquire()
    try:
        with open(log_path, "w") as logf:
            logf.write(f"# racelab kernel build: {spec.name}\n# source {p.res.identity}\n"
                       f"# patches {list(spec.patches)}\n# fragments {list(spec.fragments)}\n"
                       f"# compiler {p.compiler}\n# key {p.key}\n")
            stack = sources.prepare_tree(p.res, build_dir, [Path(x) for x in spec.patches], logf)
            tree = stack.tree
            try:
                kbuild.configure(tree, p.options, logf)
                fresh = not (tree / "vmlinux").exists()
                prog = kbuild.Progress(spec.name, progress, estimate=kbuild.estimate_steps(build_dir, fresh))
                log.info("[kernel] building %s in %s (-j%d%s)", spec.name, tree, kbuild.jobs(),
                         ", fresh tree" if fresh else ", incremental")
                kbuild.make(tree, ["bzImage"], logf, prog)
                kbuild.check_payload(tree)
                if fresh:
                    stack.save(full_steps=prog.steps)
            except BuildFailed as e:
                failed = store() / "failed"
                failed.mkdir(exist_ok=True)
                keep = failed / f"{p.key}.log"
                logf.flush()
                shutil.copyfile(log_path, keep)
                raise BuildFailed(e.message, hint=f"full log: {keep}") from None
            version = kbuild.kernelrelease(tree)
            shutil.copyfile(tree / "arch/x86/boot/bzImage", tmp / "bzImage")
            shutil.copyfile(tree / ".config", tmp / "config")
            shutil.copyfile(tree / "System.map", tmp / "System.map")
            if want_vmlinux:
                shutil.copyfile(tree / "vmlinux", tmp / "vmlinux")
            applied = [a["sha256"] for a in stack.applied()]
    finally:
        tree_lock.release()
    want = [sources.sha256_file(Path(x)) for x in spec.patches]
    if applied != want:
        raise BuildFailed(f"{spec.name}: a patch file changed during the build", hint="build again")
    return KernelArtifact(
        name=spec.name, key=p.key, dir=tmp, bzimage=tmp / "bzImage", config=tmp / "config",
        system_map=tmp / "System.map", build_log=log_path, version=version, source=spec.source,
        source_identity=p.res.identity, patches=spec.patches, fragments=spec.fragments,
        affected=spec.affected, vmlinux=tmp / "vmlinux" if want_vmlinux else None,
        config_hash=kbuild.config_hash(p.options), compiler=p.compiler,
        build_seconds=round(time.monotonic() - t0, 1), created=time.time())


def _fetch(p: Plan, tmp: Path) -> KernelArtifact:
    spec = p.spec
    t0 = time.monotonic()
    log.info("[kernel] fetching %s", p.res.identity)
    got = sources.fetch(p.res, tmp, load_catalog().deb_modules)
    log_path = tmp / "build.log"
    log_path.write_text(got.log)
    return KernelArtifact(
        name=spec.name, key=p.key, dir=tmp, bzimage=tmp / "bzImage", config=tmp / "config",
        system_map=tmp / "System.map", build_log=log_path, version=got.version, source=spec.source,
        source_identity=p.res.identity, affected=spec.affected,
        modules_dir=tmp / "modules" if got.modules else None, module_load_order=got.load_order,
        build_seconds=round(time.monotonic() - t0, 1), created=time.time())


# ---------------------------------------------------------------- list / show / gc


def cached() -> list[KernelArtifact]:
    """Every complete cache entry, most recently used first."""
    return [a for a, _ in _entries()]


def _entries() -> list[tuple[KernelArtifact, tuple[int, str]]]:
    """Complete entries with their use stamp, most recently used first."""
    out = []
    for entry in store().iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != "failed":
            art = load_artifact(entry)
            if art is not None:
                out.append((art, _use_stamp(entry)))
    return sorted(out, key=lambda x: x[1][0], reverse=True)


def _use_stamp(entry: Path) -> tuple[int, str]:
    """(mtime in ns, content) of the entry's `used` file (meta.json's mtime before the first use)."""
    try:
        return (entry / "used").stat().st_mtime_ns, (entry / "used").read_text()
    except OSError:
        pass
    try:
        return (entry / "meta.json").stat().st_mtime_ns, ""
    except OSError:
        return 0, ""


@dataclass(frozen=True)
class Listing:
    name: str
    source: str
    affected: tuple[str, ...] | None
    note: str
    cached: KernelArtifact | None     # the most recently used entry of that name


def list_kernels() -> list[Listing]:
    """Catalog kernels (with their newest cached build, matched by name), then other cached ones."""
    cat = load_catalog()
    by_name: dict[str, KernelArtifact] = {}
    for a in cached():
        by_name.setdefault(a.name, a)
    rows = [Listing(k.name, k.source, k.affected, k.note, by_name.pop(k.name, None)) for k in cat.kernels.values()]
    rows += [Listing(a.name, a.source, a.affected, "(not in the catalog)", a) for a in by_name.values()]
    return rows


def show(name: str, *, fragments: Sequence[str | Path] = (), patches: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Everything about one kernel: spec, exact inputs, cache key, and the cached entry if any."""
    spec = resolve(name, fragments=fragments, patches=patches)
    p = plan(spec)
    art = load_artifact(store() / p.key)
    return {"name": spec.name, "source": spec.source, "source_identity": p.res.identity,
            "patches": list(spec.patches), "fragments": list(spec.fragments),
            "affected": None if spec.affected is None else list(spec.affected), "note": spec.note,
            "config_hash": kbuild.config_hash(p.options) if p.options else "", "compiler": p.compiler,
            "key": p.key, "cached": art is not None,
            "dir": str(store() / p.key), "version": art.version if art else None,
            "build_log": str(art.build_log) if art else None,
            "build_seconds": art.build_seconds if art else None,
            "modules": list(art.module_load_order) if art else []}


def gc(keep: int) -> list[Path]:
    """Keep the `keep` most recently used entries; remove the rest that nobody holds.

    An entry is removed only under its key lock (taken without waiting: a
    held lock means it is being built, upgraded or handed out, and it stays),
    and only if nobody used it since the listing.  Lock files stay: removing
    one would let a later builder lock a new file while another still holds
    the old one.  The persistent build trees stay too (incremental rebuilds).
    """
    if keep < 0:
        raise BadInput(f"--keep must be >= 0, got {keep}")
    removed = []
    for art, stamp in _entries()[keep:]:
        with cache.held(store() / f"{art.key}.lock") as ours:
            if ours and _use_stamp(art.dir) == stamp:
                shutil.rmtree(art.dir)
                removed.append(art.dir)
    # left by a killed build (lab.cache.building: .KEY.tmp-PID-TID; older racelabs: .tmp-KEY-PID)
    for tmp in [*store().glob(".*.tmp-*"), *store().glob(".*.old-*"), *store().glob(".tmp-*"),
                *store().glob(".old-*")]:
        key = tmp.name.split("-")[1] if tmp.name.startswith((".tmp-", ".old-")) else tmp.name[1:].split(".")[0]
        with cache.held(store() / f"{key}.lock") as ours:
            if ours:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


# ---------------------------------------------------------------- CLI


def _fmt_affected(a: tuple[str, ...] | None) -> str:
    if a is None:
        return "unknown"
    return ",".join(a) if a else "fixed"


def listing_json(r: Listing) -> dict[str, Any]:
    """One `kernel list --json` entry."""
    a = r.cached
    return {"name": r.name, "source": r.source, "affected": None if r.affected is None else list(r.affected),
            "note": r.note, "cached": a is not None, "key": a.key if a else None,
            "dir": str(a.dir) if a else None, "version": a.version if a else None,
            "bzimage": str(a.bzimage) if a else None}


SOURCE_PREFIXES = ("debsrc:", "deb:", "git:", "tarball:", "bzimage:")


def spec_completions(prefix: str) -> list[str]:
    """What `--kernel PREFIX<TAB>` offers: catalog names, `NAME+` catalog patches and config
    fragments, and the source prefixes.  Shell completion calls it on every TAB, so it reads
    the catalog and kernels/config and nothing else (no cache, no network, no build)."""
    cat = load_catalog()
    head, plus, _ = prefix.rpartition("+")
    if plus:
        fragments = sorted(p.stem for p in (kernels_root() / "config").glob("*.config")
                           if p.name != Path(DEFAULT_FRAGMENT).name)      # always applied
        extras = [*cat.patches, *fragments]
        out = [f"{head}+{x}" for x in extras]
    else:
        out = [*SOURCE_PREFIXES]
    return [c for c in dict.fromkeys([*cat.kernels, *out]) if c.startswith(prefix)]


def cli_list(as_json: bool = False) -> None:
    rows = list_kernels()
    if as_json:
        print(json.dumps({"schema_version": 1, "cache": str(store()),
                          "kernels": [listing_json(r) for r in rows]}, indent=2))
        return
    w = max(len(r.name) for r in rows) if rows else 10
    print(f"{'NAME':<{w}}  {'AFFECTED':<16}  {'CACHED':<8}  NOTE")
    for r in rows:
        c = r.cached.key[:8] if r.cached else "-"
        print(f"{r.name:<{w}}  {_fmt_affected(r.affected):<16}  {c:<8}  {r.note}")
    print(f"\ncache: {store()}  (build trees: {cache_dir() / 'build'})")


def cli_build(spec: str, fragments: Sequence[str] = (), patches: Sequence[str] = (),
              want_vmlinux: bool = False) -> Path:
    """Build or fetch; print a summary on stderr and return the bzImage path (the caller prints it)."""
    ks = resolve(spec, fragments=fragments, patches=patches)
    t0, wall = time.monotonic(), time.time()
    art = ensure(ks, progress=True, want_vmlinux=want_vmlinux)
    took = time.monotonic() - t0
    beside = [p.name for p in (art.config, art.system_map, art.build_log, art.vmlinux, art.modules_dir) if p]
    print(f"{art.name}: uname -r {art.version}, affected: {_fmt_affected(art.affected)}, "
          f"{'cache hit' if art.created < wall else 'built'} in {took:.1f}s\n"
          f"  in {art.dir}: {', '.join(beside)}", file=sys.stderr)
    return art.bzimage


def cli_show(name: str, fragments: Sequence[str] = (), patches: Sequence[str] = (),
             as_json: bool = False) -> dict[str, Any]:
    info = show(name, fragments=fragments, patches=patches)
    if as_json:
        print(json.dumps({"schema_version": 1, **info}, indent=2))
        return info
    for k, v in info.items():
        if isinstance(v, list):
            v = "\n    ".join(["", *map(str, v)]) if v else "-"
        print(f"{k}: {v}")
    if info["build_log"]:
        tail = Path(info["build_log"]).read_text(errors="replace").splitlines()[-5:]
        print("build log tail:\n    " + "\n    ".join(tail))
    return info


def cli_gc(keep: int) -> list[Path]:
    removed = gc(keep)
    for r in removed:
        print(f"removed {r}")
    print(f"{len(removed)} removed; {len(cached())} kept in {store()}")
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.kernels.kernel ...` is `racelab kernel ...`: one declaration of these commands
    (lab.cli), with its help, examples and exit codes."""
    from lab import cli
    return cli.module_main("lab.kernels.kernel", argv)


__all__ = ["KernelSpec", "KernelArtifact", "Catalog", "load_catalog", "resolve", "ensure", "plan",
           "cache_key", "list_kernels", "show", "gc", "cached", "cli_list", "cli_build", "cli_show",
           "cli_gc", "spec_completions", "main"]

if __name__ == "__main__":
    sys.exit(main())
