"""Declarative veth/netns topologies, built with pyroute2, gone on every exit.

A TopologySpec names network namespaces and veth pairs between them.  build()
turns it into real namespaces and links and returns a Topology whose paths
the workload uses to run programs inside each namespace.

Why namespaces are anonymous: each one is held by a small keeper process
(lab/agent/nskeeper.py: unshare(CLONE_NEWNET | CLONE_NEWNS), PR_SET_PDEATHSIG), not by a bind
mount under /run/netns.  When racelab exits in any way, SIGKILL included,
the keepers die, the kernel frees the namespaces, and the veths, XDP
programs and sockets in them go with them.  Nothing can be left behind, and
parallel runs (pytest-xdist) cannot collide on names.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lab.agent.run import BadInput, InfraError, log, run

CLONE_NEWNET = 0x40000000
KEEPER = Path(__file__).resolve().parent / "nskeeper.py"


@dataclass(frozen=True)
class VethSpec:
    """One veth pair: end a in namespace a_ns, end b in namespace b_ns."""

    a_ns: str
    a: str                      # interface name inside a_ns (namespaces isolate names)
    b_ns: str
    b: str
    queues: int = 1             # numtxqueues = numrxqueues on both ends, unless set apart below
    txqueues: int = 0           # numtxqueues on both ends; 0 = queues
    rxqueues: int = 0           # numrxqueues on both ends; 0 = queues
    a_addr: str = ""            # "198.18.0.1/24"; 198.18.0.0/15 is the benchmarking range
    b_addr: str = ""
    a_mac: str = ""             # fixed MACs let senders address frames without a lookup
    b_mac: str = ""
    gro_b: bool = False         # GRO on the receiving end (serialises per queue: a mitigation)
    threaded_b: bool = False    # threaded NAPI on the receiving end (a mitigation)
    channels_b: int = 0         # `ethtool -L b combined N` after creation; 0 = leave
    xps_a: str = "auto"         # auto | same | spread: which tx queue each sender CPU uses on end a
    mtu: int = 1500

    @property
    def numtx(self) -> int:
        return self.txqueues or self.queues

    @property
    def numrx(self) -> int:
        return self.rxqueues or self.queues


@dataclass(frozen=True)
class TopologySpec:
    netns: tuple[str, ...]
    veths: tuple[VethSpec, ...]

    def validate(self) -> list[str]:
        problems = []
        names = set(self.netns)
        if len(names) != len(self.netns):
            problems.append("topology.netns: duplicate namespace names")
        for i, v in enumerate(self.veths):
            where = f"topology.veth[{i}]"
            for ns in (v.a_ns, v.b_ns):
                if ns not in names:
                    problems.append(f"{where}: namespace {ns!r} is not in topology.netns {sorted(names)}")
            for n in (v.a, v.b):
                if not n or len(n) > 15:
                    problems.append(f"{where}: interface name {n!r} must be 1-15 characters")
            for fld in ("queues", "txqueues", "rxqueues"):
                n = getattr(v, fld)
                if not (1 if fld == "queues" else 0) <= n <= 64:
                    problems.append(f"{where}.{fld}: {n} not in {'1' if fld == 'queues' else '0'}..64")
            if v.xps_a not in ("auto", "same", "spread"):
                problems.append(f"{where}.xps_a: {v.xps_a!r} is not auto|same|spread")
            if v.channels_b < 0 or v.channels_b > min(v.numtx, v.numrx):
                problems.append(f"{where}.channels_b: {v.channels_b} not in 0..queues")
        return problems


@dataclass
class Topology:
    """A built topology: namespace name -> the pid of its keeper."""

    spec: TopologySpec
    keepers: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)   # "ns/dev" -> active queues

    def ns_path(self, ns: str) -> str:
        return f"/proc/{self.keepers[ns]}/ns/net"

    def nsenter(self, ns: str, argv: Sequence[str], mount: bool = False) -> list[str]:
        """argv that runs inside namespace ns (with its own sysfs if mount)."""
        pid = self.keepers[ns]
        pre = ["nsenter", f"--net=/proc/{pid}/ns/net"]
        if mount:
            pre.append(f"--mount=/proc/{pid}/ns/mnt")
        return [*pre, "--", *argv]

    def write_sysfs(self, ns: str, path: str, value: str) -> None:
        """Write a /sys or /proc/sys file as seen from inside namespace ns."""
        run(self.nsenter(ns, ["tee", path], mount=True), input=value + "\n")

    def apply_late(self) -> list[str]:
        """Settings that need the XDP program attached first; returns notes."""
        notes = []
        for v in self.spec.veths:
            if v.threaded_b:
                p = run(self.nsenter(v.b_ns, ["tee", f"/sys/class/net/{v.b}/threaded"], mount=True),
                        input="1\n", check=False)
                if p.returncode != 0:
                    notes.append(f"threaded NAPI not applicable on {v.b}: {p.stderr.strip()} "
                                 f"(no NAPI: neither GRO nor native XDP is on)")
                else:
                    notes.append(f"threaded NAPI on for {v.b}")
        return notes

    def describe(self) -> dict[str, object]:
        return {"netns": {ns: self.ns_path(ns) for ns in self.keepers}, "channels": self.channels,
                "veths": [v.__dict__ for v in self.spec.veths]}


def _start_keepers(names: Sequence[str], stack: ExitStack) -> dict[str, int]:
    """One keeper process per namespace, started together; name -> pid."""
    procs: dict[str, subprocess.Popen[str]] = {}
    for ns in names:
        # -S -I: the keeper needs the standard library only (see lab/nskeeper.py)
        procs[ns] = subprocess.Popen([sys.executable, "-S", "-I", str(KEEPER)],
                                     stdout=subprocess.PIPE, text=True)
        stack.callback(_stop_keeper, procs[ns])
    pids = {}
    for ns, proc in procs.items():
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            msg = {"error": f"keeper said {line!r}"}
        if "ready" not in msg:
            if os.geteuid() != 0:
                raise BadInput("network namespaces need root", hint="run racelab as root (sudo)")
            raise InfraError(f"cannot create a network namespace: {msg.get('error')}")
        pids[ns] = proc.pid
    return pids


@contextmanager
def _in_netns(ns_path: str) -> Iterator[None]:
    """This thread in the network namespace at ns_path for the block, then back.

    Sockets opened and /proc/sys/net files written inside the block belong to
    that namespace, with no helper process (pyroute2's NetNS forks one per
    namespace) and no nsenter exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(ns_path) as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise InfraError(f"setns {ns_path}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                # this thread would go on in the wrong namespace: nothing after it can be trusted
                raise InfraError(f"setns back: {os.strerror(ctypes.get_errno())}")


def _iproute_in(ns_path: str) -> Any:  # a pyroute2 IPRoute (untyped upstream)
    """An IPRoute whose netlink socket lives in the namespace at ns_path."""
    ipr = _iproute_class()
    with _in_netns(ns_path):
        return ipr()


def _iproute_class() -> type:
    """pyroute2's IPRoute, without running pyroute2/__init__.py if nothing has yet.

    That __init__ imports every pyroute2 module (NDB, IPDB, the CLI, nl80211, ...):
    3.6 s of a guest's set-up under TCG, where the one module used here takes
    about half of that.  The package is entered through a bare module object
    while its submodules load, then taken out of sys.modules again, so a later
    `import pyroute2` anywhere in the process runs the real __init__ (reusing the
    submodules loaded here)."""
    if "pyroute2" in sys.modules:
        from pyroute2.iproute.linux import IPRoute
        return cast(type, IPRoute)
    spec = importlib.util.find_spec("pyroute2")
    if spec is None:
        raise BadInput("pyroute2 is not installed", hint="run ./bootstrap (it installs the venv)")
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    # pyroute2.lab imports unittest.mock (and with it asyncio) for its test doubles and
    # does without them when that import fails: a third of what is left, not needed here
    no_unittest = "unittest" not in sys.modules
    if no_unittest:
        sys.modules["unittest"] = None  # type: ignore[assignment]  # makes the import fail
    try:
        from pyroute2.iproute.linux import IPRoute
    finally:
        del sys.modules["pyroute2"]
        if no_unittest:
            del sys.modules["unittest"]
    return cast(type, IPRoute)


@contextmanager
def build(spec: TopologySpec) -> Iterator[Topology]:
    """Create the namespaces and links; always tear them down."""
    problems = spec.validate()
    if problems:
        raise BadInput("bad topology:\n  " + "\n  ".join(problems))
    topo = Topology(spec)
    with ExitStack() as stack:
        topo.keepers.update(_start_keepers(spec.netns, stack))
        for v in spec.veths:
            _add_veth(topo, v)
        log.debug("topology up: %s", topo.describe())
        yield topo
    log.debug("topology down")


def _stop_keeper(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _add_veth(topo: Topology, v: VethSpec) -> None:
    a_ns = _iproute_in(topo.ns_path(v.a_ns))
    b_ns = _iproute_in(topo.ns_path(v.b_ns)) if v.b_ns != v.a_ns else a_ns
    try:
        # pyroute2 names the attributes after IFLA_NUM_{TX,RX}_QUEUES (it silently drops
        # iproute2's "numtxqueues" spelling, and veth then makes one queue per possible CPU)
        peer: dict[str, object] = {"ifname": v.b, "num_tx_queues": v.numtx, "num_rx_queues": v.numrx}
        if v.b_ns != v.a_ns:
            peer["net_ns_pid"] = topo.keepers[v.b_ns]
        if v.b_mac:
            peer["address"] = v.b_mac
        kw: dict[str, object] = {"ifname": v.a, "kind": "veth", "peer": peer,
                                 "num_tx_queues": v.numtx, "num_rx_queues": v.numrx}
        if v.a_mac:
            kw["address"] = v.a_mac
        a_ns.link("add", **kw)
        for ns_name, ns, ifname, addr in ((v.a_ns, a_ns, v.a, v.a_addr), (v.b_ns, b_ns, v.b, v.b_addr)):
            # IPv6 ND frames would land in the AF_XDP socket as noise: no IPv6 here
            knob = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
            with _in_netns(topo.ns_path(ns_name)):
                if knob.parent.parent.exists():
                    knob.write_text("1\n")
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=idx, mtu=v.mtu)
            if addr:
                ip, _, plen = addr.partition("/")
                ns.addr("add", index=idx, address=ip, prefixlen=int(plen or 24))
        for ns, ifname in ((a_ns, v.a), (b_ns, v.b)):
            ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
        # Senders build whole frames themselves: no segmentation offloads on the sending side.
        # (tx checksum offload too: a partial checksum forwarded through AF_XDP arrives broken)
        _ethtool(topo, v.a_ns, ["-K", v.a, "tx", "off", "tso", "off", "gso", "off"], quiet=True)
        _ethtool(topo, v.b_ns, ["-K", v.b, "gro", "on" if v.gro_b else "off"], quiet=not v.gro_b)
        # veth starts with one active queue whatever numrxqueues says: ask for what
        # the spec wants (at most the queues the device was created with).
        want = v.channels_b or min(v.numtx, v.numrx)
        for ns_name, dev in ((v.b_ns, v.b), (v.a_ns, v.a)):
            topo.channels[f"{ns_name}/{dev}"] = _set_channels(topo, ns_name, dev, want)
        # last: the carrier comes up (linkwatch) while the settings above are made
        for ns, ifname in ((a_ns, v.a), (b_ns, v.b)):
            _wait_up(ns, ifname)
    finally:
        a_ns.close()
        if b_ns is not a_ns:
            b_ns.close()
    # threaded NAPI needs a NAPI instance, which veth creates only with GRO on or
    # an XDP program attached: apply_late() sets it once the checker has attached.
    if v.xps_a != "auto" and v.numtx > 1:
        ncpu = os.cpu_count() or 1
        active = len([q for q in range(v.numtx)
                      if run(topo.nsenter(v.a_ns, ["test", "-e", f"/sys/class/net/{v.a}/queues/tx-{q}"],
                                          mount=True), check=False).returncode == 0])
        for q in range(active):
            if v.xps_a == "same":
                cpus = (1 << ncpu) - 1 if q == 0 else 0
            else:  # spread: CPU c sends on queue c % queues
                cpus = sum(1 << c for c in range(ncpu) if c % active == q)
            topo.write_sysfs(v.a_ns, f"/sys/class/net/{v.a}/queues/tx-{q}/xps_cpus", f"{cpus:x}")


def _set_channels(topo: Topology, ns: str, dev: str, want: int) -> int:
    p = run(topo.nsenter(ns, ["ethtool", "-l", dev]), check=False)
    maximum, _, current = p.stdout.partition("Current")
    maxima = re.findall(r"^(RX|TX):\s+(\d+)", maximum, re.M)
    cap = min((int(n) for _, n in maxima), default=1)
    n = max(1, min(want, cap))
    if n != want:
        log.info("%s: %d queue(s) asked, %d usable (the kernel refused more channels)", dev, want, n)
    now = {k: int(c) for k, c in re.findall(r"^(RX|TX):\s+(\d+)", current, re.M)}
    if maxima and now != {"RX": n, "TX": n}:   # an exec less when it is set already
        _ethtool(topo, ns, ["-L", dev, "rx", str(n), "tx", str(n)], quiet=True)
    return n


def _ethtool(topo: Topology, ns: str, args: list[str], quiet: bool = False) -> None:
    p = run(topo.nsenter(ns, ["ethtool", *args]), check=not quiet)
    if p.returncode != 0:
        log.debug("ethtool %s: %s", args, (p.stderr or "").strip())


def _wait_up(ns: Any, ifname: str, timeout: float = 5.0) -> None:  # ns: a pyroute2 IPRoute
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = ns.get_links(ifname=ifname)
        if links and links[0].get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN"):
            return
        time.sleep(0.02)
    raise InfraError(f"veth {ifname} did not come up within {timeout}s")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.agent.topology",
                                 description="Build a two-namespace veth topology and hold it (debugging).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="build tx<->rx with one veth pair and wait for Ctrl-C")
    demo.add_argument("--queues", type=int, default=1)
    args = ap.parse_args(argv)
    spec = TopologySpec(("tx", "rx"), (VethSpec("tx", "v0", "rx", "v1", queues=args.queues,
                                                a_addr="198.18.0.1/24", b_addr="198.18.0.2/24"),))
    # SIGTERM/SIGHUP unwind like Ctrl-C (an orphaned demo must not hold namespaces forever)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    with build(spec) as topo:
        print(json.dumps(topo.describe(), indent=2))
        print("holding; Ctrl-C to tear down", file=sys.stderr)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
