"""deb:PKGVER: a Debian binary kernel (linux-image-PKGVER) with the modules the lab needs.

apt-get download, then vmlinuz, config and System.map from /boot, and a
small /lib/modules/<version> subset: the wanted modules (kernels/catalog.toml
[deb] modules) and everything modules.dep and modules.softdep say they
need, with depmod indexes for just those.  The image work installs them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lab.run import BadInput, CommandFailed, InfraError, cache_dir, require_tools, run
from lab.kernels.sources.common import Fetched, Resolved, SourceRef, memo, save_memo

KIND = "deb"
EXAMPLE = "deb:6.1.0-47-amd64"


def parse(arg: str) -> SourceRef:
    if not re.fullmatch(r"\d+\.\d+[\w.+~-]*", arg):
        raise BadInput(f"not a Debian kernel package version: {arg!r}",
                       hint="e.g. deb:6.1.0-47-amd64 (the X in linux-image-X)")
    return SourceRef(KIND, arg)


def resolve(ref: SourceRef) -> Resolved:
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
    known = memo("apt-candidates.json")
    if known.get("_lists") != stamp:
        known = {"_lists": stamp}
    if pkg not in known:
        proc = run(["apt-cache", "show", "--no-all-versions", pkg], check=False)
        m = re.search(r"^Version:\s*(\S+)", proc.stdout, re.M)
        if proc.returncode != 0 or not m:
            return ""
        known[pkg] = m.group(1)
        save_memo("apt-candidates.json", known)
    return known[pkg]


def fetch(res: Resolved, dest: Path, wanted_modules: Sequence[str]) -> Fetched:
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
            for fname in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                if (mods / fname).is_file():
                    shutil.copyfile(mods / fname, out / fname)
            (out / "racelab.load").write_text("".join(f"{r}\n" for r in order))
            # depmod over the subset, so modprobe works in a guest that installs it as-is
            sub = tmp / "sub"
            shutil.copytree(out, sub / "lib" / "modules" / uname)
            run(["depmod", "-b", sub, uname])
            for f in (sub / "lib" / "modules" / uname).glob("modules.*"):
                shutil.copyfile(f, out / f.name)
    note = ""
    if (dest / "System.map").stat().st_size < 4096:
        note = "# System.map: Debian ships a stub (the real one is in linux-image-*-dbg)\n"
    log = f"# {res.identity}\n{note}# modules, load order:\n" + "".join(f"{m}\n" for m in order)
    return Fetched(uname, log, (dest / "modules").is_dir(), order)


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
