"""Declarative veth/netns topologies, built with pyroute2, gone on every exit.

A TopologySpec names network namespaces and veth pairs between them.  build()
turns it into real namespaces and links and returns a Topology whose paths
the workload uses to run programs inside each namespace.

Why namespaces are anonymous: each one is held by a small keeper process
(unshare(CLONE_NEWNET | CLONE_NEWNS) with PR_SET_PDEATHSIG), not by a bind
mount under /run/netns.  When racelab exits in any way, SIGKILL included,
the keepers die, the kernel frees the namespaces, and the veths, XDP
programs and sockets in them go with them.  Nothing can be left behind, and
parallel runs (pytest-xdist) cannot collide on names.
"""

from __future__ import annotations

import ctypes
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

from lab.run import BadInput, InfraError, log, run

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


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


def _keeper_main() -> None:
    """Hold a fresh net+mount namespace until the parent dies or we are told to stop."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:      # parent already gone before prctl took effect
        os._exit(1)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        print(json.dumps({"error": f"unshare: {os.strerror(err)}"}), flush=True)
        os._exit(1)
    # private mounts, and a sysfs that shows this namespace's devices
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    if libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0:
        print(json.dumps({"error": f"mount sysfs: {os.strerror(ctypes.get_errno())}"}), flush=True)
        os._exit(1)
    # tracefs/debugfs are under /sys: mount them again so trace_marker stays reachable
    for src, dst in ((b"tracefs", b"/sys/kernel/tracing"), (b"debugfs", b"/sys/kernel/debug")):
        libc.mount(src, dst, src, 0, None)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


def _start_keeper() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "lab.topology", "keeper"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        msg = {"error": f"keeper said {line!r}"}
    if "ready" not in msg:
        proc.kill()
        proc.wait()
        if os.geteuid() != 0:
            raise BadInput("network namespaces need root", hint="run racelab as root (sudo)")
        raise InfraError(f"cannot create a network namespace: {msg.get('error')}")
    return proc


def _pythonpath() -> str:
    here = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + extra if extra else "")


@contextmanager
def build(spec: TopologySpec) -> Iterator[Topology]:
    """Create the namespaces and links; always tear them down."""
    problems = spec.validate()
    if problems:
        raise BadInput("bad topology:\n  " + "\n  ".join(problems))
    from pyroute2 import NetNS

    topo = Topology(spec)
    with ExitStack() as stack:
        for ns in spec.netns:
            proc = _start_keeper()
            stack.callback(_stop_keeper, proc)
            topo.keepers[ns] = proc.pid
        for v in spec.veths:
            _add_veth(topo, v, NetNS)
        log.debug("topology up: %s", topo.describe())
        yield topo
    log.debug("topology down")


def _stop_keeper(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _add_veth(topo: Topology, v: VethSpec, NetNS) -> None:  # noqa: ANN001, N803
    a_ns = NetNS(topo.ns_path(v.a_ns), flags=0)
    b_ns = NetNS(topo.ns_path(v.b_ns), flags=0) if v.b_ns != v.a_ns else a_ns
    try:
        # pyroute2 names the attributes after IFLA_NUM_{TX,RX}_QUEUES (it silently drops
        # iproute2's "numtxqueues" spelling, and veth then makes one queue per possible CPU)
        peer: dict[str, object] = {"ifname": v.b, "num_tx_queues": v.numtx, "num_rx_queues": v.numrx}
        if v.b_ns != v.a_ns:
            # by pid: NetNS talks through a forked helper that would not see a new fd
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
            if Path("/proc/sys/net/ipv6").exists():
                topo.write_sysfs(ns_name, f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=idx, mtu=v.mtu)
            if addr:
                ip, _, plen = addr.partition("/")
                ns.addr("add", index=idx, address=ip, prefixlen=int(plen or 24))
        for ns, ifname in ((a_ns, v.a), (b_ns, v.b)):
            ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
        for ns, ifname in ((a_ns, v.a), (b_ns, v.b)):
            _wait_up(ns, ifname)
    finally:
        a_ns.close()
        if b_ns is not a_ns:
            b_ns.close()
    # Senders build whole frames themselves: no segmentation offloads on the sending side.
    # (tx checksum offload too: a partial checksum forwarded through AF_XDP arrives broken)
    _ethtool(topo, v.a_ns, ["-K", v.a, "tx", "off", "tso", "off", "gso", "off"], quiet=True)
    _ethtool(topo, v.b_ns, ["-K", v.b, "gro", "on" if v.gro_b else "off"], quiet=not v.gro_b)
    # veth starts with one active queue whatever numrxqueues says: ask for what
    # the spec wants (at most the queues the device was created with).
    want = v.channels_b or min(v.numtx, v.numrx)
    for ns, dev in ((v.b_ns, v.b), (v.a_ns, v.a)):
        topo.channels[f"{ns}/{dev}"] = _set_channels(topo, ns, dev, want)
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
    maxima = re.findall(r"^(RX|TX):\s+(\d+)", p.stdout.split("Current")[0], re.M)
    cap = min((int(n) for _, n in maxima), default=1)
    n = max(1, min(want, cap))
    if n != want:
        log.info("%s: %d queue(s) asked, %d usable (the kernel refused more channels)", dev, want, n)
    if maxima:
        _ethtool(topo, ns, ["-L", dev, "rx", str(n), "tx", str(n)], quiet=True)
    return n


def _ethtool(topo: Topology, ns: str, args: list[str], quiet: bool = False) -> None:
    p = run(topo.nsenter(ns, ["ethtool", *args]), check=not quiet)
    if p.returncode != 0:
        log.debug("ethtool %s: %s", args, (p.stderr or "").strip())


def _wait_up(ns, ifname: str, timeout: float = 5.0) -> None:  # noqa: ANN001
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

    ap = argparse.ArgumentParser(prog="python -m lab.topology",
                                 description="Build a two-namespace veth topology and hold it (debugging).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keeper", help="internal: hold a namespace for build()")
    demo = sub.add_parser("demo", help="build tx<->rx with one veth pair and wait for Ctrl-C")
    demo.add_argument("--queues", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "keeper":
        _keeper_main()
        return 0
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
