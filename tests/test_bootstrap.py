"""bootstrap installs what the catalog and the lab use (`./bootstrap packages` lists it)."""
import subprocess
from pathlib import Path

from lab.kernels import kbuild, kernel
from lab.run import TOOL_PACKAGES

ROOT = Path(__file__).resolve().parent.parent


def packages() -> set[str]:
    p = subprocess.run([str(ROOT / "bootstrap"), "packages"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.split())


def test_bootstrap_installs_every_kernel_source_the_catalog_builds_from():
    cat = kernel.load_catalog()
    used = {k.source for k in cat.kernels.values() if k.source.startswith("debsrc:")}
    assert {"debsrc:linux-source-6.1", "debsrc:linux-source-6.12"} <= used
    wanted = {s.removeprefix("debsrc:") for s in used}
    assert wanted <= packages(), f"bootstrap misses {wanted - packages()}"


def test_bootstrap_reads_the_sources_from_the_catalog_itself(tmp_path):
    # a series added to the catalog is installed without touching bootstrap
    (tmp_path / "kernels").mkdir()
    (tmp_path / "bootstrap").write_text((ROOT / "bootstrap").read_text())
    (tmp_path / "bootstrap").chmod(0o755)
    (tmp_path / "kernels" / "catalog.toml").write_text(
        '[source."debsrc:linux-source-6.1"]\nseries = "6.1"\n\n[source."debsrc:linux-source-7.0"]\n'
        'series = "7.0"\n\n[source."git:/x@v6.2"]\n')
    p = subprocess.run([str(tmp_path / "bootstrap"), "packages"], capture_output=True, text=True, timeout=60)
    got = set(p.stdout.split())
    assert {"linux-source-6.1", "linux-source-7.0"} <= got and not any("git" in g and "/" in g for g in got)


def test_bootstrap_installs_the_tools_the_lab_calls_and_the_build_needs():
    pkgs = packages()
    base = {"apt", "dpkg", "binutils", "perl", "patch", "tar"}   # essential, or pulled by build-essential
    tools = {p for v in TOOL_PACKAGES.values() for p in v.split()}
    build = {n.package for n in kbuild.BUILD_NEEDS}
    missing = (tools | build) - pkgs - base
    assert not missing, f"used by the lab but not installed by bootstrap: {sorted(missing)}"


def test_vagrant_up_installs_only_unless_tests_are_asked_for():
    import os
    import shutil

    import pytest
    if shutil.which("ruby") is None:
        pytest.skip("ruby missing: apt-get install vagrant (./bootstrap install)")
    text = (ROOT / "Vagrantfile").read_text()
    head = text[:text.index("Vagrant.configure")]     # the settings, evaluated as Vagrant would
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACELAB_")}

    def job(**extra):
        p = subprocess.run(["ruby", "-e", head + "\nputs RACELAB_JOB"], capture_output=True, text=True,
                           timeout=60, env={**env, **extra})
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()
    assert job() == "install"
    assert job(RACELAB_TESTS="1") == "test"
    assert "./bootstrap #{RACELAB_JOB}" in text
