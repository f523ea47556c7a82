"""Test tiers: unit by default; root, vm and slow are opt-in (tests/run-all runs them all).

A skipped test names the missing capability and how to get it.
"""
import os
import re
import shutil
import socket

import pytest

# A skip whose fix is an install step, a kernel build or root: what a CI machine set up by
# ./bootstrap must have.  Skips name their fix (STYLE.md point 10), so it is read from the reason.
INSTALL_STEP = re.compile(r"apt-get install|\./bootstrap install|racelab kernel build|needs root")


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under RACELAB_ALL_TESTS (tests/run-all, CI), a skip for a missing package, an unbuilt
    kernel or a missing root is a failure: a green whole-suite run must not hide a missing
    install step.  Skips for what a machine may lack (AF_XDP in the host kernel, a kprobe
    PMU) stay skips."""
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("RACELAB_ALL_TESTS") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if INSTALL_STEP.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"RACELAB_ALL_TESTS is set (tests/run-all), so this skip is a failure: "
                           f"{reason}\n(the whole suite needs root, every package ./bootstrap installs, "
                           "and builds the kernels its tests use)")


def _af_xdp() -> bool:
    try:
        socket.socket(44, socket.SOCK_RAW, 0).close()
        return True
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    is_root = os.geteuid() == 0
    for item in items:
        if ("root" in item.keywords or "vm" in item.keywords) and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root: run as root (sudo ./bootstrap test)"))
            continue
        if "root" in item.keywords and not _af_xdp():
            item.add_marker(pytest.mark.skip(reason="host kernel has no AF_XDP (CONFIG_XDP_SOCKETS=y)"))
        if "vm" in item.keywords and shutil.which("libvirtd") is None:
            item.add_marker(pytest.mark.skip(reason="libvirtd missing: apt-get install libvirt-daemon "
                                                    "libvirt-daemon-driver-qemu (or ./bootstrap install)"))


def _guests_of(pid: int) -> tuple[list[str], list[str]]:
    """libvirt domains and VM directories made by process pid or by a process it
    started (the owner's lineage, recorded by lab.vm), alive or long exited.
    Another xdist worker's guests carry another pid and are not counted."""
    import json

    try:
        import libvirt
    except ImportError:
        return [], []
    from lab.run import cache_dir
    from lab.vm import owner_of

    def ours(name: str, owner: dict) -> bool:
        return (name.startswith(f"racelab-{pid}-") or owner.get("pid") == str(pid)
                or str(pid) in str(owner.get("lineage", "")).split(","))

    domains = []
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        conn = None   # no libvirtd: nothing can be left in it
    if conn is not None:
        try:
            domains = sorted(d.name() for d in conn.listAllDomains()
                             if d.name().startswith("racelab-") and ours(d.name(), owner_of(d)))
        finally:
            conn.close()
    dirs = []
    vms = cache_dir() / "vms"
    for d in sorted(vms.glob("racelab-*")) if vms.is_dir() else []:
        try:
            owner = json.loads((d / "owner").read_text())
        except (OSError, ValueError):
            owner = {}
        if ours(d.name, owner):
            dirs.append(str(d))
    return domains, dirs


@pytest.fixture(autouse=True)
def _no_guest_left(request):
    """Every vm test: afterwards no libvirt domain and no VM directory (overlay) of
    this pytest process, or of any process it started (a `racelab` CLI child), is
    left.  Function scope, autouse, only for tests marked vm; runs after the
    test's own fixtures are torn down."""
    if request.node.get_closest_marker("vm") is None:
        yield
        return
    yield
    domains, dirs = _guests_of(os.getpid())
    if domains or dirs:
        _remove(domains, dirs)   # fail this test, not every test after it
    assert domains == [], f"leftover racelab domains: {domains}"
    assert dirs == [], f"leftover VM directories (overlays): {dirs}"


def _remove(domains: list[str], dirs: list[str]) -> None:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        for name in domains:
            try:
                conn.lookupByName(name).destroy()
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
