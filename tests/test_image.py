"""Guest image unit tests: recipe key, init scripts, initramfs and PVH extraction.

No network, no root, no mmdebstrap: everything here runs on the default tier.
"""
import gzip
import re
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab import boot, image
from lab.run import BadInput

IMAGES = image.IMAGES_DIR
CSRC = IMAGES.parent / "csrc"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _recipe_copy(tmp_path: Path, edit=None) -> Path:
    text = image.RECIPE_PATH.read_text()
    if edit:
        text = edit(text)
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return p


# --- recipe ---------------------------------------------------------------------

def test_recipe_loads_and_lists_the_guest_packages():
    r = image.load_recipe()
    for pkg in ("python3", "iperf3", "openssh-server", "iproute2", "ethtool", "trace-cmd",
                "procps", "kmod"):
        assert pkg in r.packages
    assert r.lab_root == image.GUEST_LAB_ROOT


def test_same_recipe_same_key(tmp_path):
    a = image.load_recipe(_recipe_copy(tmp_path))
    b = image.load_recipe(image.RECIPE_PATH)
    assert a.key() == b.key()
    assert len(a.key()) == 16


def test_changed_recipe_new_key(tmp_path):
    base = image.load_recipe().key()
    more = image.load_recipe(_recipe_copy(tmp_path, lambda t: t.replace(
        '"kmod",', '"kmod",\n    "strace",')))
    assert more.key() != base
    other_suite = image.load_recipe(_recipe_copy(tmp_path, lambda t: t.replace(
        'suite = "bookworm"', 'suite = "trixie"')))
    assert other_suite.key() != base


def test_comments_and_image_fields_do_not_change_the_base_key(tmp_path):
    base = image.load_recipe().key()
    edited = image.load_recipe(_recipe_copy(tmp_path, lambda t: "# a comment\n" + t.replace(
        "free_mib = ", "free_mib = 9")))   # 8 -> 98: only the final image changes
    assert edited.free_mib != image.load_recipe().free_mib
    assert edited.key() == base


def test_bad_recipe_names_every_bad_field(tmp_path):
    p = _recipe_copy(tmp_path, lambda t: t.replace('suite = "bookworm"', "suite = 12")
                     .replace("free_mib = ", "free_mib = -1 #"))
    with pytest.raises(BadInput) as e:
        image.load_recipe(p)
    assert "base.suite" in str(e.value) and "free_mib" in str(e.value)


# --- guest scripts ----------------------------------------------------------------

def test_init_is_c_and_does_its_job():
    # csrc/racelab-init.c is PID 1; what it must do, read from its source
    text = (CSRC / "racelab-init.c").read_text()
    assert '"racelab-init: "' in text and 'say("ready host=%s nic=%s uptime=%ss"' in text
    assert image.READY_MARKER == "racelab-init: ready"
    assert '"/usr/sbin/sshd"' in text and '"-D", "-r", "-E", "/run/racelab/sshd.log"' in text
    assert '"/lib/modules/racelab"' in text and "finit_module" in text
    assert '"10.0.2.15/24"' in text                 # QEMU user-net defaults, no DHCP
    assert '"/etc/racelab/fstab"' in text and "is_mounted(" in text
    # sshd is the only program it runs: each exec costs ~100 ms under TCG
    assert re.findall(r"\b(?:exec[lv]p?e?|posix_spawnp?|system|popen)\(", text) == ["execv("]
    assert "systemd" not in text.replace("no systemd", "")


@pytest.fixture(scope="module")
def built_init():
    from lab import dataplane
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("needs gcc and make: apt-get install build-essential")
    return dataplane.build() / dataplane.INIT_BINARY


def test_init_refuses_to_run_as_a_command(built_init):
    # not PID 1: it must not mount or start sshd on the host
    p = subprocess.run([str(built_init)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "PID 1" in p.stderr


def test_fstab_mounts_what_the_lab_needs():
    fstab = (IMAGES / "fstab").read_text()
    mounts = {line.split()[1]: line.split()[2] for line in fstab.splitlines()
              if line.strip() and not line.startswith("#")}
    assert mounts == {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/dev/pts": "devpts",
                      "/dev/shm": "tmpfs", "/run": "tmpfs", "/tmp": "tmpfs",
                      "/sys/kernel/tracing": "tracefs", "/sys/kernel/debug": "debugfs"}


def test_sshd_config_is_key_only_root_without_dns():
    cfg = dict(line.split(None, 1) for line in (IMAGES / "sshd_config").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert cfg["UseDNS"] == "no"
    assert cfg["PasswordAuthentication"] == "no"
    assert cfg["PermitRootLogin"] == "prohibit-password"
    assert cfg["HostKey"] == "/etc/ssh/ssh_host_ed25519_key"


@pytest.mark.skipif(not Path("/bin/busybox").exists() and not Path("/usr/bin/busybox").exists(),
                    reason="busybox missing: apt-get install busybox-static")
def test_initramfs_init_is_valid_busybox_sh():
    bb = shutil.which("busybox")
    subprocess.run([bb, "sh", "-n", str(IMAGES / "initramfs-init")], check=True)
    text = (IMAGES / "initramfs-init").read_text()
    assert "switch_root /newroot" in text and "insmod" in text and "poweroff -f" in text


# --- lab layer --------------------------------------------------------------------

def test_lab_layer_holds_lab_pyroute2_keys_and_init(cache, tmp_path):
    keys = image.ensure_keys()
    init = tmp_path / "racelab-init"
    init.write_bytes(b"\x7fELF the built init")
    files = {f.guest: f for f in image.lab_layer(keys, binaries=[init])}
    assert "/opt/racelab/lab/agent/run.py" in files
    assert not any(g.startswith("/opt/racelab/lab/") and not g.startswith("/opt/racelab/lab/agent/")
                   for g in files)          # the host's modules stay out of the guest
    assert "/opt/racelab/site/pyroute2/__init__.py" in files
    assert files[image.GUEST_INIT].mode == 0o755
    assert files[image.GUEST_INIT].content() == b"\x7fELF the built init"
    assert files["/etc/ssh/ssh_host_ed25519_key"].mode == 0o600
    assert files["/root/.ssh/authorized_keys"].content().decode().startswith("ssh-ed25519 ")
    assert not any("__pycache__" in g for g in files)
    # same inputs, same key; any changed byte, new key
    k1 = image._layer_key("base", list(files.values()), 8)
    k2 = image._layer_key("base", list(files.values()), 8)
    changed = [*files.values(), image.LayerFile("/etc/extra", 0o644, data=b"x")]
    assert k1 == k2 != image._layer_key("base", changed, 8)
    assert k1 != image._layer_key("other-base", list(files.values()), 8)


def test_keys_are_made_once(cache):
    a = image.ensure_keys()
    pub = a.host_pub
    b = image.ensure_keys()
    assert b.host_pub == pub and pub.startswith("ssh-ed25519 ") and len(pub.split()) == 2
    assert stat.S_IMODE(a.client.stat().st_mode) == 0o600


# --- initramfs --------------------------------------------------------------------

def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) from a newc archive."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + i * 8:pos + 14 + i * 8], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def _fake_kernel(tmp_path: Path, order: list[str]) -> SimpleNamespace:
    mods = tmp_path / "modules"
    for m in order:
        (mods / m).parent.mkdir(parents=True, exist_ok=True)
        (mods / m).write_bytes(b"\x7fELF fake " + m.encode())
    return SimpleNamespace(bzimage=tmp_path / "bzImage", version="6.1.0-99-amd64",
                           modules_dir=mods, module_load_order=tuple(order))


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox missing: apt-get install busybox-static")
def test_initramfs_content_and_order(cache, tmp_path):
    order = ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
             "kernel/drivers/block/virtio_blk.ko", "kernel/fs/ext4/ext4.ko"]
    k = _fake_kernel(tmp_path, order)
    path = boot.initrd_for(k)
    assert path is not None and path.name.startswith("6.1.0-99-amd64-")
    files = _read_cpio(gzip.decompress(path.read_bytes()))
    mode, body, _ = files["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and body == (IMAGES / "initramfs-init").read_bytes()
    assert stat.S_ISREG(files["bin/busybox"][0]) and files["bin/busybox"][0] & 0o111
    mode, _, rdev = files["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert files["lib/modules/racelab/load-order"][1].decode().split() == order
    for m in order:
        assert files[f"lib/modules/racelab/{m}"][1].startswith(b"\x7fELF fake")
    # directories come before what they hold
    names = list(files)
    assert names.index("lib/modules/racelab/kernel/fs/ext4") < names.index(
        "lib/modules/racelab/kernel/fs/ext4/ext4.ko")
    # cached and reproducible
    assert boot.initrd_for(k) == path
    first = path.read_bytes()
    path.unlink()
    assert boot.initrd_for(k).read_bytes() == first


def test_no_initramfs_without_modules(cache, tmp_path):
    assert boot.initrd_for(SimpleNamespace(bzimage=tmp_path / "bz", version="6.1.192",
                                            modules_dir=None, module_load_order=())) is None


def test_initramfs_names_missing_modules(cache, tmp_path):
    k = _fake_kernel(tmp_path, ["a.ko"])
    k.module_load_order = ("a.ko", "missing/b.ko")
    with pytest.raises(Exception, match="missing/b.ko"):
        boot.initrd_for(k)


def test_xz_modules_are_decompressed(tmp_path):
    import lzma
    p = tmp_path / "m.ko.xz"
    p.write_bytes(lzma.compress(b"\x7fELF module", check=lzma.CHECK_CRC32))
    assert boot._module_bytes(p) == b"\x7fELF module"


# --- PVH extraction ------------------------------------------------------------------

def _elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal ELF64 with one PT_NOTE program header holding the given notes."""
    blob = b""
    for name, ntype in notes:
        n = name + b"\0"
        blob += struct.pack("<III", len(n), 8, ntype) + n.ljust((len(n) + 3) // 4 * 4, b"\0") + b"\0" * 8
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)           # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)       # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(ehdr) + phdr + blob


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<II", data, 0x248, 0, len(payload))
    return bytes(data) + payload + struct.pack("<I", 12345)  # trailing size field


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_pvh_kernel_is_extracted_once(cache, tmp_path):
    elf = _elf_with_notes([(b"Xen", 6), (b"Xen", boot.XEN_ELFNOTE_PHYS32_ENTRY)])
    assert boot._has_pvh_note(elf)
    bz = tmp_path / "bzImage"
    bz.write_bytes(_bzimage(_gzip(elf)))
    k = SimpleNamespace(bzimage=bz, version="6.1.192")
    out = boot.kernel_for_boot(k)
    assert out != bz and out.read_bytes() == elf
    assert boot.kernel_for_boot(k) == out


def test_kernel_without_pvh_boots_as_bzimage(cache, tmp_path):
    elf = _elf_with_notes([(b"Xen", 6), (b"GNU", boot.XEN_ELFNOTE_PHYS32_ENTRY)])
    assert not boot._has_pvh_note(elf)
    bz = tmp_path / "bzImage"
    bz.write_bytes(_bzimage(_gzip(elf)))
    assert boot.kernel_for_boot(SimpleNamespace(bzimage=bz, version="x")) == bz
    lz4 = tmp_path / "lz4"
    lz4.write_bytes(_bzimage(b"\x02\x21\x4c\x18" + b"\0" * 64))
    assert boot.kernel_for_boot(SimpleNamespace(bzimage=lz4, version="y")) == lz4


def test_cpio_writer_round_trips():
    c = boot.Cpio()
    c.dir("a")
    c.file("a/b", b"hello", 0o600)
    c.char("dev-null", 0o666, 1, 3)
    files = _read_cpio(gzip.decompress(c.gzipped()))
    assert stat.S_ISDIR(files["a"][0])
    assert files["a/b"][1] == b"hello" and stat.S_IMODE(files["a/b"][0]) == 0o600
    assert files["dev-null"][2] == (1, 3)


# --- what the image must hold, and its size ------------------------------------------

def test_an_image_without_the_c_binaries_is_an_error(monkeypatch, tmp_path):
    import sys

    import lab
    from lab.run import BuildFailed
    monkeypatch.delattr(lab, "dataplane", raising=False)
    monkeypatch.setitem(sys.modules, "lab.dataplane", None)     # import fails
    with pytest.raises(BuildFailed, match="lab.dataplane cannot be imported"):
        image.dataplane_binaries()
    monkeypatch.undo()

    from lab import dataplane
    half = tmp_path / "bin"
    half.mkdir()
    (half / "xskcheck").write_text("#!/bin/sh\n")
    (half / "xskcheck").chmod(0o755)
    monkeypatch.setattr(dataplane, "build", lambda: half)
    with pytest.raises(BuildFailed, match="xsksend"):
        image.dataplane_binaries()
    (half / "xsksend").write_text("#!/bin/sh\n")
    (half / "xsksend").chmod(0o755)
    with pytest.raises(BuildFailed, match="xskamp"):
        image.dataplane_binaries()
    (half / "xskamp").write_text("#!/bin/sh\n")
    (half / "xskamp").chmod(0o755)
    with pytest.raises(BuildFailed, match="xsktrace"):
        image.dataplane_binaries()
    (half / "xsktrace").write_text("#!/bin/sh\n")
    (half / "xsktrace").chmod(0o755)
    with pytest.raises(BuildFailed, match="racelab-init"):
        image.dataplane_binaries()
    (half / "racelab-init").write_text("#!/bin/sh\n")
    (half / "racelab-init").chmod(0o755)
    assert [p.name for p in image.dataplane_binaries()] == ["racelab-init", "xskamp", "xskcheck", "xsksend",
                                                            "xsktrace"]


def test_the_layer_boots_the_built_init_not_a_script(built_init, cache, monkeypatch):
    # the real build (made in the real cache): its init lands at the path init= names,
    # the tools under GUEST_BIN
    from lab import dataplane
    assert image.GUEST_INIT.rsplit("/", 1)[1] == dataplane.INIT_BINARY
    monkeypatch.setattr(dataplane, "build", lambda: built_init.parent)
    files = {f.guest: f for f in image.lab_layer(image.ensure_keys(), image.dataplane_binaries())}
    init = files[image.GUEST_INIT]
    assert init.mode == 0o755 and init.source == built_init
    assert init.content()[:4] == b"\x7fELF"                  # static C, no interpreter line
    assert f"{image.GUEST_BIN}/{dataplane.INIT_BINARY}" not in files
    assert {f"{image.GUEST_BIN}/{b}" for b in dataplane.BINARIES} <= set(files)


def test_size_limit():
    from lab.run import BuildFailed
    image.check_size(image.MAX_IMAGE_BYTES)
    image.check_size(112_197_632)                    # the image as of Nov 2026
    with pytest.raises(BuildFailed, match="over the 120 MB limit"):
        image.check_size(image.MAX_IMAGE_BYTES + 1)


def test_an_image_over_the_limit_is_not_packed(monkeypatch, tmp_path):
    import dataclasses

    from lab.run import BuildFailed
    rootfs = tmp_path / "rootfs"
    (rootfs / "root/.ssh").mkdir(parents=True)
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/big").write_bytes(b"x" * 300_000)
    calls = []

    def fake_run(argv, **kw):
        argv = [str(a) for a in argv]
        calls.append(argv[0])
        if argv[0] == "cp":
            shutil.copytree(argv[2], argv[3], symlinks=True)

    monkeypatch.setattr(image, "run", fake_run)
    monkeypatch.setattr(image, "require_tools", lambda *t: None)
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    recipe = dataclasses.replace(image.load_recipe(), free_mib=120)
    out = tmp_path / "racelab-x.img"
    with pytest.raises(BuildFailed, match=r"guest image would be 12\d\.\d MB.*biggest: /usr/bin"):
        image._build_image(rootfs, [], recipe, out, progress=False)
    assert "mke2fs" not in calls and not out.exists()
    assert not list(tmp_path.glob(".racelab-x.stage-*"))


@pytest.mark.vm
def test_the_guest_image_is_under_120_mb():
    img = image.ensure_image(progress=False)
    assert img.size_bytes <= image.MAX_IMAGE_BYTES, f"{img.path}: {img.size_bytes / 1e6:.1f} MB"
    assert img.path.stat().st_size == img.size_bytes
