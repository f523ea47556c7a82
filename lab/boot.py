"""Boot artifacts: what a kernel needs, beside the guest image, to boot under QEMU.

Debian `deb:` kernels keep virtio and the block layer in modules; initrd_for()
builds them a small busybox initramfs (cached per kernel) that loads the
modules and switch_roots into the image.  Catalog source kernels have those
drivers built in and boot the image directly.  kernel_for_boot() gives QEMU the
bzImage's payload as a PVH ELF where it can (no decompressor run under TCG), and
probe_initrd() is the tiny initramfs of the KVM probe (lab.accel).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from lab import cache
from lab.image import IMAGES_DIR
from lab.kernels import bzimage
from lab.run import BadInput, BuildFailed, cache_dir, run

log = logging.getLogger("racelab.boot")


class KernelLike(Protocol):
    """What booting needs from a kernel: lab.kernels.kernel's KernelArtifact, or lab.vm's BareKernel.

    Read-only, so frozen dataclasses match."""

    @property
    def bzimage(self) -> Path: ...
    @property
    def version(self) -> str: ...
    @property
    def modules_dir(self) -> Path | None: ...
    @property
    def module_load_order(self) -> Sequence[str]: ...


# --- initramfs for deb: kernels ------------------------------------------------

def initrd_for(kernel: KernelLike) -> Path | None:
    """The initramfs a kernel needs to mount the image, or None (drivers built in).

    Cached per kernel under cache_dir()/initrd/, keyed by the modules, their
    load order and the /init script."""
    modules_dir = getattr(kernel, "modules_dir", None)
    order = list(getattr(kernel, "module_load_order", None) or [])
    if modules_dir is None or not order:
        return None
    modules_dir = Path(modules_dir)
    missing = [m for m in order if not (modules_dir / m).is_file()]
    if missing:
        raise BuildFailed(f"kernel {kernel.version}: modules in load order not found under "
                          f"{modules_dir}: {', '.join(missing[:5])}")
    busybox = _busybox()
    init = (IMAGES_DIR / "initramfs-init").read_bytes()
    h = hashlib.sha256(f"{kernel.version}\n".encode())
    h.update(init + _sha(busybox.read_bytes()).encode())
    mods: list[tuple[str, bytes]] = []
    for m in order:
        data = _module_bytes(modules_dir / m)
        mods.append((m, data))
        h.update(f"{m} {_sha(data)}\n".encode())
    out_dir = cache_dir() / "initrd"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{kernel.version}-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules",
              "lib/modules/racelab"):
        cpio.dir(d)
    cpio.char("dev/console", 0o600, 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init, 0o755)
    cpio.file("lib/modules/racelab/load-order", "".join(f"{m}\n" for m, _ in mods).encode(), 0o644)
    for m, data in mods:
        parts = Path(m).parts
        for i in range(1, len(parts)):
            cpio.dir("lib/modules/racelab/" + "/".join(parts[:i]))
        cpio.file(f"lib/modules/racelab/{m}", data, 0o644)
    cache.atomic_write(out, cpio.gzipped())
    log.info("initramfs for %s: %s (%d modules, %d KiB)", kernel.version, out, len(mods),
             out.stat().st_size // 1024)
    return out


# --- uncompressed kernels (PVH boot) ----------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18


def kernel_for_boot(kernel: KernelLike) -> Path:
    """The file to boot: the bzImage's payload, decompressed once on the host,
    when it is a PVH-capable ELF; else the bzImage itself.

    Under TCG the in-guest decompressor is the slowest part of a boot (~5 s of
    ~10 s for Debian's xz kernels); QEMU loads a PVH ELF straight to its entry
    point.  Cached beside the initrds, keyed by the bzImage's bytes."""
    bz = Path(kernel.bzimage)
    data = bz.read_bytes()
    out_dir = cache_dir() / "boot"
    out = out_dir / f"{getattr(kernel, 'version', 'kernel')}-{_sha(data)[:16]}.vmlinux"
    if out.exists():
        os.utime(out)  # mtime = last use, for the pruning below
        return out
    marker = out.with_suffix(".no-pvh")
    if marker.exists():
        return bz
    vmlinux = bzimage.payload(data)
    why = "" if vmlinux is not None else "payload compression not supported here"
    if vmlinux is not None and not _has_pvh_note(vmlinux):
        why, vmlinux = "no PVH entry note (CONFIG_PVH=n)", None
    out_dir.mkdir(exist_ok=True)
    if vmlinux is None:
        log.info("kernel %s boots as a bzImage (%s): slower under TCG", bz, why)
        marker.write_text(why + "\n")
        return bz
    cache.atomic_write(out, vmlinux)
    # ~65 MB each: keep the 8 most recently booted (a running guest has its copy loaded)
    cache.prune(out_dir.glob("*.vmlinux"), 8)
    return out


def tcg_cmdline(kernel: KernelLike, cpuinfo: str | None = None) -> list[str]:
    """Kernel arguments that shorten a boot under TCG: `lpj=`, the delay-loop calibration's
    result, given.  The boot CPU derives it from the TSC at once, but under TCG every
    secondary CPU's calibrate_delay_direct() fails ("failed to get a good estimate for
    loops_per_jiffy") and falls back to the slow loop: about 0.2 s of a 2-vCPU boot.
    udelay() runs on the TSC, so the value only has to be of the right order: the host's
    clock rate (the emulated TSC follows it) over the kernel's CONFIG_HZ (250 when its
    config is not beside the bzImage, the Debian and catalog value)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    mhz = next((float(line.split(":", 1)[1]) for line in cpuinfo.splitlines()
                if line.startswith("cpu MHz") and ":" in line), 0.0)
    if mhz <= 0:
        return []
    hz = 250
    try:
        for line in (Path(kernel.bzimage).parent / "config").read_text().splitlines():
            if line.startswith("CONFIG_HZ="):
                hz = int(line.split("=", 1)[1])
    except (OSError, ValueError):
        pass
    return [f"lpj={round(mhz * 1e6 / hz)}"]


def _has_pvh_note(elf: bytes) -> bool:
    """Is this a 64-bit ELF with a Xen PHYS32_ENTRY note (the PVH entry point)?"""
    import struct

    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def probe_initrd() -> Path:
    """A tiny initramfs that prints PROBE_MARKER and powers off (the KVM probe)."""
    script = (b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs d /dev\n"
              b"echo " + PROBE_MARKER.encode() + b" > /dev/ttyS0\n/bin/busybox poweroff -f\n")
    busybox = _busybox()
    out = cache_dir() / "initrd" / f"probe-{_sha(script + _sha(busybox.read_bytes()).encode())[:16]}.cpio.gz"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    cpio = Cpio()
    for d in ("bin", "dev"):
        cpio.dir(d)
    cpio.char("dev/console", 0o600, 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", script, 0o755)
    cache.atomic_write(out, cpio.gzipped())
    return out


PROBE_MARKER = "racelab-probe: booted"


def _busybox() -> Path:
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(p).is_file():
            return Path(p)
    raise BadInput("busybox (static) is missing: deb: kernels need it for their initramfs",
                   hint="apt-get install busybox-static  (or run ./bootstrap install)")


def _module_bytes(path: Path) -> bytes:
    """Busybox insmod takes plain ELF: decompress .ko.xz / .ko.zst / .ko.gz here."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            run(["zstd", "-q", "-d", "-f", path, "-o", Path(d) / "m.ko"])
            return (Path(d) / "m.ko").read_bytes()
    return data


class Cpio:
    """A newc ("070701") cpio archive written in Python: device nodes and owners
    without root or mknod, and byte-for-byte reproducible (mtime 0)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self.names: list[str] = []

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        nameb = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(nameb), 0]
        self._ino += 1
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._buf.write(hdr + nameb)
        self._buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))
        if name != "TRAILER!!!":
            self.names.append(name)

    def dir(self, name: str, perm: int = 0o755) -> None:
        if name not in self.names:
            self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def char(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._buf.getvalue(), compresslevel=6, mtime=0)


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
