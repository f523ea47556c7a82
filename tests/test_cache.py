"""racelab cache du / gc on a cache of our own making (RACELAB_CACHE): what goes, what stays."""
import json
import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from lab import cache, cli

DAY = 86400


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make(path: Path, size: int = 4096, age_days: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    t = time.time() - age_days * DAY
    os.utime(path, (t, t))
    return path


def tree(root: Path, name: str, age_days: float, identity: str = "tarball:abc") -> Path:
    d = root / "build" / name
    make(d / "linux" / "vmlinux", 8192, age_days)
    make(d / "linux" / ".config", 100, age_days)
    (d / "state.json").write_text(json.dumps({"identity": identity}))
    for p in (d / "state.json", d / "linux", d):
        t = time.time() - age_days * DAY
        os.utime(p, (t, t))
    return d


def age(path: Path, days: float) -> Path:
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def test_du_sizes_every_area(root, capsys):
    make(root / "downloads" / "a" / "linux.tar.xz", 10000)
    make(root / "images" / "racelab-1.img", 20000)
    tree(root, "t1", 0)
    rows = {r.area.name: r for r in cache.du()}
    assert {"kernels", "build", "ccache", "downloads", "images", "boot", "vms", "other"} <= set(rows)
    assert rows["downloads"].bytes >= 10000 and rows["downloads"].files == 1
    assert rows["images"].bytes >= 20000
    assert rows["build"].files == 3
    cache.cli_du()
    out = capsys.readouterr().out
    assert "downloads" in out and "total" in out and str(root) in out


def test_gc_removes_the_old_and_the_dead_and_keeps_the_rest(root):
    old_tree, new_tree = tree(root, "old", 30), tree(root, "new", 1)
    # a Debian source tree whose package version is not the installed one: dead at any age
    dead_tree = tree(root, "debsrc-linux-source-6.1-0.0-gone", 0, identity="debsrc:linux-source-6.1=0.0-gone")
    locked_tree = tree(root, "busy", 30)
    old_dl, new_dl = make(root / "downloads" / "x" / "t.tar", age_days=30), make(root / "downloads" / "y" / "t.tar")
    age(old_dl.parent, 30)
    old_boot = make(root / "boot" / "6.1-aaaa.vmlinux", age_days=20)
    new_boot = make(root / "boot" / "6.1-bbbb.vmlinux", age_days=2)
    # images: the most recently used one stays however old; an older one goes
    img_old = make(root / "images" / "racelab-1.img", age_days=40)
    img_newest = make(root / "images" / "racelab-2.img", age_days=30)
    base = make(root / "images" / "base-1" / "done", age_days=40).parent
    age(base, 40)
    vm = make(root / "vms" / "racelab-1-x-0" / "root.qcow2", age_days=60).parent
    age(vm, 60)
    (root / "ccache").mkdir()     # evicted by ccache itself (a real ccache, on an empty cache)
    with FileLock(str(root / "build" / "busy.lock")):
        removed = cache.gc(keep=5, older_than=14 * DAY)
    gone = {r.path for r in removed}
    assert gone == {old_tree, dead_tree, old_dl.parent, old_boot, img_old}, gone
    for p in gone:
        assert not p.exists()
    for p in (new_tree, locked_tree, new_dl, new_boot, img_newest, base, vm, root / "ccache"):
        assert p.exists(), p
    why = {r.path: r.why for r in removed}
    assert "0.0-gone" in why[dead_tree] and "unused for 30 days" in why[old_tree]
    assert all(r.bytes > 0 for r in removed)


def test_gc_dry_run_removes_nothing(root, capsys):
    old = tree(root, "old", 30)
    cache.cli_gc(5, 14 * DAY, dry_run=True)
    assert old.exists()
    out = capsys.readouterr().out
    assert f"would remove build: {old}" in out and "to free" in out


def test_cache_cli(root, capsys):
    tree(root, "old", 30)
    assert cli.main(["cache", "gc", "--older-than", "7d"]) == 0
    assert "removed build:" in capsys.readouterr().out
    assert not (root / "build" / "old").exists()
    assert cli.main(["cache", "du"]) == 0
    assert cli.main(["cache", "gc", "--older-than", "soon"]) == 2
    assert "bad --older-than: 'soon'" in capsys.readouterr().err


# --- making entries (lab.cache.building, atomic_write, prune) ----------------------------

def test_an_entry_appears_whole_or_not_at_all(tmp_path):
    from lab import cache as c
    final = tmp_path / "area" / "entry"
    with pytest.raises(RuntimeError), c.building(final, directory=True) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the build failed")
    assert not final.exists() and list((tmp_path / "area").iterdir()) == []
    with c.building(final, directory=True) as tmp:
        (tmp / "whole").write_text("1")
        assert not final.exists()
    assert (final / "whole").read_text() == "1" and list((tmp_path / "area").iterdir()) == [final]
    with c.building(final, directory=True) as tmp:          # replaced whole
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    with c.building(final, directory=True, replace=False) as tmp:   # another builder won
        (tmp / "ours").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert list((tmp_path / "area").iterdir()) == [final]


def test_atomic_write_and_prune(tmp_path):
    import os

    from lab import cache as c
    f = tmp_path / "memo.json"
    c.atomic_write(f, "{}")
    c.atomic_write(f, b"[1]", mode=0o755)
    assert f.read_bytes() == b"[1]" and os.access(f, os.X_OK) and list(tmp_path.iterdir()) == [f]
    paths = []
    for i in range(5):
        p = tmp_path / f"k{i}.vmlinux"
        p.write_text(str(i))
        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    removed = c.prune(tmp_path.glob("*.vmlinux"), 2)
    assert sorted(p.name for p in removed) == ["k0.vmlinux", "k1.vmlinux", "k2.vmlinux"]
    assert sorted(p.name for p in tmp_path.glob("*.vmlinux")) == ["k3.vmlinux", "k4.vmlinux"]
