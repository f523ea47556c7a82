"""Real namespaces and veths: built, used, and gone on every exit path, SIGKILL included."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab import scenario as scen
from lab.agent.topology import TopologySpec, VethSpec, build

pytestmark = pytest.mark.root


def keeper_pids():
    out = subprocess.run(["pgrep", "-f", "nskeeper.py"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def net_ns_inodes():
    inodes = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                inodes.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass
    return inodes


def links(topo, ns):
    out = subprocess.run(topo.nsenter(ns, ["ip", "-j", "-d", "link", "show"]), capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def test_build_and_teardown_rxdrop_topology():
    spec = scen.to_topology(scen.load("veth-napi-race"))
    with build(spec) as topo:
        rx = links(topo, "rx")
        assert "v0" in links(topo, "tx")   # the peer end is in the sender's namespace
        want = 4   # the spec's numrxqueues, whatever the CPU count (veth's default is one per CPU)
        chans = subprocess.run(topo.nsenter("rx", ["ethtool", "-l", "v1"]), capture_output=True,
                               text=True).stdout.split("Current")[1]
        assert f"RX:\t\t{want}" in chans and f"TX:\t\t{want}" in chans
        assert rx["v1"]["address"] == scen.MAC_RX
        # IPv6 off: no neighbour discovery frames into the socket
        v6 = subprocess.run(topo.nsenter("rx", ["cat", "/proc/sys/net/ipv6/conf/v1/disable_ipv6"]),
                            capture_output=True, text=True).stdout.strip()
        assert v6 == "1"
        # xps "same": every CPU sends on tx-0
        xps0 = subprocess.run(topo.nsenter("tx", ["cat", "/sys/class/net/v0/queues/tx-0/xps_cpus"], mount=True),
                              capture_output=True, text=True).stdout.strip()
        assert int(xps0, 16) == (1 << os.cpu_count()) - 1
        inside = {os.stat(topo.ns_path(ns)).st_ino for ns in topo.keepers}
        assert len(inside) == 2 and inside <= net_ns_inodes()
    time.sleep(0.2)
    assert not (net_ns_inodes() & inside), "a namespace survived teardown"


def test_mitigations_are_applied():
    s = scen.apply_mitigation(scen.load("generic-rx-race"), "gro-on")
    s = scen.apply_mitigation(s, "threaded-napi")
    with build(scen.to_topology(s)) as topo:
        assert topo.apply_late() == ["threaded NAPI on for v1"]   # GRO on gives veth a NAPI
        threaded = subprocess.run(topo.nsenter("rx", ["cat", "/sys/class/net/v1/threaded"], mount=True),
                                  capture_output=True, text=True).stdout.strip()
        assert threaded == "1"
        feats = subprocess.run(topo.nsenter("rx", ["ethtool", "-k", "v1"]), capture_output=True, text=True).stdout
        assert "generic-receive-offload: on" in feats


def test_forward_topology_passes_nothing_without_the_checker():
    s = scen.load("generic-rx-race", {"checker.mode": "forward", "load.iperf3": True})
    with build(scen.to_topology(s)) as topo:
        assert set(links(topo, "mid")) >= {"a1", "b1"}
        assert set(links(topo, "cli")) >= {"a0"} and set(links(topo, "srv")) >= {"b0"}


def test_bad_spec_is_rejected_before_anything_is_built():
    from lab.run import BadInput
    spec = TopologySpec(("a",), (VethSpec("a", "x" * 16, "b", "y", queues=0),))
    with pytest.raises(BadInput) as e, build(spec):
        pass
    msg = str(e.value)
    assert "namespace 'b'" in msg and "1-15 characters" in msg and "queues" in msg


def test_sigkill_leaves_no_namespace_or_keeper():
    p = subprocess.Popen([sys.executable, "-m", "lab.agent.topology", "demo", "--queues", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    # wait for the topology description, then kill without warning
    text = ""
    deadline = time.time() + 30
    while time.time() < deadline:
        line = p.stdout.readline()
        text += line
        if line.rstrip("\n") == "}":   # the top-level object is closed
            break
    desc = json.loads(text)
    assert set(desc["netns"]) == {"tx", "rx"}
    ours = {int(path.split("/")[2]) for path in desc["netns"].values()}
    inodes = {os.stat(path).st_ino for path in desc["netns"].values()}
    assert inodes <= net_ns_inodes()
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and (keeper_pids() & ours or net_ns_inodes() & inodes):
        time.sleep(0.1)
    assert not (keeper_pids() & ours), "keepers outlived a SIGKILLed racelab"
    assert not (net_ns_inodes() & inodes), "a namespace outlived a SIGKILLed racelab"


def test_tx_and_rx_queue_counts_are_set_apart():
    from lab.agent.topology import TopologySpec, VethSpec
    spec = TopologySpec(("a", "b"), (VethSpec("a", "q0", "b", "q1", txqueues=4, rxqueues=2,
                                              a_addr="198.18.0.1/24", b_addr="198.18.0.2/24"),))
    with build(spec) as topo:
        for ns, dev in (("a", "q0"), ("b", "q1")):
            (info,) = json.loads(subprocess.run(topo.nsenter(ns, ["ip", "-d", "-j", "link", "show", dev]),
                                                capture_output=True, text=True).stdout)
            assert (info["num_tx_queues"], info["num_rx_queues"]) == (4, 2), info
