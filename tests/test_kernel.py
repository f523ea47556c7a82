"""Kernel catalog, specs, config fragments, cache keys, patch stack, cache (lab.kernels)."""

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lab.kernels import kbuild, kernel, sources
from lab.run import BadInput, BuildFailed, cache_dir

FIX = Path(__file__).parent / "fixtures" / "kernel"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private RACELAB_CACHE, so tests never touch the real kernel cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("RACELAB_CACHE", str(d))
    return d


@pytest.fixture
def tree(tmp_path):
    """A copy of the small fixture source tree, with a PatchStack around it."""
    build = tmp_path / "build"
    shutil.copytree(FIX / "tree", build / "linux")
    return sources.PatchStack(build)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- catalog


def test_catalog_names_and_consistency():
    cat = kernel.load_catalog()
    for ver in ("6.1.192", "6.12.117"):
        for suffix in ("", "+revert-generic-rx", "+revert-veth-napi", "+widen-rx",
                       "+revert-veth-napi+widen-rx", "+revert-generic-rx+widen-rx"):
            assert ver + suffix in cat.kernels
    for n in range(47, 57):
        assert f"deb:6.1.0-{n}-amd64" in cat.kernels
        assert f"deb:6.1.0-{n}-cloud-amd64" in cat.kernels
    # `affected` is data the matrix trusts: it must follow from source + patches
    for k in cat.kernels.values():
        if k.source in cat.sources:
            derived = set(cat.sources[k.source].affected)
            for p in k.patches:
                derived |= set(cat.patches[p].affects)
            assert set(k.affected) == derived, k.name


def test_catalog_patches_cite_the_commits_they_undo():
    cat = kernel.load_catalog()
    cite = re.compile(r'commit ([0-9a-f]{12}) \("[^"]+", in v\d+\.\d+\)')
    for p in cat.patches.values():
        for series in ("6.1", "6.12"):
            text = p.path(series, cat.root).read_text()
            assert set(p.undoes) <= set(cite.findall(text)), (p.name, series)


def test_patch_texts_agree_with_their_series_and_the_readme():
    """Headers speak of their own series; the README's NOP is the one widen-rx describes."""
    cat = kernel.load_catalog()
    for series in ("6.1", "6.12"):
        for p in cat.patches.values():
            header = p.path(series, cat.root).read_text().split("\ndiff ", 1)[0]
            for other in re.findall(r"backported to (\d+\.\d+)", header):
                assert other == series, (p.name, series, other)
    nops = {re.search(r"(\d+)-byte NOP", p.read_text()).group(1)
            for p in (cat.root / "patches").glob("*/widen-rx.patch")}
    readme = re.findall(r"(\d+)-byte NOP", (cat.root / "README.md").read_text())
    assert len(nops) == 1 and readme and set(readme) == nops


def test_catalog_problems_are_all_reported(tmp_path):
    (tmp_path / "catalog.toml").write_text('''
[race.r]
fix = []
[kernel."a"]
source = "debsrc:linux-source-6.1"
patches = ["nope"]
fragments = ["missing.config"]
affected = ["unknown-race"]
colour = "red"
[kernel."b"]
source = "floppy:/dev/fd0"
patches = []
fragments = []
affected = []
''')
    with pytest.raises(BadInput) as e:
        kernel.load_catalog(tmp_path / "catalog.toml")
    msg = str(e.value)
    for needle in ("unknown patch 'nope'", "missing.config", "unknown race 'unknown-race'",
                   "colour", "not a kernel source", "no [source."):
        assert needle in msg


# ---------------------------------------------------------------- resolve


def test_resolve_catalog_name():
    s = kernel.resolve("6.1.192+revert-generic-rx")
    assert s.source == "debsrc:linux-source-6.1"
    assert [Path(p).name for p in s.patches] == ["revert-generic-rx.patch"]
    assert Path(s.patches[0]).parent.name == "6.1"
    assert Path(s.fragments[0]) == ROOT / "kernels/config/lab.config"
    assert s.affected == ("generic-rx-race", "shared-pool-rx-race")


def test_resolve_composes_name_and_catalog_patches():
    s = kernel.resolve("6.12.117+widen-rx+revert-veth-napi")
    assert [Path(p).name for p in s.patches] == ["widen-rx.patch", "revert-veth-napi.patch"]
    assert all(Path(p).parent.name == "6.12" for p in s.patches)
    assert s.affected == ("veth-napi-race",)
    s = kernel.resolve("debsrc:linux-source-6.1+revert-veth-napi")
    assert s.affected == ("veth-napi-race",)


def test_resolve_unknown_name_suggests_close_matches():
    with pytest.raises(BadInput) as e:
        kernel.resolve("6.1.192+revert-generic")
    assert e.value.exit_code == 2
    assert "6.1.192+revert-generic-rx" in e.value.hint


def test_resolve_other_sources():
    s = kernel.resolve("git:/src/linux@v6.1")
    assert s.source == "git:/src/linux@v6.1" and s.affected is None
    assert s.fragments and s.fragments[0].endswith("lab.config")
    assert kernel.resolve("deb:6.1.0-50-amd64").affected == ()
    assert kernel.resolve("deb:6.12.48+deb12-amd64").affected is None
    assert kernel.resolve("bzimage:/tmp/bzImage").fragments == ()
    with pytest.raises(BadInput, match="needs a ref"):
        kernel.resolve("git:/src/linux")


def test_resolve_extras(tmp_path):
    p = tmp_path / "mine.patch"
    p.write_text("")
    s = kernel.resolve("6.1.192", fragments=["kcsan"], patches=[str(p)])
    assert s.fragments[-1].endswith("kcsan.config")
    assert s.patches[-1] == str(p)
    assert s.affected is None                   # an outside patch: unknown
    s = kernel.resolve("6.1.192", patches=["revert-veth-napi"])
    assert s.affected == ("veth-napi-race",)
    with pytest.raises(BadInput, match="as shipped"):
        kernel.resolve("deb:6.1.0-50-amd64", fragments=["kcsan"])
    with pytest.raises(BadInput, match="fragment not found"):
        kernel.resolve("6.1.192", fragments=["nosuch"])


def test_relative_fragment_and_patch_paths_work_from_anywhere(tmp_path, monkeypatch):
    """A relative path is tried against the current directory first, then the project root."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = kernel.resolve("6.1.192", fragments=["kernels/config/kcsan.config"],
                       patches=["kernels/patches/6.1/widen-rx.patch"])
    assert s.fragments[-1] == str(ROOT / "kernels/config/kcsan.config")
    assert s.patches[-1] == str(ROOT / "kernels/patches/6.1/widen-rx.patch")
    mine = elsewhere / "kernels/config/kcsan.config"          # a file here wins over the project's
    mine.parent.mkdir(parents=True)
    mine.write_text("CONFIG_KCSAN=y\n")
    assert kernel.resolve("6.1.192", fragments=["kernels/config/kcsan.config"]).fragments[-1] == str(mine)
    assert kernel.resolve("6.1.192", fragments=["kasan"]).fragments[-1] == str(ROOT / "kernels/config/kasan.config")
    with pytest.raises(BadInput, match="fragment not found") as e:
        kernel.resolve("6.1.192", fragments=["kernels/config/nosuch.config"])
    assert str(ROOT) in e.value.hint and "kcsan.config" in e.value.hint


def git_tree(repo: Path, makefile: str | None = None) -> Path:
    """The fixture tree as a one-commit git repository (optionally with another top Makefile)."""
    shutil.copytree(FIX / "tree", repo)
    if makefile is not None:
        (repo / "Makefile").write_text(makefile)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    return repo


def test_catalog_patch_names_on_git_and_tarball_sources(tmp_path):
    """A bare catalog patch name picks the file for the tree's series; when the series
    cannot be told, or has no such patch, the error names the fix (a file)."""
    repo = git_tree(tmp_path / "linux")                       # its Makefile says 6.1.192
    s = kernel.resolve(f"git:{repo}@HEAD", patches=["revert-veth-napi"])
    assert s.patches == (str(ROOT / "kernels/patches/6.1/revert-veth-napi.patch"),)
    s = kernel.resolve("tarball:/nowhere/linux-6.12.5.tar.xz", patches=["widen-rx"])   # nothing fetched
    assert s.patches == (str(ROOT / "kernels/patches/6.12/widen-rx.patch"),)
    s = kernel.resolve("tarball:https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.1.5.tar.xz", patches=["widen-rx"])
    assert s.patches == (str(ROOT / "kernels/patches/6.1/widen-rx.patch"),)
    with pytest.raises(BadInput, match="cannot tell which kernel series") as e:
        kernel.resolve("tarball:/nowhere/my-kernel.tar.xz", patches=["widen-rx"])
    assert "--patch " in e.value.hint and "widen-rx.patch" in e.value.hint
    old = git_tree(tmp_path / "old",
                   FAKE_MAKEFILE.replace("PATCHLEVEL = 1", "PATCHLEVEL = 0").replace("VERSION = 6", "VERSION = 5"))
    with pytest.raises(BadInput, match="no version for kernel 5.0") as e:
        kernel.resolve(f"git:{old}@HEAD", patches=["widen-rx"])
    assert "patches/6.1/widen-rx.patch" in e.value.hint and "patches/6.12/widen-rx.patch" in e.value.hint


def test_each_source_kind_is_its_own_module():
    """One module per kind behind one interface; parse_source dispatches by the prefix."""
    import importlib
    assert sources.SOURCE_KINDS == ("debsrc", "tarball", "git", "deb", "bzimage")
    for kind in sources.SOURCE_KINDS:
        mod = importlib.import_module(f"lab.kernels.sources.{kind}")
        assert mod.KIND == kind and mod.EXAMPLE.startswith(f"{kind}:")  # noqa: SIM300 - KIND is the subject
        want = ("parse", "resolve", "series", "prepare") if kind in sources.BUILDERS else ("parse", "resolve", "fetch")
        for fn in want:
            assert callable(getattr(mod, fn)), (kind, fn)
        assert sources.parse_source(mod.EXAMPLE).kind == kind
        assert sources.parse_source(mod.EXAMPLE).builds == (kind in sources.BUILDERS)
    with pytest.raises(BadInput) as e:
        sources.parse_source("floppy:/dev/fd0")
    for kind in sources.SOURCE_KINDS:
        assert f"{kind}:" in e.value.hint


def test_spec_json_roundtrip():
    s = kernel.resolve("6.1.192+revert-veth-napi+widen-rx")
    assert kernel.KernelSpec.from_json(s.to_json()) == s
    u = kernel.resolve("git:/x@HEAD")
    assert kernel.KernelSpec.from_json(u.to_json()) == u


def test_tarball_mirror(monkeypatch):
    monkeypatch.delenv("RACELAB_TARBALL_MIRROR", raising=False)
    assert sources.tarball.tarball_url("linux-6.1.5.tar.xz") == "https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.1.5.tar.xz"
    monkeypatch.setenv("RACELAB_TARBALL_MIRROR", "http://mirror.example/kernel/")
    assert sources.tarball.tarball_url("linux-6.1.5.tar.xz") == "http://mirror.example/kernel/v6.x/linux-6.1.5.tar.xz"
    assert sources.tarball.tarball_url("https://cdn.kernel.org/pub/linux/kernel/v5.x/linux-5.15.77.tar.xz") == \
        "http://mirror.example/kernel/v5.x/linux-5.15.77.tar.xz"
    assert sources.tarball.tarball_url("https://elsewhere.example/l.tar.gz") == "https://elsewhere.example/l.tar.gz"
    assert sources.tarball.tarball_url("/local/linux.tar.xz") is None


# ---------------------------------------------------------------- config


def test_fragment_merging(tmp_path):
    a = tmp_path / "a.config"
    b = tmp_path / "b.config"
    a.write_text("# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_S=\"x\"\n")
    b.write_text("# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=8\n")
    m = kbuild.merge_fragments([a, b])
    assert m == {"CONFIG_A": "y", "CONFIG_S": '"x"', "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_N": "8"}
    assert "# CONFIG_B is not set\n" in kbuild.render_config(m)
    assert kbuild.parse_config(kbuild.render_config(m)) == m
    assert kbuild.config_hash(m) != kbuild.config_hash(kbuild.merge_fragments([b, a]))


def test_lab_fragment_has_what_the_lab_needs():
    opts = kbuild.merge_fragments([ROOT / "kernels/config/lab.config"])
    for o in ("XDP_SOCKETS", "XDP_SOCKETS_DIAG", "VETH", "BPF_SYSCALL", "BPF_JIT", "KPROBES", "KPROBE_EVENTS",
              "FTRACE", "DEBUG_FS", "VIRTIO_NET", "VIRTIO_BLK", "VIRTIO_CONSOLE", "VIRTIO_PCI", "EXT4_FS",
              "DEVTMPFS", "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "NET_NS", "JUMP_LABEL", "ETHTOOL_NETLINK"):
        assert opts.get(f"CONFIG_{o}") == "y", o
    assert opts["CONFIG_NR_CPUS"] == "8"
    assert "=m" not in (ROOT / "kernels/config/lab.config").read_text()


def test_missing_option_detection_names_depends(tmp_path):
    wanted = {"CONFIG_XDP_SOCKETS": "y", "CONFIG_XDP_SOCKETS_DIAG": "y", "CONFIG_KCSAN": "y",
              "CONFIG_NR_CPUS": "8", "CONFIG_OFF": "n", "CONFIG_S": '"a"'}
    final = {"CONFIG_XDP_SOCKETS": "y", "CONFIG_NR_CPUS": "64", "CONFIG_S": '"a"'}
    lost = kbuild.missing_options(wanted, final)
    assert [x[0] for x in lost] == ["CONFIG_XDP_SOCKETS_DIAG", "CONFIG_KCSAN", "CONFIG_NR_CPUS"]
    deps = kbuild.kconfig_depends(FIX / "tree", "CONFIG_XDP_SOCKETS_DIAG")
    assert deps == ("depends on XDP_SOCKETS (Kconfig)", "depends on INET_DIAG (Kconfig)")
    assert kbuild.kconfig_depends(FIX / "tree", "CONFIG_VETH") == ("depends on NET_CORE (enclosing if, Kconfig)",)
    assert kbuild.kconfig_depends(FIX / "tree", "CONFIG_VIRTIO_NET") == (
        "depends on NET_CORE (enclosing if, Kconfig)", "depends on PCI (enclosing menu/choice, Kconfig)",
        "depends on VIRTIO (Kconfig)")
    assert kbuild.kconfig_depends(FIX / "tree", "CONFIG_AFTER") == ()
    msg = str(kbuild.LostOption("CONFIG_KCSAN", "y", "n", kbuild.kconfig_depends(FIX / "tree", "CONFIG_KCSAN")))
    assert "CONFIG_KCSAN=y became not set" in msg and "HAVE_ARCH_KCSAN" in msg and "!KASAN" in msg


def test_configure_stops_on_lost_options(tmp_path, monkeypatch):
    """configure() raises BadInput naming each lost option and its depends line."""
    t = tmp_path / "linux"
    shutil.copytree(FIX / "tree", t)

    def fake_run(argv, **kw):
        (t / ".config").write_text("CONFIG_XDP_SOCKETS=y\n# CONFIG_XDP_SOCKETS_DIAG is not set\n")
        import subprocess
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(kbuild, "run", fake_run)
    with open(tmp_path / "log", "w") as logf, pytest.raises(BadInput) as e:
        kbuild.configure(t, {"CONFIG_XDP_SOCKETS": "y", "CONFIG_XDP_SOCKETS_DIAG": "y"}, logf)
    assert "CONFIG_XDP_SOCKETS_DIAG=y became not set" in str(e.value)
    assert "INET_DIAG" in str(e.value)


def test_configure_stops_on_modules(tmp_path, monkeypatch):
    """Nothing may be =m (only bzImage is built): a required option that became m, an
    unrequested module, and a fragment asking for =m are all named at once."""
    t = tmp_path / "linux"
    shutil.copytree(FIX / "tree", t)
    out = tmp_path / "out"
    out.mkdir()
    argvs = []

    def fake_run(argv, **kw):
        argvs.append(argv)
        (out / ".config").write_text("CONFIG_XDP_SOCKETS=y\nCONFIG_VETH=m\nCONFIG_TUN=m\nCONFIG_BRIDGE=m\n"
                                     "# CONFIG_NFT is not set\n")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(kbuild, "run", fake_run)
    wanted = {"CONFIG_XDP_SOCKETS": "y", "CONFIG_VETH": "y", "CONFIG_BRIDGE": "m"}
    with open(tmp_path / "log", "w") as logf, pytest.raises(BadInput) as e:
        kbuild.configure(t, wanted, logf, out=out)
    msg = str(e.value)
    assert "CONFIG_VETH=y became m" in msg
    assert "CONFIG_TUN=m" in msg and "CONFIG_BRIDGE=m: a module (the fragment asks for it)" in msg
    assert "CONFIG_XDP_SOCKETS" not in msg and "CONFIG_NFT" not in msg
    assert "=y in the fragment" in e.value.hint
    assert all(f"O={out}" in a and f"KCONFIG_ALLCONFIG={out}/.racelab-fragment.config" in a for a in argvs)
    assert not (t / ".racelab-fragment.config").exists()       # the source tree is left alone
    kbuild.verify_config(t, {"CONFIG_VETH": "y"}, {"CONFIG_VETH": "y", "CONFIG_NFT": "n"})   # clean: passes


def source_view(tree: Path, dest: Path) -> Path:
    """A symlink view of a kernel tree without its in-tree build state.

    The cached trees are configured and built in place, and kbuild refuses an
    O= build from such a tree ("source tree is not clean"); hiding .config and
    the generated include directories is enough for Kconfig, and leaves the
    cached tree untouched.
    """
    hide = {".config", "include/config", "include/generated", "arch/x86/include/generated"}

    def walk(src: Path, dst: Path, rel: str) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for e in os.scandir(src):
            r = rel + e.name
            if r in hide:
                continue
            if any(h.startswith(r + "/") for h in hide):
                walk(Path(e.path), dst / e.name, r + "/")
            else:
                os.symlink(e.path, dst / e.name)

    walk(tree, dest, "")
    return dest


@pytest.fixture(scope="module", params=["linux-source-6.1", pytest.param("linux-source-6.12", marks=pytest.mark.slow)])
def kconfig_tree(request, tmp_path_factory):
    """(source view, O= directory) of a cached Debian source tree; skips if it is not cached.
    ~5 s per configure here, so 6.12 (the same fragments) only runs in the slow tier."""
    pkg = request.param
    try:
        res = sources.resolve_source(sources.parse_source(f"debsrc:{pkg}"))
    except BadInput as e:
        pytest.skip(f"{e.message}: apt-get install {pkg}")
    tree = kernel.cache_dir() / "build" / res.build_id / "linux"
    if not (tree / "scripts/kconfig").is_dir() and os.environ.get("RACELAB_ALL_TESTS"):
        # tests/run-all: the tree extracted, as a build does first (~90 s), not built (~13 min)
        from filelock import FileLock
        with FileLock(f"{tree.parent}.lock"), open(os.devnull, "w") as logf:
            sources.prepare_tree(res, tree.parent, [], logf)
    if not (tree / "Makefile").is_file() or not (tree / "scripts/kconfig").is_dir():
        pytest.skip(f"no cached {pkg} tree at {tree}: `racelab kernel build {res.version}` makes one")
    base = tmp_path_factory.mktemp(f"kconfig-{pkg}")
    return source_view(tree, base / "src"), base / "out"


@pytest.mark.parametrize("extra", [None, "kcsan", "lockdep", "kasan"])
def test_fragments_survive_a_real_kconfig(kconfig_tree, extra, tmp_path):
    """lab.config (+ each optional fragment) through the real configure step: allnoconfig,
    olddefconfig, and the verification (every option survives, no module).  Seconds, not a build."""
    view, out = kconfig_tree
    out.mkdir(exist_ok=True)
    frags = [ROOT / "kernels/config/lab.config"] + ([ROOT / f"kernels/config/{extra}.config"] if extra else [])
    wanted = kbuild.merge_fragments(frags)
    with open(tmp_path / "log", "w") as logf:
        final = kbuild.configure(view, wanted, logf, out=out)
    assert kbuild.missing_options(wanted, final) == []
    assert [k for k, v in final.items() if v == "m"] == []
    if extra:
        assert final[f"CONFIG_{'PROVE_LOCKING' if extra == 'lockdep' else extra.upper()}"] == "y"


# ---------------------------------------------------------------- keys


def test_cache_key_same_inputs_same_key():
    args = ("debsrc:linux-source-6.1=6.1.192-2", ["aa", "bb"], "cfg", "gcc 12.2.0")
    assert kernel.cache_key(*args) == kernel.cache_key(*args)


@pytest.mark.parametrize("i,changed", [(0, "debsrc:linux-source-6.1=6.1.192-3"), (1, ["aa"]),
                                       (1, ["bb", "aa"]), (2, "cfg2"), (3, "gcc 13")])
def test_cache_key_any_change_new_key(i, changed):
    args = ["debsrc:linux-source-6.1=6.1.192-2", ["aa", "bb"], "cfg", "gcc 12.2.0"]
    base = kernel.cache_key(*args)
    args[i] = changed
    assert kernel.cache_key(*args) != base


def test_plan_key_follows_patch_and_fragment_content(tmp_path, cache, monkeypatch):
    src = tmp_path / "linux-6.1.tar.xz"
    src.write_bytes(b"not really a tarball")
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\n")
    patch = tmp_path / "p.patch"
    patch.write_text("one\n")
    spec = kernel.KernelSpec("t", f"tarball:{src}", (str(patch),), (str(frag),), None)
    k1 = kernel.plan(spec).key
    assert kernel.plan(spec).key == k1
    patch.write_text("two\n")
    k2 = kernel.plan(spec).key
    frag.write_text("CONFIG_A=n\n")
    k3 = kernel.plan(spec).key
    monkeypatch.setattr(kbuild, "compiler_version", lambda: "gcc 99")
    k4 = kernel.plan(spec).key
    assert len({k1, k2, k3, k4}) == 4


# ---------------------------------------------------------------- patches


def test_patch_stack_apply_switch_reverse(tree):
    pristine = snapshot(tree.tree)
    a, b = FIX / "a-unlock.patch", FIX / "b-flush-late.patch"
    tree.switch([a])
    assert "rx_lock" not in (tree.tree / "net/xdp/xsk.c").read_text()
    veth_mtime = (tree.tree / "drivers/net/veth.c").stat().st_mtime_ns
    xsk_mtime = (tree.tree / "net/xdp/xsk.c").stat().st_mtime_ns
    time.sleep(0.01)
    tree.switch([a, b])                   # a stays: its file is not touched again
    assert (tree.tree / "net/xdp/xsk.c").stat().st_mtime_ns == xsk_mtime
    assert (tree.tree / "drivers/net/veth.c").stat().st_mtime_ns != veth_mtime
    assert [Path(x["path"]).name for x in tree.applied()] == ["a-unlock.patch", "b-flush-late.patch"]
    tree.switch([b])                      # reverse both, apply b
    assert "rx_lock" in (tree.tree / "net/xdp/xsk.c").read_text()
    tree.switch([])
    assert snapshot(tree.tree) == pristine
    assert tree.applied() == [] and not tree.state()["dirty"]


def test_patch_stack_reverses_what_was_applied_even_if_the_file_changed(tree, tmp_path):
    p = tmp_path / "a.patch"
    shutil.copy(FIX / "a-unlock.patch", p)
    pristine = snapshot(tree.tree)
    tree.switch([p])
    p.write_text("garbage that would not reverse\n")
    tree.switch([])
    assert snapshot(tree.tree) == pristine


def test_bad_patch_names_file_and_hunk_and_changes_nothing(tree):
    tree.switch([FIX / "a-unlock.patch"])
    before = snapshot(tree.tree)
    bad = FIX / "bad-context.patch"
    with pytest.raises(BadInput) as e:
        tree.switch([FIX / "b-flush-late.patch", bad])
    msg = str(e.value)
    assert "bad-context.patch" in msg and "net/xdp/xsk.c" in msg and "Hunk #1 FAILED" in msg
    # b applied, a reversed; the bad one changed nothing, and the state says so
    assert [Path(x["path"]).name for x in tree.applied()] == ["b-flush-late.patch"]
    assert snapshot(tree.tree) != before
    tree.switch([])
    assert snapshot(tree.tree) == snapshot(FIX / "tree")


PATCHED_FILES = ["net/xdp/xsk.c", "net/xdp/xsk_queue.h", "net/xdp/xsk_buff_pool.c",
                 "include/net/xsk_buff_pool.h", "include/net/xdp_sock.h", "drivers/net/veth.c"]


def pristine_files(tarball: Path) -> Path:
    """The files the catalog patches touch, from a Debian source tarball (extracted once, kept in the cache)."""
    import subprocess
    st = tarball.stat()
    top = tarball.name.removesuffix(".tar.xz")
    dest = cache_dir() / "test-kernel-files" / f"{top}-{st.st_size}-{int(st.st_mtime)}-{len(PATCHED_FILES)}"
    if not (dest / "done").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["tar", "-xf", tarball, "-C", tmp, *[f"{top}/{f}" for f in PATCHED_FILES]], check=True)
        (tmp / top / "done").write_text("")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp / top, dest)
        shutil.rmtree(tmp)
    return dest


def test_real_patches_apply_on_both_trees_in_catalog_order(tmp_path):
    """Each catalog kernel's patch list applies, in order, on the real Debian sources when installed."""
    cat = kernel.load_catalog()
    checked = 0
    for src in cat.sources.values():
        tarball = Path("/usr/src") / f"{src.spec.split(':')[1]}.tar.xz"
        if not tarball.is_file():
            continue
        pristine = pristine_files(tarball)
        for k in cat.kernels.values():
            if k.source != src.spec or not k.patches:
                continue
            work = tmp_path / k.name
            shutil.copytree(pristine, work)
            for p in k.patches:
                sources.apply_patch(work, cat.patches[p].path(src.series, cat.root))
            checked += 1
    if not checked:
        pytest.skip("no linux-source-6.1/6.12 installed (apt-get install linux-source-6.1)")


# ---------------------------------------------------------------- binaries


def fake_bzimage(path: Path, version: str) -> Path:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    s = f"{version} (racelab@test) #1 SMP".encode()
    data[0x400:0x400 + len(s)] = s
    path.write_bytes(bytes(data))
    return path


def test_bzimage_version(tmp_path):
    assert sources.bzimage.bzimage_version(fake_bzimage(tmp_path / "bz", "6.1.192-lab")) == "6.1.192-lab"
    (tmp_path / "no").write_bytes(b"\0" * 4096)
    with pytest.raises(BadInput, match="not a bzImage"):
        sources.bzimage.bzimage_version(tmp_path / "no")


def test_module_load_order_dependencies_first():
    deps = {"kernel/fs/ext4/ext4.ko": ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko"],
            "kernel/fs/jbd2/jbd2.ko": [], "kernel/fs/mbcache.ko": [], "kernel/lib/crc16.ko": [],
            "kernel/drivers/net/virtio_net.ko": ["kernel/drivers/net/net_failover.ko", "kernel/net/core/failover.ko"],
            "kernel/drivers/net/net_failover.ko": ["kernel/net/core/failover.ko"],
            "kernel/net/core/failover.ko": [], "kernel/crypto/crc32c_generic.ko": []}
    soft = {"ext4": ["crypto-crc32c"], "jbd2": ["crc32c-generic"]}
    order = sources.deb._load_order(deps, soft, ["virtio_net", "ext4", "veth"],
                                {"crypto-crc32c": ["crc32c_generic", "crc32c_nonexistent"]})
    assert order.index("kernel/net/core/failover.ko") < order.index("kernel/drivers/net/net_failover.ko") \
        < order.index("kernel/drivers/net/virtio_net.ko")
    for d in deps["kernel/fs/ext4/ext4.ko"]:
        assert order.index(d) < order.index("kernel/fs/ext4/ext4.ko")
    assert order.index("kernel/crypto/crc32c_generic.ko") < order.index("kernel/fs/jbd2/jbd2.ko")
    assert len(order) == len(set(order)) == 8


def test_ensure_bzimage_caches_and_hits_fast(tmp_path, cache):
    bz = fake_bzimage(tmp_path / "bzImage", "6.1.99-mine")
    (tmp_path / ".config").write_text("CONFIG_XDP_SOCKETS=y\n")
    spec = kernel.resolve(f"bzimage:{bz}")
    art = kernel.ensure(spec, progress=False)
    assert art.version == "6.1.99-mine" and art.bzimage.read_bytes() == bz.read_bytes()
    assert art.config.read_text() == "CONFIG_XDP_SOCKETS=y\n"
    assert art.dir.parent == cache / "kernels"
    assert kernel.KernelArtifact.from_json(art.to_json()) == art
    assert kernel.KernelArtifact.from_json((art.dir / "meta.json").read_text()) == art
    t0 = time.monotonic()
    assert kernel.ensure(spec, progress=False) == art
    assert time.monotonic() - t0 < 1.0
    assert not list((cache / "kernels").glob(".*tmp-*"))


def test_concurrent_ensure_builds_once(tmp_path, cache, monkeypatch):
    bz = fake_bzimage(tmp_path / "bzImage", "6.1.1")
    spec = kernel.resolve(f"bzimage:{bz}")
    calls = []
    real = kernel._fetch

    def slow_fetch(p, tmp):
        calls.append(1)
        time.sleep(0.5)
        return real(p, tmp)

    monkeypatch.setattr(kernel, "_fetch", slow_fetch)
    results = []
    threads = [threading.Thread(target=lambda: results.append(kernel.ensure(spec, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len({r.key for r in results}) == 1


def test_failed_build_leaves_no_entry(tmp_path, cache, monkeypatch):
    bz = fake_bzimage(tmp_path / "bzImage", "6.1.1")
    spec = kernel.resolve(f"bzimage:{bz}")

    def broken(p, tmp):
        (tmp / "bzImage").write_text("half")
        raise BuildFailed("boom")

    monkeypatch.setattr(kernel, "_fetch", broken)
    with pytest.raises(BuildFailed):
        kernel.ensure(spec, progress=False)
    assert kernel.cached() == []
    assert not list((cache / "kernels").glob(".*tmp-*"))


def test_gc_keeps_recent_and_locked(tmp_path, cache):
    from filelock import FileLock
    arts = []
    for i in range(4):
        bz = fake_bzimage(tmp_path / f"bz{i}", f"6.1.{i}")
        arts.append(kernel.ensure(kernel.resolve(f"bzimage:{bz}"), progress=False))
        os.utime(arts[-1].dir / "used", (1000 + i, 1000 + i))
    held = FileLock(str(cache / "kernels" / f"{arts[0].key}.lock"))
    held.acquire()
    try:
        removed = kernel.gc(keep=2)
    finally:
        held.release()
    assert removed == [arts[1].dir]            # 3 and 2 are newest; 0 is locked
    assert {a.key for a in kernel.cached()} == {arts[0].key, arts[2].key, arts[3].key}
    locks = {a.key: (cache / "kernels" / f"{a.key}.lock") for a in arts}
    inodes = {k: p.stat().st_ino for k, p in locks.items()}
    assert len(kernel.gc(keep=0)) == 3
    # the lock files stay, same inode: a builder waiting on one and a later one
    # creating a fresh file would otherwise both "hold" the key
    assert {k: p.stat().st_ino for k, p in locks.items()} == inodes


def test_gc_spares_an_entry_used_after_it_listed_it(tmp_path, cache, monkeypatch):
    specs = [kernel.resolve(f"bzimage:{fake_bzimage(tmp_path / f'bz{i}', f'6.1.{i}')}") for i in range(3)]
    arts = [kernel.ensure(s, progress=False) for s in specs]
    real = kernel._entries

    def listing_then_a_hit():
        got = real()
        kernel.ensure(specs[1], progress=False)      # another process's cache hit, right after the listing
        return got

    monkeypatch.setattr(kernel, "_entries", listing_then_a_hit)
    removed = kernel.gc(keep=0)
    assert sorted(removed) == sorted([arts[0].dir, arts[2].dir])
    assert arts[1].bzimage.is_file()


def test_cache_hit_waits_for_the_key_lock(tmp_path, cache):
    """A hit takes the key lock, so it cannot hand out an entry gc is removing."""
    from filelock import FileLock
    spec = kernel.resolve(f"bzimage:{fake_bzimage(tmp_path / 'bz', '6.1.1')}")
    art = kernel.ensure(spec, progress=False)
    got = []
    held = FileLock(str(cache / "kernels" / f"{art.key}.lock"))
    held.acquire()
    try:
        t = threading.Thread(target=lambda: got.append(kernel.ensure(spec, progress=False)))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got
        shutil.rmtree(art.dir)                          # as gc would, while it holds the lock
    finally:
        held.release()
    t.join(10)
    assert len(got) == 1 and got[0].bzimage.is_file()   # fetched again, not a dangling entry


def test_cli_build_prints_the_bzimage_path(tmp_path, cache, capsys):
    bz = fake_bzimage(tmp_path / "bzImage", "6.1.7")
    assert kernel.main(["build", f"bzimage:{bz}"]) == 0
    out, err = capsys.readouterr()
    art = kernel.cached()[0]
    assert out == f"{art.bzimage}\n" and art.bzimage.read_bytes() == bz.read_bytes()
    assert str(art.dir) in err and "build.log" in err and "uname -r 6.1.7" in err


def test_show_takes_fragments_and_patches(fake_kernel, cache, capsys):
    """show() (and `python -m lab.kernels.kernel show`) names the kernel a build with the same extras makes."""
    tb, _ = fake_kernel
    plain = kernel.show(f"tarball:{tb}")
    extra = kernel.show(f"tarball:{tb}", fragments=["kcsan"], patches=["widen-rx"])
    assert extra["key"] != plain["key"] and extra["config_hash"] != plain["config_hash"]
    assert extra["fragments"][-1] == str(ROOT / "kernels/config/kcsan.config")
    assert extra["patches"] == [str(ROOT / "kernels/patches/6.1/widen-rx.patch")]   # the tarball says 6.1.192
    capsys.readouterr()
    assert kernel.main(["show", f"tarball:{tb}", "--fragment", "kcsan", "--patch", "widen-rx"]) == 0
    assert f"key: {extra['key']}" in capsys.readouterr().out


def test_bench_kernel_build_keeps_its_figures_under_results(tmp_path, cache, monkeypatch, capsys):
    """bench/kernel_build writes figures.json (bench/README: every bench keeps its runs under results/)."""
    import importlib.machinery
    import importlib.util
    import json
    import types
    loader = importlib.machinery.SourceFileLoader("bench_kernel_build", str(ROOT / "bench/kernel_build"))
    bench = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(bench)
    built = []

    def fake_ensure(spec, progress=True, want_vmlinux=False):
        built.append(spec.name)
        return types.SimpleNamespace(name=spec.name, dir=tmp_path / "entry")

    monkeypatch.setattr(kernel, "ensure", fake_ensure)
    bench.main(["--warm", "--out", str(tmp_path / "out")])
    assert "figures: " in capsys.readouterr().out
    data = json.loads((tmp_path / "out/figures.json").read_text())
    assert data["bench"] == "kernel_build" and data["warm"] and data["error"] is None
    assert [s["what"] for s in data["steps"]] == ["incremental (+revert-veth-napi, one file)", "cache hit"]
    assert all({"seconds", "target_seconds", "ok", "cpu_seconds", "kernel"} <= set(s) for s in data["steps"])
    monkeypatch.setattr(bench, "ROOT", tmp_path)              # by default: <project>/results/bench-kernel-build-*
    bench.main(["--warm"])
    runs = list((tmp_path / "results").glob("bench-kernel-build-*/figures.json"))
    assert len(runs) == 1 and re.fullmatch(r"bench-kernel-build-\d+", runs[0].parent.name)


def test_cli_help_runs_standalone():
    """`python -m lab.kernel` is `racelab kernel`: the same parser, so the same help, word for word."""
    import subprocess
    import sys

    def helptext(*module_and_args: str) -> str:
        return subprocess.run([sys.executable, "-m", *module_and_args, "--help"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout
    out = helptext("lab.kernels.kernel")
    assert out == helptext("lab.cli", "kernel")
    assert out.startswith("usage: racelab kernel ")
    # each subcommand has its own line under the positional arguments, with its help
    listed = re.findall(r"^    (\w+)\s+\S", out, flags=re.M)
    assert listed == ["list", "build", "show", "gc"], out


# ---------------------------------------------------------------- the real thing


def _slow_enabled(config) -> bool:
    return os.environ.get("RACELAB_SLOW") == "1" or "slow" in (config.getoption("markexpr") or "")


@pytest.mark.slow
def test_build_revert_generic_rx_for_real(request):
    """Builds 6.1.192+revert-generic-rx from linux-source-6.1 (cached: a warm machine does not rebuild)."""
    if not _slow_enabled(request.config):
        pytest.skip("slow: a real kernel build; enable with -m slow or RACELAB_SLOW=1")
    if not Path("/usr/src/linux-source-6.1.tar.xz").is_file():
        pytest.skip("needs linux-source-6.1: apt-get install linux-source-6.1")
    spec = kernel.resolve("6.1.192+revert-generic-rx")
    art = kernel.ensure(spec, progress=False)
    cfg = kbuild.parse_config(art.config.read_text())
    wanted = kbuild.parse_config((ROOT / "kernels/config/lab.config").read_text())
    assert [k for k, v in wanted.items() if v == "y" and cfg.get(k) != "y"] == []
    assert [k for k, v in wanted.items() if v == "n" and cfg.get(k, "n") != "n"] == []
    assert kbuild.missing_options(wanted, cfg) == []          # NR_CPUS and the rest too
    assert [k for k, v in cfg.items() if v == "m"] == []
    # an unlocked generic receive is also open to the shared-pool race (the catalog says both)
    assert art.version == "6.1.192" and art.affected == ("generic-rx-race", "shared-pool-rx-race")
    assert art.bzimage.stat().st_size > 1_000_000
    # the reverted code: the tree, put back to this kernel's patch set (cheap), has no lock
    p = kernel.plan(spec)
    from filelock import FileLock
    build_dir = kernel.cache_dir() / "build" / p.res.build_id
    with FileLock(str(build_dir) + ".lock"):
        stack = sources.prepare_tree(p.res, build_dir, [Path(x) for x in spec.patches])
        xsk = (stack.tree / "net/xdp/xsk.c").read_text()
    body = xsk[xsk.index("int xsk_generic_rcv("):]
    body = body[:body.index("\n}\n")]
    assert "rx_lock" not in body and "__xsk_rcv(xs, xdp)" in body


def test_git_source_one_worktree_switches_refs_and_patches(tmp_path, cache):
    """git: sources check out into one persistent worktree; a new ref keeps build output."""
    import subprocess
    repo = tmp_path / "linux"
    shutil.copytree(FIX / "tree", repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    (repo / "README").write_text("two\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "two"], check=True)
    r1 = sources.resolve_source(sources.parse_source(f"git:{repo}@HEAD~1"))
    r2 = sources.resolve_source(sources.parse_source(f"git:{repo}@HEAD"))
    assert r1.build_id == r2.build_id and r1.identity != r2.identity and r1.version == "6.1.192"
    build = cache / "build" / r1.build_id
    stack = sources.prepare_tree(r1, build, [FIX / "a-unlock.patch"])
    assert not (stack.tree / "README").exists()
    (stack.tree / "built.o").write_text("object")          # untracked build output
    stack = sources.prepare_tree(r2, build, [FIX / "b-flush-late.patch"])
    assert (stack.tree / "README").read_text() == "two\n"
    assert "rx_lock" in (stack.tree / "net/xdp/xsk.c").read_text()       # a was reversed
    assert "xdp_do_flush();\n\txdp_clear" in (stack.tree / "drivers/net/veth.c").read_text()
    assert (stack.tree / "built.o").exists()
    with pytest.raises(BadInput, match="unknown git ref"):
        sources.resolve_source(sources.parse_source(f"git:{repo}@nosuch"))


def test_tarball_tree_extracted_once_and_dirty_tree_reextracted(tmp_path, cache):
    import tarfile
    tb = tmp_path / "linux-6.1.192.tar.xz"
    with tarfile.open(tb, "w:xz") as t:
        t.add(FIX / "tree", arcname="linux-6.1.192")
    res = sources.resolve_source(sources.parse_source(f"tarball:{tb}"))
    assert res.version == "6.1.192" and res.build_id.startswith("tarball-")
    build = cache / "build" / res.build_id
    stack = sources.prepare_tree(res, build, [FIX / "a-unlock.patch"])
    (stack.tree / "built.o").write_text("object")
    stack = sources.prepare_tree(res, build, [])
    assert (stack.tree / "built.o").exists()                  # not extracted again
    stack.save(dirty=True)                                     # as if killed mid-patch
    stack = sources.prepare_tree(res, build, [])
    assert not (stack.tree / "built.o").exists()
    assert snapshot(stack.tree) == snapshot(FIX / "tree")


FAKE_MAKEFILE = """\
VERSION = 6
PATCHLEVEL = 1
SUBLEVEL = 192
allnoconfig:
\tgrep -v DROPPED $(KCONFIG_ALLCONFIG) > .config
olddefconfig:
\t@true
kernelrelease:
\t@echo 6.1.192-fake
bzImage:
\t@echo "  CC      net/xdp/xsk.o"
\t@test ! -e FAIL || (echo "net/xdp/xsk.c:1: error: boom" >&2; exit 2)
\tmkdir -p arch/x86/boot
\tcat net/xdp/xsk.c > arch/x86/boot/bzImage
\techo map > System.map
\techo elf > vmlinux
"""


@pytest.fixture
def fake_kernel(tmp_path):
    """A tarball: source whose Makefile fakes allnoconfig/bzImage in a second (no compiler work)."""
    import tarfile
    src = tmp_path / "src"
    shutil.copytree(FIX / "tree", src)
    (src / "Makefile").write_text(FAKE_MAKEFILE)
    tb = tmp_path / "linux-6.1.192.tar.xz"
    with tarfile.open(tb, "w:xz") as t:
        t.add(src, arcname="linux-6.1.192")
    frag = tmp_path / "lab.config"
    frag.write_text("CONFIG_XDP_SOCKETS=y\nCONFIG_VETH=y\n")
    return tb, frag


def test_ensure_source_build_end_to_end(fake_kernel, cache):
    tb, frag = fake_kernel
    base = kernel.KernelSpec("fake", f"tarball:{tb}", (), (str(frag),), ())
    art = kernel.ensure(base, progress=False, want_vmlinux=True)
    assert art.version == "6.1.192-fake" and art.vmlinux and art.vmlinux.read_text() == "elf\n"
    assert kbuild.parse_config(art.config.read_text()) == {"CONFIG_XDP_SOCKETS": "y", "CONFIG_VETH": "y"}
    assert "rx_lock" in art.bzimage.read_text()
    patched = kernel.KernelSpec("fake+a", f"tarball:{tb}", (str(FIX / "a-unlock.patch"),), (str(frag),), None)
    art2 = kernel.ensure(patched, progress=False)
    assert art2.key != art.key and "rx_lock" not in art2.bzimage.read_text()
    assert "# patch stack: applied" in art2.build_log.read_text()
    assert len(list((cache / "build").iterdir())) == 2      # one tree (+ its lock file)
    assert kernel.ensure(base, progress=False) == art       # still cached, tree not touched
    assert {a.key for a in kernel.cached()} == {art.key, art2.key}


def test_ensure_lost_option_and_build_failure(fake_kernel, cache, tmp_path):
    tb, frag = fake_kernel
    frag.write_text("CONFIG_XDP_SOCKETS=y\nCONFIG_XDP_SOCKETS_DIAG=y # DROPPED\n")
    spec = kernel.KernelSpec("fake", f"tarball:{tb}", (), (str(frag),), ())
    with pytest.raises(BadInput) as e:
        kernel.ensure(spec, progress=False)
    assert "CONFIG_XDP_SOCKETS_DIAG" in str(e.value) and "INET_DIAG" in str(e.value)
    frag.write_text("CONFIG_XDP_SOCKETS=y\n")
    fail = tmp_path / "fail.patch"
    fail.write_text("--- /dev/null\n+++ b/FAIL\n@@ -0,0 +1 @@\n+x\n")
    spec = kernel.KernelSpec("fake", f"tarball:{tb}", (str(fail),), (str(frag),), ())
    with pytest.raises(BuildFailed) as e:
        kernel.ensure(spec, progress=False)
    assert e.value.exit_code == 3
    assert "error: boom" in str(e.value) and "full log:" in str(e.value)
    kept = Path(e.value.hint.split("full log: ")[1])
    assert kept.is_file() and "error: boom" in kept.read_text()
    assert kernel.cached() == [] and not list((cache / "kernels").glob(".*tmp-*"))


def fake_toolchain(tmp_path, tools, headers):
    """A PATH directory holding only `tools` (each a script) and an include directory holding only `headers`."""
    bin_dir, inc = tmp_path / "bin", tmp_path / "include"
    bin_dir.mkdir(parents=True)
    inc.mkdir(parents=True)
    for t in tools:
        (bin_dir / t).write_text("#!/bin/sh\n")
        (bin_dir / t).chmod(0o755)
    for h in headers:
        (inc / h).parent.mkdir(parents=True, exist_ok=True)
        (inc / h).write_text("")
    return str(bin_dir), [inc]


def test_missing_toolchain_names_only_missing_packages(tmp_path):
    every_tool = [t for n in kbuild.BUILD_NEEDS for t in n.tools]
    every_header = [h for n in kbuild.BUILD_NEEDS for h in n.headers]
    path, inc = fake_toolchain(tmp_path, [t for t in every_tool if t not in ("bison", "flex")],
                               [h for h in every_header if h != "gelf.h" and not h.startswith("openssl/")])
    with pytest.raises(BadInput) as e:
        kbuild.require_toolchain(path, inc)
    assert "bison, flex" in str(e.value) and "gelf.h" in str(e.value) and "openssl/opensslv.h" in str(e.value)
    assert e.value.hint == "apt-get install bison flex libssl-dev libelf-dev"
    assert "libelf.h" not in str(e.value)
    path, inc = fake_toolchain(tmp_path / "all", every_tool, every_header)
    kbuild.require_toolchain(path, inc)
    assert set(kbuild.BUILD_PACKAGES.split()) >= {"build-essential", "libssl-dev", "libelf-dev", "dwarves", "cpio",
                                                   "zstd", "bc", "bison", "flex", "ccache", "xz-utils"}


def test_cache_hit_needs_only_gcc(fake_kernel, cache, tmp_path, monkeypatch):
    """A cached source build is found with gcc alone on PATH (its version is in the key);
    a miss checks the whole toolchain before doing anything."""
    tb, frag = fake_kernel
    spec = kernel.KernelSpec("fake", f"tarball:{tb}", (), (str(frag),), ())
    art = kernel.ensure(spec, progress=False)
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    path, inc = fake_toolchain(tmp_path / "tc", [], [])
    gcc = Path(path) / "gcc"
    gcc.write_text(f"#!/bin/sh\necho '{version}'\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", path)
    monkeypatch.setattr(kbuild, "INCLUDE_DIRS", tuple(inc))
    assert kernel.ensure(spec, progress=False) == art
    other = kernel.KernelSpec("fake+a", f"tarball:{tb}", (str(FIX / "a-unlock.patch"),), (str(frag),), None)
    with pytest.raises(BadInput) as e:
        kernel.ensure(other, progress=False)
    assert "make" in str(e.value) and "build-essential" in e.value.hint and "libelf-dev" in e.value.hint
    assert not list((cache / "kernels").glob(".*tmp-*"))
    gcc.unlink()
    with pytest.raises(BadInput, match="gcc not found") as e:
        kernel.ensure(spec, progress=False)
    assert e.value.hint == "apt-get install build-essential"


def test_artifact_json_roundtrip_all_fields(tmp_path):
    d = tmp_path / "k"
    art = kernel.KernelArtifact(
        name="deb:6.1.0-47-amd64", key="abc", dir=d, bzimage=d / "bzImage", config=d / "config",
        system_map=d / "System.map", build_log=d / "build.log", version="6.1.0-47-amd64",
        source="deb:6.1.0-47-amd64", source_identity="deb:linux-image-6.1.0-47-amd64=6.1.170-3",
        patches=("/p/a.patch",), fragments=("/f/lab.config",), affected=("veth-napi-race",),
        vmlinux=d / "vmlinux", modules_dir=d / "modules",
        module_load_order=("kernel/net/core/failover.ko", "kernel/drivers/net/virtio_net.ko"),
        config_hash="h", compiler="gcc", build_seconds=1.5, created=2.0)
    assert kernel.KernelArtifact.from_json(art.to_json()) == art
    moved = art.relocated(tmp_path / "elsewhere")
    assert moved.modules_dir == tmp_path / "elsewhere" / "modules" and moved.key == "abc"
    unknown = kernel.KernelArtifact("x", "k", d, d / "b", d / "c", d / "s", d / "l", "v", "git:/x@y")
    assert kernel.KernelArtifact.from_json(unknown.to_json()).affected is None


def test_cache_hit_is_named_as_asked(fake_kernel, cache):
    tb, frag = fake_kernel
    a = kernel.ensure(kernel.KernelSpec("first", f"tarball:{tb}", (), (str(frag),), ("veth-napi-race",)),
                      progress=False)
    b = kernel.ensure(kernel.KernelSpec("second", f"tarball:{tb}", (), (str(frag),), None), progress=False)
    assert a.key == b.key and (b.name, b.affected) == ("second", None)



# ---------------------------------------------------------------- corrupt cache entries


def whole_bzimage(path: Path, version: str, size: int = 300_000) -> Path:
    """A fake bzImage whose boot header says how long it is (setup_sects, syssize), as a real one's does."""
    fake_bzimage(path, version)
    data = bytearray(path.read_bytes()) + bytearray(size - 0x1000)
    data[0x1F1] = 7                                          # (7 + 1) * 512 setup bytes
    data[0x1F4:0x1F8] = ((size - 8 * 512) // 16).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def _counting(monkeypatch, name):
    calls = []
    real = getattr(kernel, name)

    def wrapped(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(kernel, name, wrapped)
    return calls


def test_entry_records_the_hash_of_every_artifact_file(fake_kernel, cache):
    tb, frag = fake_kernel
    art = kernel.ensure(kernel.KernelSpec("fake", f"tarball:{tb}", (), (str(frag),), ()), progress=False,
                        want_vmlinux=True)
    sums = dict(reversed(line.split("  ")) for line in (art.dir / kernel.SUMS).read_text().splitlines())
    assert set(sums) == {"bzImage", "config", "System.map", "vmlinux"}
    assert sums["bzImage"] == sources.sha256_file(art.bzimage)
    # the same format `sha256sum -c` reads
    assert subprocess.run(["sha256sum", "-c", "--quiet", kernel.SUMS], cwd=art.dir).returncode == 0


def test_truncated_bzimage_of_a_source_build_is_rebuilt(fake_kernel, cache, monkeypatch, caplog):
    tb, frag = fake_kernel
    spec = kernel.KernelSpec("fake", f"tarball:{tb}", (), (str(frag),), ())
    art = kernel.ensure(spec, progress=False)
    good = art.bzimage.read_bytes()
    builds = _counting(monkeypatch, "_build")
    with caplog.at_level("INFO", logger="racelab"):
        assert kernel.ensure(spec, progress=False) == art          # intact: a plain hit, nothing said
    assert builds == [] and not [r for r in caplog.records if r.levelname == "WARNING"]
    os.truncate(art.bzimage, 10)
    caplog.clear()
    with caplog.at_level("INFO", logger="racelab"):
        again = kernel.ensure(spec, progress=False)
    assert builds == [1] and again.bzimage.read_bytes() == good
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and art.key in warned[0] and "bzImage does not match its recorded sha256" in warned[0]
    assert "(10 bytes" in warned[0] and "rebuilding it" in warned[0]
    assert not list((cache / "kernels").glob(".*old-*")) and not list((cache / "kernels").glob(".*tmp-*"))
    assert kernel.ensure(spec, progress=False).bzimage.read_bytes() == good and builds == [1]


@pytest.mark.parametrize("damage", ["truncate", "system_map", "config_gone"])
def test_damaged_fetched_entry_is_fetched_again(tmp_path, cache, monkeypatch, caplog, damage):
    bz = whole_bzimage(tmp_path / "bzImage", "6.1.99-mine")
    (tmp_path / "System.map").write_text("ffffffff81000000 T _text\n")
    (tmp_path / ".config").write_text("CONFIG_XDP_SOCKETS=y\n")
    spec = kernel.resolve(f"bzimage:{bz}")
    art = kernel.ensure(spec, progress=False)
    fetches = _counting(monkeypatch, "_fetch")
    if damage == "truncate":                         # what the issue did: truncate -s 100000 bzImage
        subprocess.run(["truncate", "-s", "100000", str(art.bzimage)], check=True)
        file = "bzImage does not match"
    elif damage == "system_map":
        art.system_map.write_text("ffffffff81000000 T _stext\n")
        file = "System.map does not match"
    else:
        art.config.unlink()
        file = "config is missing"
    with caplog.at_level("INFO", logger="racelab"):
        again = kernel.ensure(spec, progress=False)
    assert fetches == [1] and again.bzimage.read_bytes() == bz.read_bytes()
    assert again.config.read_text() == "CONFIG_XDP_SOCKETS=y\n"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and art.key in warned[0] and file in warned[0] and "fetching it again" in warned[0]


def test_entry_without_recorded_hashes(tmp_path, cache, monkeypatch, caplog):
    """An entry from before hashes were kept: hashes recorded on its first use if its
    bzImage is as long as its header says; a truncated one is made again."""
    bz = whole_bzimage(tmp_path / "bzImage", "6.1.5")
    spec = kernel.resolve(f"bzimage:{bz}")
    art = kernel.ensure(spec, progress=False)
    (art.dir / kernel.SUMS).unlink()
    fetches = _counting(monkeypatch, "_fetch")
    with caplog.at_level("INFO", logger="racelab"):
        assert kernel.ensure(spec, progress=False) == art
    assert fetches == [] and (art.dir / kernel.SUMS).is_file()
    assert any("made before hashes were recorded" in r.getMessage() and art.key in r.getMessage()
               for r in caplog.records)
    # from now on it is verified
    art.bzimage.write_bytes(art.bzimage.read_bytes()[:-1] + b"x")
    kernel.ensure(spec, progress=False)
    assert fetches == [1]
    # older entry, truncated before anyone recorded its hash: the header tells
    (art.dir / kernel.SUMS).unlink()
    os.truncate(art.bzimage, 100_000)
    caplog.clear()
    with caplog.at_level("INFO", logger="racelab"):
        kernel.ensure(spec, progress=False)
    assert fetches == [1, 1] and art.bzimage.stat().st_size == 300_000
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "bzImage truncated: 100000 bytes, its header says 300000" in warned[0]


# ---------------------------------------------------------------- ccache and .incbin

INCBIN_S = '.section .rodata\n.globl blob\nblob:\n.incbin "blob.bin"\n'


def _assemble(cc, d, payload, env):
    (d / "blob.bin").write_bytes(payload)
    obj = d / "piggy.o"
    obj.unlink(missing_ok=True)
    # as kbuild assembles it (the -MMD depfile is what puts ccache in depend mode)
    subprocess.run([*cc, "-Wp,-MMD,.piggy.o.d", "-c", "-o", str(obj), "piggy.S"], cwd=d, env=env, check=True)
    return obj.read_bytes()


@pytest.mark.skipif(not shutil.which("ccache") or not shutil.which("gcc"), reason="needs gcc and ccache")
@pytest.mark.parametrize("cc", ["ccache", "racelab-cc"])
def test_incbin_payload_change_reaches_the_object(cc, tmp_path, cache):
    """ccache alone hands back the old payload (the hazard); racelab's CC does not."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "piggy.S").write_text(INCBIN_S)
    env = {**os.environ, **kbuild._make_env()}
    argv = ["ccache", "gcc"] if cc == "ccache" else [str(kbuild.cc_wrapper())]
    first = _assemble(argv, d, b"A" * 4096, env)
    second = _assemble(argv, d, b"B" * 4096, env)     # same size: piggy.S's text is unchanged
    assert b"A" * 4096 in first
    if cc == "ccache":
        assert b"A" * 4096 in second, "ccache saw the .incbin'd file change (then the wrapper is moot)"
    else:
        assert b"B" * 4096 in second


def _fake_tree(tmp_path, bin_bytes, packed):
    import gzip
    t = tmp_path / "tree"
    (t / "arch/x86/boot/compressed").mkdir(parents=True)
    (t / "arch/x86/boot/compressed/vmlinux.bin").write_bytes(bin_bytes)
    (t / "arch/x86/boot/bzImage").write_bytes(b"\x00" * 512 + b"HdrS" + gzip.compress(packed) + b"\x00" * 64)
    return t


def test_payload_check_passes_the_vmlinux_just_linked(tmp_path):
    elf = b"\x7fELF" + os.urandom(5000)
    kbuild.check_payload(_fake_tree(tmp_path, elf, elf + b"relocs"))


def test_payload_check_fires_on_a_stale_payload(tmp_path):
    elf = b"\x7fELF" + os.urandom(5000)
    old = elf[:3000] + b"\x90" + elf[3001:]
    with pytest.raises(BuildFailed) as e:
        kbuild.check_payload(_fake_tree(tmp_path, elf, old))
    assert "does not carry the vmlinux just linked" in e.value.message and "byte 3000" in e.value.message


def test_bzimage_in_a_build_tree_takes_config_and_system_map_from_the_top(tmp_path, cache):
    """bzimage:TREE/arch/x86/boot/bzImage: the build's .config and System.map are at TREE, three
    levels up (the amplifier needs the System.map to find the race window's code)."""
    tree = tmp_path / "linux"
    boot = tree / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 6\n")
    (tree / ".config").write_text("CONFIG_XDP_SOCKETS=y\n")
    (tree / "System.map").write_text("ffffffff81000000 T _text\n")
    bz = fake_bzimage(boot / "bzImage", "6.1.99-tree")
    art = kernel.ensure(kernel.resolve(f"bzimage:{bz}"), progress=False)
    assert art.config.read_text() == "CONFIG_XDP_SOCKETS=y\n"
    assert art.system_map.read_text() == "ffffffff81000000 T _text\n"
    # beside the bzImage wins over the tree's top
    (boot / "System.map").write_text("ffffffff81000000 T _text\nffffffff81000100 t beside\n")
    other = fake_bzimage(boot / "bzImage", "6.1.99-tree2")
    art2 = kernel.ensure(kernel.resolve(f"bzimage:{other}"), progress=False)
    assert "beside" in art2.system_map.read_text()


def test_files_in_a_kernel_name_are_patches_and_fragments(tmp_path, monkeypatch):
    """`NAME+path.patch+frag.config` wherever --kernel is taken: the same as --patch/--fragment."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.patch").write_text("")
    (tmp_path / "extra.config").write_text("CONFIG_KCSAN=y\n")
    s = kernel.resolve("6.1.192+revert-veth-napi+mine.patch+extra.config")
    assert s.name == "6.1.192+revert-veth-napi+mine.patch+extra.config"
    assert [Path(p).name for p in s.patches] == ["revert-veth-napi.patch", "mine.patch"]
    assert s.patches[-1] == str(tmp_path / "mine.patch")
    assert s.fragments[-1] == str(tmp_path / "extra.config")
    assert s.affected is None                   # an outside patch: no expectation
    s = kernel.resolve("6.1.192+kcsan")         # a fragment of kernels/config by name
    assert s.fragments[-1].endswith("kcsan.config") and s.patches == ()
    explicit = kernel.resolve("6.1.192", fragments=["kcsan"])
    assert (s.source, s.patches, s.fragments) == (explicit.source, explicit.patches, explicit.fragments)
    with pytest.raises(BadInput, match="neither a catalog patch nor a file") as e:
        kernel.resolve("6.1.192+./nosuch.patch")
    assert "revert-veth-napi" in e.value.hint
