"""The plugin's documented fixtures, used the way a user's own test file would use them.

A test file is written into a fresh directory and run by pytest in a
subprocess: the fixtures come from the installed `pytest11` entry point, not
from this suite's conftest.
"""
import os
import subprocess
import sys
import textwrap

import pytest

USER_TESTS = '''
import subprocess

from lab import scenario
from lab.scenario import to_topology


def test_topology_and_host(racelab_topology, racelab_host):
    topo = racelab_topology(to_topology(scenario.load("generic-rx-race")))
    pids = dict(topo.keepers)
    assert set(pids) == {"tx", "rx"}
    out = subprocess.run(["nsenter", "-t", str(pids["rx"]), "-n", "ip", "-o", "link", "show", "v1"],
                         capture_output=True, text=True, check=True).stdout
    assert "v1" in out
    assert racelab_host.cmd(["uname", "-r"]).stdout.strip()
    open("keepers.txt", "w").write(" ".join(str(p) for p in pids.values()))


def test_vm_and_kernel(racelab_vm, racelab_kernel):
    art = racelab_kernel("deb:6.1.0-47-amd64")
    vm = racelab_vm("deb:6.1.0-47-amd64")
    assert vm.host.cmd(["uname", "-r"]).stdout.strip() == art.version
    open("domain.txt", "w").write(vm.domain_name)
'''


def _virsh_names():
    return subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.slow
def test_fixtures_in_a_users_test_file(tmp_path):
    (tmp_path / "test_mine.py").write_text(textwrap.dedent(USER_TESTS))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout
    # torn down after the tests: the namespaces' keepers are gone, the guest is undefined
    for pid in (tmp_path / "keepers.txt").read_text().split():
        assert not os.path.exists(f"/proc/{pid}"), f"namespace keeper {pid} outlived the test"
    assert (tmp_path / "domain.txt").read_text() not in _virsh_names()
