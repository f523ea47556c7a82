"""Kernel sources: where a tree or a binary kernel comes from, and the patch stack.

Each source kind has its own small section here:

- debsrc:PKG         Debian's linux-source-X.Y tarball under /usr/src
- tarball:PATH|URL   a kernel tarball (a URL is fetched through a mirror)
- git:/repo@REF      a tree at a ref, checked out in one worktree per repo
- deb:PKGVER         a Debian binary kernel (linux-image-PKGVER), with modules
- bzimage:PATH       a kernel someone built

Source trees live in ONE persistent build directory per source
(cache_dir()/build/<source-id>/linux) and are never copied: a built tree
that moves rebuilds from scratch (absolute paths, see FACTS.md).  Switching
patch sets reverses the previously applied patches (from copies kept in the
build directory) down to the common prefix and applies the new ones, so only
the touched files recompile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.run import BadInput, CommandFailed, InfraError, cache_dir, log, require_tools, run

SOURCE_KINDS = ("debsrc", "tarball", "git", "deb", "bzimage")
KERNEL_ORG = "https://cdn.kernel.org/pub/linux/kernel"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string, before anything is fetched or resolved."""

    kind: str        # one of SOURCE_KINDS
    arg: str         # what follows "kind:" (package, path, URL, repo)
    ref: str = ""    # git only: the ref after '@'

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" + (f"@{self.ref}" if self.ref else "")

    @property
    def builds(self) -> bool:
        """True for sources that are compiled here (patches, fragments apply)."""
        return self.kind in ("debsrc", "tarball", "git")


def parse_source(text: str) -> SourceRef:
    kind, sep, arg = text.partition(":")
    if not sep or kind not in SOURCE_KINDS or not arg:
        raise BadInput(f"not a kernel source: {text!r}",
                       hint="use debsrc:linux-source-6.1, deb:6.1.0-47-amd64, git:/path/to/linux@REF, "
                            "tarball:/path/or/URL, bzimage:/path, or a catalog name (racelab kernel list)")
    if kind == "git":
        repo, at, ref = arg.rpartition("@")
        if not at or not repo or not ref:
            raise BadInput(f"git source needs a ref: {text!r}", hint="e.g. git:/src/linux@v6.1")
        return SourceRef("git", repo, ref)
    if kind == "debsrc" and not re.fullmatch(r"linux-source-\d+\.\d+", arg):
        raise BadInput(f"not a Debian kernel source package: {arg!r}", hint="e.g. debsrc:linux-source-6.1")
    if kind == "deb" and not re.fullmatch(r"\d+\.\d+[\w.+~-]*", arg):
        raise BadInput(f"not a Debian kernel package version: {arg!r}",
                       hint="e.g. deb:6.1.0-47-amd64 (the X in linux-image-X)")
    return SourceRef(kind, arg)


def series_of(version: str) -> str:
    """'6.1.192' -> '6.1' (which patch files fit)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else ""


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class Resolved:
    """A source pinned down: what exactly will be built or fetched."""

    ref: SourceRef
    identity: str          # goes into the cache key: changes when the content changes
    build_id: str          # names the persistent build directory ("" for binaries)
    version: str           # upstream version when known ("6.1.192"), else ""
    origin: Path | None    # the tarball / repo / file on disk, when there is one


def resolve_source(ref: SourceRef) -> Resolved:
    if ref.kind == "debsrc":
        return _debsrc_resolve(ref)
    if ref.kind == "tarball":
        return _tarball_resolve(ref)
    if ref.kind == "git":
        return _git_resolve(ref)
    if ref.kind == "deb":
        return _deb_resolve(ref)
    path = Path(ref.arg).expanduser().resolve()
    if not path.is_file():
        raise BadInput(f"bzImage not found: {path}")
    return Resolved(ref, f"bzimage:sha256={sha256_file(path)}", "", bzimage_version(path), path)


def _debsrc_resolve(ref: SourceRef) -> Resolved:
    pkg = ref.arg
    tarball = Path("/usr/src") / f"{pkg}.tar.xz"
    proc = run(["dpkg-query", "-W", "-f", "${Status}|${Version}", pkg], check=False)
    status, _, pkgver = proc.stdout.partition("|")
    if proc.returncode != 0 or "installed" not in status.split() or not tarball.is_file():
        raise BadInput(f"{pkg} is not installed ({tarball} missing)", hint=f"apt-get install {pkg}")
    upstream = pkgver.split("-")[0]
    return Resolved(ref, f"debsrc:{pkg}={pkgver}", f"debsrc-{pkg}-{pkgver}", upstream, tarball)


def tarball_url(arg: str) -> str | None:
    """The URL to fetch for a tarball: source, honouring RACELAB_TARBALL_MIRROR.

    A bare name (linux-6.1.5.tar.xz) means kernel.org's v6.x directory; a
    kernel.org URL is rewritten onto the mirror; other URLs are used as given.
    Returns None for local paths.
    """
    mirror = (os.environ.get("RACELAB_TARBALL_MIRROR") or KERNEL_ORG).rstrip("/")
    if re.fullmatch(r"linux-\d+\.\d+[\w.-]*\.tar\.(xz|gz|bz2)", arg) and not Path(arg).exists():
        major = arg.split("-")[1].split(".")[0]
        return f"{mirror}/v{major}.x/{arg}"
    if "://" in arg:
        if arg.startswith(KERNEL_ORG + "/"):
            return mirror + arg[len(KERNEL_ORG):]
        return arg
    return None


def _tarball_resolve(ref: SourceRef) -> Resolved:
    url = tarball_url(ref.arg)
    if url is None:
        path = Path(ref.arg).expanduser().resolve()
        if not path.is_file():
            raise BadInput(f"tarball not found: {path}")
    else:
        path = _download(url)
    digest = _cached_digest(path)
    m = re.search(r"linux-(\d+\.\d+(?:\.\d+)?)", path.name)
    return Resolved(ref, f"tarball:sha256={digest}", f"tarball-{digest[:16]}", m.group(1) if m else "", path)


def _cached_digest(path: Path) -> str:
    """sha256 of a big file, remembered by (path, size, mtime) so cache hits stay fast."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    k = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if k not in known:
        known[k] = sha256_file(path)
        atomic_write(memo, json.dumps(known, indent=1))
    return known[k]


def _download(url: str) -> Path:
    dest_dir = cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s", url)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InfraError(f"cannot fetch {url}: {e}",
                         hint="set RACELAB_TARBALL_MIRROR to a reachable kernel.org mirror, "
                              "or pass tarball:/local/path") from None
    os.replace(tmp, dest)
    return dest


def _git_resolve(ref: SourceRef) -> Resolved:
    require_tools("git")
    repo = Path(ref.arg).expanduser().resolve()
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise BadInput(f"not a git repository: {repo}")
    proc = run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{ref.ref}^{{commit}}"], check=False)
    if proc.returncode != 0:
        raise BadInput(f"unknown git ref {ref.ref!r} in {repo}", hint="git fetch, or check the tag/branch name")
    sha = proc.stdout.strip()
    version = ""
    mk = run(["git", "-C", repo, "show", f"{sha}:Makefile"], check=False).stdout
    v = {k: re.search(rf"^{k}\s*=\s*(\S*)", mk, re.M) for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")}
    if all(v.values()):
        version = ".".join(m.group(1) for m in v.values() if m)  # type: ignore[union-attr]
    repo_id = hashlib.sha256(str(repo).encode()).hexdigest()[:12]
    return Resolved(ref, f"git:{sha}", f"git-{repo.name}-{repo_id}", version, repo)


def _deb_resolve(ref: SourceRef) -> Resolved:
    pkg = f"linux-image-{ref.arg}"
    version = _apt_candidate(pkg)
    if not version:
        raise BadInput(f"no Debian package {pkg}",
                       hint="apt-get update; list them with: apt-cache search --names-only '^linux-image-6'")
    return Resolved(ref, f"deb:{pkg}={version}", "", version.split("-")[0], None)


def _apt_candidate(pkg: str) -> str:
    """The version apt would download, remembered until the package lists change
    (apt-cache takes over a second, too slow for a cache hit)."""
    lists = Path("/var/lib/apt/lists")
    try:
        stamp = str(lists.stat().st_mtime_ns)
    except OSError:
        stamp = ""
    memo = cache_dir() / "apt-candidates.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get("_lists") != stamp:
        known = {"_lists": stamp}
    if pkg not in known:
        proc = run(["apt-cache", "show", "--no-all-versions", pkg], check=False)
        m = re.search(r"^Version:\s*(\S+)", proc.stdout, re.M)
        if proc.returncode != 0 or not m:
            return ""
        known[pkg] = m.group(1)
        atomic_write(memo, json.dumps(known, indent=1))
    return known[pkg]


def bzimage_version(path: Path) -> str:
    """The `uname -r` a bzImage will report, read from its setup header."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise BadInput(f"not a bzImage (no HdrS setup header): {path}")
    off = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    raw = head[off:off + 256].split(b"\0")[0].decode(errors="replace")
    return raw.split(" ")[0]


# ---------------------------------------------------------------- trees


class PatchStack:
    """The patches applied to one persistent tree, tracked in state.json.

    Copies of applied patches are kept beside the tree, so a reversal uses
    exactly what was applied even after the original file was edited.
    """

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        self.tree = build_dir / "linux"
        self.state_file = build_dir / "state.json"
        self.saved = build_dir / "applied"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, **changes: object) -> None:
        st = {**self.state(), **changes}
        atomic_write(self.state_file, json.dumps(st, indent=2))

    def applied(self) -> list[dict]:
        return list(self.state().get("applied", []))

    def switch(self, patches: Sequence[Path]) -> list[str]:
        """Make the tree carry exactly `patches`, in this order, touching as little as possible.

        Returns what it did ("reversed X", "applied Y"), for the build log."""
        done: list[str] = []
        want = [{"path": str(p), "sha256": sha256_file(p)} for p in patches]
        have = self.applied()
        common = 0
        while common < min(len(want), len(have)) and want[common]["sha256"] == have[common]["sha256"]:
            common += 1
        self.save(dirty=True)
        for entry in reversed(have[common:]):
            saved = self.saved / entry["saved"]
            apply_patch(self.tree, saved, reverse=True, label=entry["path"])
            have.pop()
            saved.unlink(missing_ok=True)
            self.save(applied=have)
            done.append(f"reversed {entry['path']}")
        self.saved.mkdir(exist_ok=True)
        for i, entry in enumerate(want[common:], start=common):
            src = Path(entry["path"])
            try:
                apply_patch(self.tree, src)
            except BadInput:
                self.save(dirty=False)
                raise
            name = f"{i:02d}-{entry['sha256'][:12]}.patch"
            shutil.copyfile(src, self.saved / name)
            have.append({**entry, "saved": name})
            self.save(applied=have)
            done.append(f"applied {src}")
        done += [f"kept {e['path']}" for e in want[:common]]
        self.save(dirty=False)
        return done


_HUNK_FAIL = re.compile(r"^(Hunk #\d+ FAILED at \d+.*|.*Reversed \(or previously applied\) patch detected.*|"
                        r"can't find file to patch.*|No file to patch.*|patch: \*\*\*\* .*)$", re.M)


def apply_patch(tree: Path, patch: Path, *, reverse: bool = False, label: str | None = None) -> None:
    """Apply (or reverse) one patch with -p1; dry-run first so a failure changes nothing.

    A patch that does not apply is the user's to fix: BadInput naming the
    file and the failing hunk(s).
    """
    argv = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i", str(patch)]
    if reverse:
        argv = ["patch", "-p1", "--batch", "-R", "--no-backup-if-mismatch", "-i", str(patch)]
    dry = run([*argv, "--dry-run"], cwd=tree, check=False)
    if dry.returncode != 0:
        out = dry.stdout + dry.stderr
        current = ""
        problems = []
        for line in out.splitlines():
            if line.startswith(("patching file ", "checking file ")):
                current = line.split(" ", 2)[2]
            elif _HUNK_FAIL.match(line):
                problems.append(f"{current}: {line}" if current else line)
        what = "cannot be reversed in" if reverse else "does not apply to"
        raise BadInput(f"patch {label or patch} {what} {tree}:\n    " + "\n    ".join(problems or out.splitlines()[-8:]),
                       hint="rebase the patch onto this kernel version (patches apply in the order given)")
    run(argv, cwd=tree)


def prepare_tree(res: Resolved, build_dir: Path, patches: Sequence[Path], logf=None) -> PatchStack:
    """The persistent tree for this source, at the right ref, carrying exactly `patches`.

    Caller holds the build directory's lock.  What was done goes to logf.
    """
    stack = PatchStack(build_dir)
    st = stack.state()
    build_dir.mkdir(parents=True, exist_ok=True)
    if res.ref.kind == "git":
        _git_prepare(res, stack)
    elif not (stack.tree / "Makefile").is_file() or st.get("dirty") or st.get("identity") != res.identity:
        if st.get("dirty"):
            log.warning("build tree %s was left half-patched; extracting it again (full rebuild)", stack.tree)
        _extract(res, stack)
        if logf:
            logf.write(f"# extracted {res.origin} into {stack.tree}\n")
    for line in stack.switch(patches):
        if logf:
            logf.write(f"# patch stack: {line}\n")
    return stack


def _extract(res: Resolved, stack: PatchStack) -> None:
    assert res.origin is not None
    require_tools("tar", "xz")
    if stack.tree.exists():
        shutil.rmtree(stack.tree)
    shutil.rmtree(stack.saved, ignore_errors=True)
    stack.state_file.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=stack.build_dir))
    log.info("extracting %s", res.origin)
    run(["tar", "-xf", res.origin, "-C", tmp])
    tops = [p for p in tmp.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
        shutil.rmtree(tmp)
        raise BadInput(f"{res.origin} does not contain one kernel tree (found {[p.name for p in tops]})")
    os.replace(tops[0], stack.tree)
    tmp.rmdir()
    stack.save(identity=res.identity, applied=[], dirty=False)


def _git_prepare(res: Resolved, stack: PatchStack) -> None:
    assert res.origin is not None
    sha = res.identity.split(":", 1)[1]
    st = stack.state()
    if not (stack.tree / ".git").exists():
        run(["git", "-C", res.origin, "worktree", "prune"], check=False)
        run(["git", "-C", res.origin, "worktree", "add", "--detach", stack.tree, sha])
        stack.save(identity=res.identity, applied=[], dirty=False)
        return
    if st.get("dirty"):
        # Tracked files back to the commit; untracked build output stays.
        run(["git", "-C", stack.tree, "checkout", "-f", "--detach", st.get("identity", res.identity).split(":", 1)[1]])
        shutil.rmtree(stack.saved, ignore_errors=True)
        stack.save(applied=[], dirty=False)
    if st.get("identity") != res.identity:
        stack.switch([])
        try:
            run(["git", "-C", stack.tree, "checkout", "--detach", sha])
        except CommandFailed as e:
            raise BadInput(f"cannot check out {sha[:12]} in {stack.tree}: {e.stderr.strip()}") from None
        stack.save(identity=res.identity)


# ---------------------------------------------------------------- deb: binaries


@dataclass(frozen=True)
class DebKernel:
    version: str                  # uname -r, e.g. 6.1.0-47-amd64
    load_order: tuple[str, ...]   # .ko paths relative to modules/, dependencies first


def fetch_deb(res: Resolved, dest: Path, wanted_modules: Sequence[str]) -> DebKernel:
    """apt-get download linux-image-X; put bzImage, config, System.map and modules/ into dest.

    modules/ is a small /lib/modules/<version> tree: the wanted modules and
    everything modules.dep and modules.softdep say they need, plus the
    depmod indexes for just those, and racelab.load (the load order).
    """
    require_tools("apt-get", "dpkg-deb", "depmod")
    pkg = res.identity.split(":", 1)[1].split("=")[0]
    uname = pkg.removeprefix("linux-image-")
    with tempfile.TemporaryDirectory(prefix="racelab-deb-", dir=cache_dir()) as tmp_s:
        tmp = Path(tmp_s)
        try:
            run(["apt-get", "download", pkg], cwd=tmp)
        except CommandFailed as e:
            raise InfraError(f"apt-get download {pkg} failed:\n    {e.stderr.strip()}",
                             hint="apt-get update, and check the network to the Debian mirror") from None
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise InfraError(f"apt-get download {pkg} gave {len(debs)} files")
        root = tmp / "root"
        run(["dpkg-deb", "-x", debs[0], root])
        boot = root / "boot"
        for src, name in ((f"vmlinuz-{uname}", "bzImage"), (f"config-{uname}", "config"),
                          (f"System.map-{uname}", "System.map")):
            if not (boot / src).is_file():
                raise InfraError(f"{debs[0].name} has no /boot/{src}")
            shutil.copyfile(boot / src, dest / name)
        mods = _find_modules_root(root, uname)
        order: tuple[str, ...] = ()
        if mods is not None:
            run(["depmod", "-b", root, uname])
            deps = _read_modules_dep(mods)
            order = _load_order(deps, _soft_pre(mods), wanted_modules, _aliases(mods))
            out = dest / "modules"
            for rel in order:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mods / rel, out / rel)
            for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (mods / f).is_file():
                    shutil.copyfile(mods / f, out / f)
            (out / "racelab.load").write_text("".join(f"{r}\n" for r in order))
            # depmod over the subset, so modprobe works in a guest that installs it as-is
            sub = tmp / "sub"
            shutil.copytree(out, sub / "lib" / "modules" / uname)
            run(["depmod", "-b", sub, uname])
            for f in (sub / "lib" / "modules" / uname).glob("modules.*"):
                shutil.copyfile(f, out / f.name)
    return DebKernel(uname, order)


def _find_modules_root(root: Path, uname: str) -> Path | None:
    for base in (root / "lib" / "modules" / uname, root / "usr" / "lib" / "modules" / uname):
        if base.is_dir():
            return base
    return None


def _read_modules_dep(mods: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (mods / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def _soft_pre(mods: Path) -> dict[str, list[str]]:
    """modules.softdep 'pre:' entries: module name -> names to load first."""
    out: dict[str, list[str]] = {}
    f = mods / "modules.softdep"
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "softdep":
            continue
        pre: list[str] = []
        mode = ""
        for w in parts[2:]:
            if w.endswith(":"):
                mode = w
            elif mode == "pre:":
                pre.append(w)
        out[_modname(parts[1])] = pre
    return out


def _aliases(mods: Path) -> dict[str, list[str]]:
    """Plain (non-wildcard) aliases: 'crypto-crc32c' -> ['crc32c_intel', 'crc32c_generic']."""
    out: dict[str, list[str]] = {}
    f = mods / "modules.alias"
    if f.is_file():
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias" and not any(c in parts[1] for c in "*?["):
                out.setdefault(parts[1], []).append(_modname(parts[2]))
    return out


def _modname(path_or_name: str) -> str:
    base = Path(path_or_name).name
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def _load_order(deps: dict[str, list[str]], soft: dict[str, list[str]], wanted: Sequence[str],
                aliases: dict[str, list[str]] | None = None) -> tuple[str, ...]:
    """Depth-first: every module after what it needs (modules.dep, then softdep
    pre: names, which may be aliases such as crypto-crc32c).  Wanted names not
    built as modules (built in, or absent in this flavour) are skipped."""
    by_name = {_modname(p): p for p in deps}
    aliases = aliases or {}

    def providers(name: str) -> list[str]:
        n = _modname(name)
        if n in by_name:
            return [by_name[n]]
        return [by_name[m] for m in aliases.get(name, []) if m in by_name]

    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for pre in soft.get(_modname(path), []):
            for dep in providers(pre):
                visit(dep)
        for d in reversed(deps.get(path, [])):
            visit(d)
        order.append(path)

    for name in wanted:
        p = by_name.get(_modname(name))
        if p is not None:
            visit(p)
    return tuple(order)
