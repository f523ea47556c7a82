"""The guest image: a Debian rootfs plus the lab layer, packed as raw ext4.

Two cached layers, each keyed by a hash of what it is made from:

- base-<hash>/rootfs   mmdebstrap of images/recipe.toml (slow: ~30 s, network)
- racelab-<hash>.img   base + lab layer (lab/agent/ and pyroute2 sources, C binaries,
                       SSH keys, /sbin/racelab-init), packed with `mke2fs -d`
                       (no loop mounts, so no privileges beyond file ownership)

What a kernel needs to boot this image (an initramfs, a PVH kernel) is lab.boot.

`racelab image build` (the same as `python -m lab.image build`) builds (or finds)
the image and prints its path; `racelab image key` prints the base's recipe key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lab import cache
from lab.run import BadInput, BuildFailed, cache_dir, project_root, require_tools, run

log = logging.getLogger("racelab.image")

IMAGES_DIR = project_root() / "images"
RECIPE_PATH = IMAGES_DIR / "recipe.toml"
READY_MARKER = "racelab-init: ready"     # printed by csrc/racelab-init.c on the console
GUEST_INIT = "/sbin/racelab-init"
GUEST_LAB_ROOT = "/opt/racelab"
GUEST_SITE = "/opt/racelab/site"          # pyroute2 (pure Python) lives here
GUEST_BIN = "/opt/racelab/bin"            # the C checker and senders
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
BLOCK = 1024   # ext4 block size of the image: small files waste less
MAX_IMAGE_BYTES = 120 * 1000**2   # issue 4: the guest image stays under 120 MB


@dataclass(frozen=True)
class Recipe:
    """images/recipe.toml, validated.  Its key() is the base image cache key."""

    suite: str
    variant: str
    mirror: str
    packages: tuple[str, ...]
    dpkg_excludes: tuple[str, ...]
    dpkg_includes: tuple[str, ...]
    remove: tuple[str, ...]
    free_mib: int
    lab_root: str

    def key(self) -> str:
        # free_mib and lab_root only shape the final image, not the base.
        base = {k: v for k, v in asdict(self).items() if k not in ("free_mib", "lab_root")}
        return _sha(json.dumps(base, sort_keys=True))[:16]


@dataclass(frozen=True)
class Image:
    """A bootable guest root: raw ext4, never written (VMs get qcow2 overlays)."""

    path: Path            # the raw ext4 file
    key: str              # hash of (base key, lab layer)
    size_bytes: int       # apparent size of path
    ssh_key: Path         # client private key authorised for root in the guest
    host_pubkey: str      # "ssh-ed25519 AAAA..." of the guest's fixed host key
    recipe: Recipe


def load_recipe(path: Path = RECIPE_PATH) -> Recipe:
    """Parse and validate the recipe, naming every bad field at once."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"cannot read image recipe {path}: {e}") from None
    base, strip, image = (data.get(k, {}) for k in ("base", "strip", "image"))
    problems: list[str] = []

    def get(table: dict[str, Any], name: str, kind: type, where: str) -> Any:
        v = table.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            problems.append(f"{where}.{name}: expected {kind.__name__}, got {v!r}")
            return kind()
        return v

    def strings(table: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
        v = get(table, name, list, where)
        if not all(isinstance(s, str) and s for s in v):
            problems.append(f"{where}.{name}: expected a list of non-empty strings")
            return ()
        return tuple(v)

    r = Recipe(
        suite=get(base, "suite", str, "base"),
        variant=get(base, "variant", str, "base"),
        mirror=get(base, "mirror", str, "base"),
        packages=strings(base, "packages", "base"),
        dpkg_excludes=strings(strip, "dpkg_excludes", "strip"),
        dpkg_includes=strings(strip, "dpkg_includes", "strip"),
        remove=strings(strip, "remove", "strip"),
        free_mib=get(image, "free_mib", int, "image"),
        lab_root=get(image, "lab_root", str, "image"),
    )
    if r.lab_root and r.lab_root != GUEST_LAB_ROOT:
        problems.append(f"image.lab_root: must be {GUEST_LAB_ROOT} (lab/remote.py relies on it)")
    if r.free_mib < 0:
        problems.append("image.free_mib: must be >= 0")
    for p in r.remove:
        if p.startswith("/") or ".." in Path(p).parts:
            problems.append(f"strip.remove: {p!r} must be relative to the rootfs, without '..'")
    if problems:
        raise BadInput(f"bad image recipe {path}:\n    " + "\n    ".join(problems),
                       hint="fix the fields named above")
    return r


# --- keys --------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    client: Path          # id_ed25519 (root's authorised key)
    host: Path            # ssh_host_ed25519_key (fixed, so it can be pinned)

    @property
    def client_pub(self) -> str:
        return Path(f"{self.client}.pub").read_text().strip()

    @property
    def host_pub(self) -> str:
        # "type base64 comment" -> "type base64": the comment is not part of the key
        return " ".join(Path(f"{self.host}.pub").read_text().split()[:2])


def ensure_keys() -> Keys:
    """The per-lab key pairs, generated once in cache_dir()/keys/."""
    d = cache_dir() / "keys"
    d.mkdir(mode=0o700, exist_ok=True)
    keys = Keys(client=d / "id_ed25519", host=d / "ssh_host_ed25519_key")
    with cache.lock(d / ".lock"):
        for path, comment in ((keys.client, "racelab-client"), (keys.host, "racelab-guest")):
            if path.exists() and Path(f"{path}.pub").exists():
                continue
            require_tools("ssh-keygen")
            for p in (path, Path(f"{path}.pub")):
                p.unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    return keys


# --- base rootfs ---------------------------------------------------------------

def ensure_base(recipe: Recipe, progress: bool = True) -> Path:
    """The stripped mmdebstrap rootfs of the recipe (cached by recipe key)."""
    images = cache_dir() / "images"
    images.mkdir(exist_ok=True)
    final = images / f"base-{recipe.key()}"
    rootfs = final / "rootfs"
    if (final / "done").exists():
        return rootfs
    with cache.lock(images / ".lock"):
        if (final / "done").exists():
            return rootfs
        require_tools("mmdebstrap")
        if os.geteuid() != 0:
            raise BadInput("building the guest image needs root (mmdebstrap in root mode, "
                           "file ownership inside the image)", hint="run it as root")
        _say(progress, f"building base rootfs {final.name} with mmdebstrap "
                       f"({recipe.suite}, {len(recipe.packages)} packages; ~30 s, downloads)")
        with cache.building(final, directory=True) as tmp:
            _debootstrap(recipe, tmp)
        _say(progress, f"base rootfs ready: {_du(rootfs) / 2**20:.0f} MiB")
        # One older base stays (another checkout may still use it); the rest go.
        cache.prune((p for p in images.glob("base-*") if p != final and p.is_dir()), 1)
    return rootfs


def _debootstrap(recipe: Recipe, tmp: Path) -> None:
    """The stripped rootfs into tmp/rootfs, with recipe.json and the done marker beside it."""
    argv: list[str] = ["mmdebstrap", f"--variant={recipe.variant}", "--mode=root",
                       "--format=directory", "--include=" + ",".join(recipe.packages)]
    # merged /usr by symlinks, as debootstrap does; the alternative (the
    # usrmerge package) drags in perl, ~50 MB.
    if MERGED_USR_HOOKS.is_dir():
        argv.append(f"--hook-dir={MERGED_USR_HOOKS}")
    argv += [f"--dpkgopt=path-exclude={p}" for p in recipe.dpkg_excludes]
    argv += [f"--dpkgopt=path-include={p}" for p in recipe.dpkg_includes]
    argv += [recipe.suite, str(tmp / "rootfs")]
    if recipe.mirror:
        argv.append(recipe.mirror)
    run(argv, timeout=1800, hint="mmdebstrap needs the Debian mirror (deb.debian.org)")
    _strip(tmp / "rootfs", recipe.remove)
    (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    (tmp / "done").write_text("")


def _strip(rootfs: Path, patterns: Iterable[str]) -> None:
    for pat in patterns:
        for p in rootfs.glob(pat):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


# --- lab layer -----------------------------------------------------------------

@dataclass(frozen=True)
class LayerFile:
    guest: str                     # absolute path in the guest
    mode: int                      # permission bits
    source: Path | None = None     # copy from here...
    data: bytes | None = None      # ...or write this

    def content(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()  # type: ignore[union-attr]


def _tree(src: Path, guest: str) -> Iterator[LayerFile]:
    for p in sorted(src.rglob("*")):
        if "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo") or not p.is_file():
            continue
        yield LayerFile(f"{guest}/{p.relative_to(src).as_posix()}", 0o644, source=p)


def _venv_pyroute2() -> list[Path]:
    import pyroute2  # the venv's copy: pure Python, the version pinned in pyproject

    pkg = Path(pyroute2.__file__).resolve().parent
    dists = sorted(pkg.parent.glob("pyroute2-*.dist-info"))
    return [pkg, *dists]


def dataplane_binaries() -> list[Path]:
    """The C checker/senders and the guest's init from lab.dataplane.build().  A guest
    without them cannot boot or run any scenario, so an image is never built without them."""
    try:
        from lab import dataplane
    except ImportError as e:
        raise BuildFailed(f"lab.dataplane cannot be imported ({e}): the guest image needs its "
                          "C checker and senders",
                          hint="fix the import error above (python -c 'import lab.dataplane')") from e
    built = dataplane.build()
    if isinstance(built, (str, os.PathLike)):
        p = Path(built)
        items = sorted(x for x in p.iterdir()) if p.is_dir() else [p]
    elif isinstance(built, dict):
        items = [Path(v) for v in built.values()]
    elif dataclasses.is_dataclass(built):
        items = [Path(v) for v in vars(built).values() if isinstance(v, (str, os.PathLike))]
    else:
        items = [Path(x) for x in built]
    found = sorted({x for x in items if x.is_file() and os.access(x, os.X_OK)})
    missing = sorted(set(dataplane.BUILT) - {x.name for x in found})
    if not found or missing:
        raise BuildFailed(f"lab.dataplane.build() gave no {', '.join(missing) or 'binaries'}: "
                          "the guest image needs the C checker, senders and init",
                          hint="build them alone to see why: python -m lab.dataplane build")
    return found


def lab_layer(keys: Keys, binaries: list[Path], lab_dir: Path | None = None) -> list[LayerFile]:
    """Everything the lab adds on top of the Debian base.  Of lab/ (lab_dir), only the agent
    package: it is all the guest runs, so a host-only module never changes the image key.
    In the guest `lab` is a namespace package (no lab/__init__.py there)."""
    files: list[LayerFile] = []
    lab_dir = lab_dir or project_root() / "lab"
    files += _tree(lab_dir / "agent", f"{GUEST_LAB_ROOT}/lab/agent")
    for p in _venv_pyroute2():
        files += _tree(p, f"{GUEST_SITE}/{p.name}")
    # the built init (csrc/racelab-init.c) is PID 1, at the path init= names; the rest are tools
    init = Path(GUEST_INIT).name
    files += [LayerFile(GUEST_INIT if b.name == init else f"{GUEST_BIN}/{b.name}", 0o755, source=b)
              for b in binaries]
    files += [
        LayerFile("/etc/racelab/fstab", 0o644, source=IMAGES_DIR / "fstab"),
        LayerFile("/etc/ssh/sshd_config", 0o644, source=IMAGES_DIR / "sshd_config"),
        LayerFile("/etc/ssh/ssh_host_ed25519_key", 0o600, source=keys.host),
        LayerFile("/etc/ssh/ssh_host_ed25519_key.pub", 0o644, data=(keys.host_pub + "\n").encode()),
        LayerFile("/root/.ssh/authorized_keys", 0o600, data=(keys.client_pub + "\n").encode()),
        # so `python3 -m lab.agent` works in any guest shell, PYTHONPATH or not
        LayerFile("/usr/lib/python3/dist-packages/racelab.pth", 0o644,
                  data=f"{GUEST_LAB_ROOT}\n{GUEST_SITE}\n".encode()),
        LayerFile("/etc/hostname", 0o644, data=b"racelab\n"),
        LayerFile("/etc/hosts", 0o644, data=b"127.0.0.1 localhost racelab\n"),
    ]
    return files


def _layer_key(base_key: str, files: list[LayerFile], free_mib: int) -> str:
    h = hashlib.sha256(f"base={base_key} free={free_mib}\n".encode())
    for f in sorted(files, key=lambda f: f.guest):
        h.update(f"{f.guest} {f.mode:o} {_sha(f.content())}\n".encode())
    return h.hexdigest()[:16]


# --- final image ---------------------------------------------------------------

def ensure_image(progress: bool = True) -> Image:
    """The bootable guest image, built if its inputs changed.  Safe to call from
    several processes at once (file lock; built beside, renamed into place)."""
    recipe = load_recipe()
    keys = ensure_keys()
    rootfs = ensure_base(recipe, progress)
    files = lab_layer(keys, dataplane_binaries())
    key = _layer_key(recipe.key(), files, recipe.free_mib)
    images = cache_dir() / "images"
    path = images / f"racelab-{key}.img"
    if not path.exists():
        with cache.lock(images / ".lock"):
            if not path.exists():
                _build_image(rootfs, files, recipe, path, progress)
                _prune(images, keep=path)
    os.utime(path)  # mtime = last use, for _prune
    return Image(path=path, key=key, size_bytes=path.stat().st_size, ssh_key=keys.client,
                 host_pubkey=keys.host_pub, recipe=recipe)


def _build_image(rootfs: Path, files: list[LayerFile], recipe: Recipe, out: Path,
                 progress: bool) -> None:
    require_tools("mke2fs")
    if os.geteuid() != 0:
        raise BadInput("packing the guest image needs root: its files must be owned by root",
                       hint="run it as root")
    _say(progress, f"packing guest image {out.name} (mke2fs -d)")
    stage = out.parent / f".{out.stem}.stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        # Hard links: no copy of the ~120 MB base.  Layer files are always
        # unlinked before being written, so the base itself is never touched.
        run(["cp", "-al", rootfs, stage])
        for f in files:
            _place(stage, f)
        (stage / "root/.ssh").chmod(0o700)  # sshd's StrictModes
        _compile_pyc(stage)
        blocks, inodes = _usage(stage)
        inodes += 2048  # room for files the guest creates
        # contents + ~3% metadata (bitmaps, extent blocks) + the inode table + free space
        need = blocks * BLOCK * 103 // 100 + inodes * 256 + recipe.free_mib * 2**20
        size_mib = -(-need // 2**20)
        check_size(size_mib * 2**20, stage)
        with cache.building(out) as tmp_img:
            # No journal: every VM writes to a throw-away overlay, and crashes are
            # the norm (we destroy guests), so there is nothing to replay.
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-O", "^has_journal", "-m", "0",
                 "-L", "racelab", "-N", str(inodes), "-E", "root_owner=0:0",
                 "-d", stage, tmp_img, f"{size_mib}M"])
            check_size(tmp_img.stat().st_size, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _say(progress, f"guest image ready: {out} ({out.stat().st_size / 2**20:.0f} MiB, "
                   f"{_allocated(out) / 2**20:.0f} MiB allocated)")


def check_size(size: int, stage: Path | None = None) -> None:
    """The image must stay under MAX_IMAGE_BYTES; say what is biggest if not."""
    if size <= MAX_IMAGE_BYTES:
        return
    top = ""
    if stage is not None and stage.is_dir():
        sizes = sorted(((_du(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_size,
                         p.relative_to(stage)) for p in stage.glob("*/*")), reverse=True)[:5]
        top = "; biggest: " + ", ".join(f"/{p} {n / 1e6:.0f} MB" for n, p in sizes)
    raise BuildFailed(f"guest image would be {size / 1e6:.1f} MB, over the "
                      f"{MAX_IMAGE_BYTES / 1e6:.0f} MB limit{top}",
                      hint="trim images/recipe.toml (packages, [strip] remove, image.free_mib)")


def _place(stage: Path, f: LayerFile) -> None:
    dest = stage / f.guest.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Never follow a symlink out of the stage (an absolute one in the base would).
    if not Path(os.path.realpath(dest.parent)).is_relative_to(stage.resolve()):
        raise BuildFailed(f"layer file {f.guest} would land outside the image "
                          f"({os.path.realpath(dest.parent)})")
    dest.unlink(missing_ok=True)  # break the hard link to the base
    dest.write_bytes(f.content())
    dest.chmod(f.mode)


def _compile_pyc(stage: Path) -> None:
    """Byte-compile the lab and pyroute2 when the host Python matches the guest's:
    under TCG, compiling pyroute2 on first import costs seconds in every guest."""
    guest_py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (stage / "usr/lib" / guest_py).is_dir():
        log.debug("host %s differs from the guest Python: no .pyc precompiled", guest_py)
        return
    run([sys.executable, "-m", "compileall", "-q", "-j", "0",
         stage / GUEST_LAB_ROOT.lstrip("/")])


def _usage(root: Path) -> tuple[int, int]:
    """(blocks of BLOCK bytes, inodes) the tree needs, hard links counted once."""
    blocks = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        blocks += 1
        inodes += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                blocks += -(-st.st_size // BLOCK)
    return blocks, inodes


def _prune(images: Path, keep: Path, keep_n: int = 3) -> None:
    """Drop old final images (not bases).  A running VM keeps its backing file
    open, so removing one under it is harmless."""
    cache.prune((p for p in images.glob("racelab-*.img") if p != keep), keep_n - 1)


# --- helpers -------------------------------------------------------------------

def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _du(path: Path) -> int:
    return _usage(path)[0] * BLOCK


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _say(progress: bool, msg: str) -> None:
    (log.info if progress else log.debug)("%s", msg)


def cli_build(as_json: bool = False) -> None:
    """`racelab image build`: the image's path, or with --json what a guest is made from."""
    img = ensure_image(progress=True)
    if not as_json:
        print(img.path)
        return
    print(json.dumps({"path": str(img.path), "key": img.key, "size_bytes": img.size_bytes,
                      "allocated_bytes": _allocated(img.path), "ssh_key": str(img.ssh_key),
                      "host_pubkey": img.host_pubkey}, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.image ...` is `racelab image ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.image", argv)


if __name__ == "__main__":
    sys.exit(main())
