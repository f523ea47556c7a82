"""Test tiers: unit by default; root, vm and slow are opt-in (tests/run-all runs them all).

A skipped test names the missing capability and how to get it.
"""
import os
import shutil
import socket

import pytest


def _af_xdp() -> bool:
    try:
        socket.socket(44, socket.SOCK_RAW, 0).close()
        return True
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    is_root = os.geteuid() == 0
    for item in items:
        if "root" in item.keywords or "vm" in item.keywords:
            if not is_root:
                item.add_marker(pytest.mark.skip(reason="needs root: run as root (sudo ./bootstrap test)"))
                continue
        if "root" in item.keywords and not _af_xdp():
            item.add_marker(pytest.mark.skip(reason="host kernel has no AF_XDP (CONFIG_XDP_SOCKETS=y)"))
        if "vm" in item.keywords and shutil.which("libvirtd") is None:
            item.add_marker(pytest.mark.skip(reason="libvirtd missing: apt-get install libvirt-daemon "
                                                    "libvirt-daemon-driver-qemu (or ./bootstrap install)"))
