"""xskcheck and xsksend on the host kernel, between namespaces this file creates.

Needs root and AF_XDP.  The host kernel has both race fixes, so every clean
run must show zero violations, and every injected fault must show up as its
own kind (and only that kind).

Each test makes its own namespaces and veths (names carry os.getpid(), so
pytest-xdist workers never collide) and removes them on every exit path.
RACELAB_CLEAN_SECONDS shortens the two long clean runs (default 20).
"""
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import pytest

from lab import dataplane as dpbuild
from lab.agent import dataplane as dp
from lab.run import run, spawn

pytestmark = pytest.mark.root

LONG = float(os.environ.get("RACELAB_CLEAN_SECONDS", "20"))
_ids = itertools.count()


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces, XDP, AF_XDP): run as root, e.g. sudo ./bootstrap test"
    try:
        socket.socket(44, socket.SOCK_RAW, 0).close()
    except OSError:
        return "host kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS=y)"
    missing = [t for t in ("ip", "gcc", "make") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)}: apt-get install iproute2 build-essential"
    return None


@pytest.fixture(scope="module")
def bin_dir():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return dpbuild.build()


# ------------------------------------------------------------------ topology

@dataclass
class Link:
    ns: str
    dev: str
    ip: str
    mac: str = ""


def _nsexec(ns, argv):
    return ["ip", "netns", "exec", ns, *argv]


def _new_netns(stack, role):
    from pyroute2 import netns
    name = f"rl-dp-{os.getpid()}-{next(_ids)}-{role}"
    netns.create(name)
    stack.callback(netns.remove, name)
    # no IPv6: no neighbour discovery frames into the sockets
    run(_nsexec(name, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                       "net.ipv6.conf.default.disable_ipv6=1"]))
    return name


def _veth(stack, a: Link, b: Link, queues=1):
    """A veth pair, a in a.ns and b in b.ns, both up."""
    from pyroute2 import IPRoute, NetNS
    with IPRoute() as ipr:
        ipr.link("add", ifname=a.dev, kind="veth", num_tx_queues=queues, num_rx_queues=queues,
                 peer={"ifname": b.dev, "num_tx_queues": queues, "num_rx_queues": queues})
        stack.callback(_del_link, a.dev)  # only matters if a move below fails
        for end in (a, b):
            ipr.link("set", index=ipr.link_lookup(ifname=end.dev)[0], net_ns_fd=end.ns)
    for end in (a, b):
        run(_nsexec(end.ns, ["sysctl", "-qw", f"net.ipv6.conf.{end.dev}.disable_ipv6=1"]))
        with NetNS(end.ns) as ns:
            idx = ns.link_lookup(ifname=end.dev)[0]
            if end.ip:
                ns.addr("add", index=idx, address=end.ip, prefixlen=24)
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("set", index=idx, state="up")
            end.mac = ns.get_links(idx)[0].get_attr("IFLA_ADDRESS")


def _del_link(dev):
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)
        if idx:
            ipr.link("del", index=idx[0])


def _tag():
    return f"{os.getpid() % 100000}{next(_ids)}"


@contextmanager
def veth_pair(queues=1):
    """ns tx [a] -- veth -- [b] ns rx; yields (a, b).  Deleting the namespaces deletes the veths."""
    with ExitStack() as stack:
        t = _tag()
        a = Link(_new_netns(stack, "tx"), f"dpa{t}", "198.18.0.1")
        b = Link(_new_netns(stack, "rx"), f"dpb{t}", "198.18.0.2")
        _veth(stack, a, b, queues)
        yield a, b


@contextmanager
def forward_topology():
    """ns cli [c0] -- [m0] ns mid [m1] -- [s0] ns srv: the checker bridges m0 and m1."""
    with ExitStack() as stack:
        t = _tag()
        cli, mid, srv = (_new_netns(stack, r) for r in ("cli", "mid", "srv"))
        c0, m0 = Link(cli, f"dpc{t}", "198.18.1.1"), Link(mid, f"dpm{t}", "")
        m1, s0 = Link(mid, f"dpn{t}", ""), Link(srv, f"dps{t}", "198.18.1.2")
        _veth(stack, c0, m0)
        _veth(stack, m1, s0)
        # Copy-mode AF_XDP moves raw bytes: a partial checksum or a 64k GSO
        # frame from the stack would arrive broken or be dropped.
        for end in (c0, s0):
            run(_nsexec(end.ns, ["ethtool", "-K", end.dev, "tx", "off", "tso", "off", "gso", "off"]))
        yield c0, m0, m1, s0


def _wait_listening(ns, port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(_nsexec(ns, ["ss", "-Hltn", f"sport = :{port}"])).stdout.strip():
            return
        assert proc.poll() is None, "iperf3 server exited"
        time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port} in {ns}")


def _xdp_attached(link):
    out = run(_nsexec(link.ns, ["ip", "-d", "link", "show", "dev", link.dev])).stdout
    return " xdp" in out or "prog/xdp" in out


# ------------------------------------------------------------------ running the checker

@dataclass
class Outcome:
    ready: dict
    done: dict | None
    violations: list = field(default_factory=list)
    sender: dict | None = None
    returncode: int | None = None
    stderr: str = ""

    def summary(self):
        d = self.done or {}
        return (f"rx={d.get('rx')} ours={d.get('ours')} foreign={d.get('foreign')} "
                f"by_kind={ {k: v for k, v in d.get('by_kind', {}).items() if v} } "
                f"first={self.violations[:3]} rc={self.returncode} stderr={self.stderr[-800:]!r}")


@contextmanager
def checker(bin_dir, ns, **opts):
    """Start xskcheck in ns; yields (proc, events queue, stderr file) once it printed ready."""
    argv = _nsexec(ns, dp.checker_argv(bin_dir, **opts))
    with tempfile.TemporaryFile("w+") as err, spawn(argv, stderr=err.fileno()) as proc:
        events: queue.Queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                ev = dp.parse_event(line)
                if ev:
                    events.put(ev)
            events.put(None)
        threading.Thread(target=pump, daemon=True).start()
        ev = None
        try:
            ev = events.get(timeout=20)
        except queue.Empty:
            pass
        if ev is None or ev.type != "ready":
            proc.kill()
            proc.wait()
            err.seek(0)
            pytest.fail(f"xskcheck did not get ready: {ev}, rc={proc.returncode}, stderr={err.read()!r}")
        yield proc, events, err, dict(ev.data)


def _drain(events, proc, err, ready, timeout):
    out = Outcome(ready=ready, done=None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ev = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if ev is None:
            break
        if ev.type == "violation":
            out.violations.append(dict(ev.data))
        elif ev.type == "done":
            out.done = dict(ev.data)
    try:
        out.returncode = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    err.seek(0)
    out.stderr = err.read()
    return out


def _with_sender(out, sent):
    """out, with xsksend's final counters from its stdout."""
    for line in sent.stdout.splitlines():
        ev = dp.parse_event(line)
        if ev and ev.type == "done":
            out.sender = dict(ev.data)
    return out


def rxdrop_run(bin_dir, pair, *, seconds, senders=1, rate=0, sender_inject=None, size=64, **opts):
    """Checker on b, xsksend on a for `seconds`; the checker ends 1.5 s after the senders."""
    a, b = pair
    opts.setdefault("stats_ms", 1000)
    with checker(bin_dir, b.ns, dev=b.dev, duration=seconds + 1.5, **opts) as (proc, events, err, ready):
        sargv = dp.sender_argv(bin_dir, dev=a.dev, dst_mac=b.mac, src_ip=a.ip, dst_ip=b.ip,
                               senders=senders, rate=rate, duration=seconds, inject=sender_inject, size=size)
        sent = run(_nsexec(a.ns, sargv), timeout=seconds + 30)
        out = _drain(events, proc, err, ready, timeout=seconds + 15)
    return _with_sender(out, sent)


def assert_clean(out):
    assert out.returncode == 0, out.summary()
    assert out.done is not None, out.summary()
    assert out.done["violations"] == 0 and not out.violations, out.summary()
    assert out.done["rx"] > 0 and out.done["ours"] > 0, out.summary()
    assert out.sender and out.sender["sent"] > 0, out.sender


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("kind", dp.INJECT_KINDS)
def test_injected_fault_fires_its_detector(bin_dir, kind):
    with veth_pair() as pair:
        out = rxdrop_run(bin_dir, pair, seconds=1.5, rate=200000, xdp="generic", inject=kind)
    assert out.returncode == 0, out.summary()
    by_kind = out.done["by_kind"]
    assert by_kind[kind] >= 1, out.summary()
    assert {k: v for k, v in by_kind.items() if v and k != kind} == {}, out.summary()
    assert out.violations and all(v["kind"] == kind for v in out.violations)
    v = out.violations[0]
    assert {"t", "queue", "cpu", "addr", "expected", "actual", "rx", "onset", "detail"} <= set(v)
    # at most three injected faults, each one onset however many violations it gave
    assert v["onset"] is True and 1 <= out.done["onsets"] <= 3, out.summary()


@pytest.mark.parametrize("kind", dp.SENDER_INJECT_KINDS)
def test_sender_side_faults_are_caught(bin_dir, kind):
    with veth_pair() as pair:
        # a slow rate: under a loaded machine the bad packets must not all be dropped at an empty FILL ring
        out = rxdrop_run(bin_dir, pair, seconds=2.5, rate=30000, xdp="generic", sender_inject=kind,
                         size=256)
    by_kind = out.done["by_kind"]
    assert by_kind[kind] >= 1 and sum(by_kind.values()) == by_kind[kind], out.summary()


def forward_run(bin_dir, *, seconds, inject=None, xdp="generic", rate=100000):
    """xsksend in cli -> checker forwarding m0 -> m1 (RX, TX, COMP rings) -> srv drops it."""
    with (forward_topology() as (c0, m0, m1, s0),
          checker(bin_dir, m0.ns, dev=m0.dev, peer_dev=m1.dev, mode="forward", xdp=xdp, frames=1024,
                  duration=seconds + 1.5, stats_ms=1000, inject=inject) as (proc, events, err, ready)):
        sargv = dp.sender_argv(bin_dir, dev=c0.dev, dst_mac=m0.mac, src_ip=c0.ip, dst_ip=s0.ip,
                               senders=1, rate=rate, duration=seconds, size=64)
        sent = run(_nsexec(c0.ns, sargv), timeout=seconds + 30)
        out = _drain(events, proc, err, ready, timeout=seconds + 15)
    return _with_sender(out, sent)


# what forward mode commits on its TX/COMP side, and the COMP detector that must catch it
FORWARD_FAULTS = {
    "duplicate": "COMP->COMP",       # one frame sent twice: completed twice
    "state": "FILL->COMP",           # bookkeeping: a frame on TX believed back in FILL
    "poison": "COMP slot still holds the poison",   # a released COMP slot read again
}


@pytest.mark.parametrize("kind", sorted(FORWARD_FAULTS))
def test_forward_mode_comp_detectors_fire(bin_dir, kind):
    out = forward_run(bin_dir, seconds=2, inject=kind)
    assert out.returncode == 0, out.summary()
    by_kind = out.done["by_kind"]
    assert by_kind[kind] >= 1, out.summary()
    assert {k: v for k, v in by_kind.items() if v and k != kind} == {}, out.summary()
    assert any(FORWARD_FAULTS[kind] in v["detail"] for v in out.violations), out.summary()
    assert out.done["tx"] > 0 and out.done["comp"] > 0, out.summary()


def test_forward_mode_without_faults_is_clean(bin_dir):
    out = forward_run(bin_dir, seconds=3)
    assert_clean(out)
    assert out.done["tx"] > 1000 and out.done["comp"] > 1000, out.summary()


CLEAN = [
    # id, xdp, senders, seconds, checker options
    ("native-1s", "native", 1, LONG, {}),
    ("generic-2s", "generic", 2, LONG, {}),
    ("native-2s", "native", 2, 4, {}),
    ("generic-1s", "generic", 1, 4, {}),
    ("generic-shared-2q", "generic", 2, 4, {"queues": 2, "shared_umem": True, "frames": 512}),
    ("native-shared-2q", "native", 2, 4, {"queues": 2, "shared_umem": True, "frames": 512}),
    ("generic-umem-1", "generic", 2, 3, {"frames": 1}),
    ("generic-umem-16", "generic", 2, 3, {"frames": 16}),
    ("generic-umem-64", "generic", 2, 3, {"frames": 64}),
    ("generic-umem-256", "generic", 2, 3, {"frames": 256}),
    ("native-umem-1-headroom", "native", 1, 3, {"frames": 1, "frame_size": 4096, "headroom": 128}),
]


@pytest.mark.parametrize("xdp, senders, seconds, opts", [c[1:] for c in CLEAN], ids=[c[0] for c in CLEAN])
def test_clean_run_has_no_violations(bin_dir, xdp, senders, seconds, opts):
    queues = opts.get("queues", 1)
    with veth_pair(queues) as pair:
        out = rxdrop_run(bin_dir, pair, seconds=seconds, senders=senders, xdp=xdp, **opts)
        assert not _xdp_attached(pair[1]), "the checker left its XDP program attached"
    assert_clean(out)
    assert out.ready["expected_offset"] == 256 + opts.get("headroom", 0)
    assert out.ready["sockets"] == queues


@pytest.mark.parametrize("xdp", ["generic", "native"])
def test_forward_carries_tcp(bin_dir, xdp):
    if shutil.which("iperf3") is None or shutil.which("ethtool") is None:
        pytest.skip("needs iperf3 and ethtool: apt-get install iperf3 ethtool")
    with forward_topology() as (c0, m0, m1, s0):
        with checker(bin_dir, m0.ns, dev=m0.dev, peer_dev=m1.dev, mode="forward", xdp=xdp, frames=1024,
                     duration=0, stats_ms=1000) as (proc, events, err, ready):
            with spawn(_nsexec(s0.ns, ["iperf3", "-s", "-1", "-B", s0.ip])) as server:
                _wait_listening(s0.ns, 5201, server)
                res = run(_nsexec(c0.ns, ["iperf3", "-c", s0.ip, "-t", "2", "-J", "--connect-timeout", "3000"]),
                          check=False, timeout=30)
            os.killpg(proc.pid, signal.SIGTERM)   # ip netns exec has become xskcheck
            out = _drain(events, proc, err, ready, timeout=10)
        assert not _xdp_attached(m0) and not _xdp_attached(m1)
    report = json.loads(res.stdout)
    assert "error" not in report, report.get("error")
    assert report["end"]["sum_received"]["bytes"] > 1_000_000
    assert out.returncode == 0 and out.done is not None, out.summary()
    assert out.done["violations"] == 0, out.summary()
    assert out.done["tx"] > 1000 and out.done["foreign"] > 1000, out.summary()
    assert out.done["comp"] > 0, out.summary()


def test_sigkill_leaves_nothing_that_breaks_the_next_run(bin_dir):
    with veth_pair() as pair:
        a, b = pair
        # native first: a stale native program would block a generic attach
        with checker(bin_dir, b.ns, dev=b.dev, xdp="native") as (proc, events, err, ready):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        assert _xdp_attached(b)   # what a SIGKILL leaves; the next run must cope
        out = rxdrop_run(bin_dir, pair, seconds=1.5, senders=1, xdp="generic")
        assert not _xdp_attached(b)
    assert_clean(out)


def test_a_sender_that_cannot_be_pinned_fails(bin_dir):
    """An unpinned sender can reorder its own flow (a false "sequence"): xsksend refuses to run."""
    with veth_pair() as (a, b):
        argv = dp.sender_argv(bin_dir, dev=a.dev, dst_mac=b.mac, src_ip=a.ip, dst_ip=b.ip, senders=1,
                              cpus=[4095], duration=1)
        p = run(_nsexec(a.ns, argv), check=False, timeout=30)
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "cannot pin to cpu 4095" in p.stderr


def test_send_errors_are_reported_and_back_pressure_is_not(bin_dir):
    """Frames longer than the MTU fail with EMSGSIZE on every send: xsksend still runs, and its
    done line says so (errors, error); a normal run has back-pressure at most."""
    with veth_pair() as (a, b):
        sargv = dp.sender_argv(bin_dir, dev=a.dev, dst_mac=b.mac, src_ip=a.ip, dst_ip=b.ip,
                               senders=1, duration=1, size=1000)
        run(_nsexec(a.ns, ["ip", "link", "set", "dev", a.dev, "mtu", "576"]))
        bad = _with_sender(Outcome(ready={}, done=None), run(_nsexec(a.ns, sargv), timeout=30))
        run(_nsexec(a.ns, ["ip", "link", "set", "dev", a.dev, "mtu", "1500"]))
        good = _with_sender(Outcome(ready={}, done=None), run(_nsexec(a.ns, sargv), timeout=30))
    assert bad.sender["errors"] > 0 and bad.sender["sent"] == 0, bad.sender
    assert bad.sender["error"] == "Message too long", bad.sender
    assert good.sender["errors"] == 0 and good.sender["sent"] > 0 and "error" not in good.sender, good.sender


# ------------------------------------------------------------------ several sockets on one queue
#
# sockets_per_queue=2: two sockets bound to queue 0 of one veth with XDP_SHARED_UMEM share one buffer
# pool and its one FILL ring; the XDP program picks the socket by CPU (two senders pinned to CPUs 0
# and 1 feed both at once, as in the shared-pool race) or round-robin.  The invariants across the pool:
# no address outstanding twice across its sockets (duplicate), each socket's RX a subsequence of the
# pool's FILL order (order), frames held across the pool <= its frames (over-held).

POOLED_KINDS = [k for k in dp.INJECT_KINDS if k != "late"]   # late needs one socket's FILL FIFO


@pytest.mark.parametrize("kind", POOLED_KINDS)
def test_pooled_sockets_injected_fault_fires_its_detector(bin_dir, kind):
    with veth_pair() as pair:
        out = rxdrop_run(bin_dir, pair, seconds=1.5, senders=2, rate=200000, xdp="generic", inject=kind,
                         sockets_per_queue=2)
    assert out.returncode == 0, out.summary()
    assert out.ready["sockets"] == 2 and out.ready["sockets_per_queue"] == 2, out.ready
    by_kind = out.done["by_kind"]
    assert by_kind[kind] >= 1, out.summary()
    assert {k: v for k, v in by_kind.items() if v and k != kind} == {}, out.summary()
    assert out.violations and out.violations[0]["onset"] is True, out.summary()
    assert 1 <= out.done["onsets"] <= 3, out.summary()
    if kind == "order":
        assert "not a subsequence of the pool's FILL order" in out.violations[0]["detail"], out.summary()
    if kind == "over-held":
        assert "across the pool's sockets" in out.violations[0]["detail"], out.summary()


def test_pooled_duplicate_is_caught_across_sockets(bin_dir):
    """Round-robin picking puts the injected second FILL entry of a frame on the other socket:
    the duplicate is seen on one socket while the app holds the frame from the other."""
    import re
    with veth_pair() as pair:
        out = rxdrop_run(bin_dir, pair, seconds=1.5, senders=1, rate=100000, xdp="generic",
                         inject="duplicate", sockets_per_queue=2, pick="rr")
    assert out.done["by_kind"]["duplicate"] >= 2, out.summary()   # the post, then the second RX
    received = [re.search(r"on socket (\d) while the app holds it from socket (\d)", v["detail"])
                for v in out.violations if "received" in v["detail"]]
    assert received and all(received), out.summary()
    assert any(m.group(1) != m.group(2) for m in received), out.summary()


POOLED_CLEAN = [
    # id, xdp, senders, seconds, checker options
    ("generic-2cpu", "generic", 2, LONG, {"sockets_per_queue": 2}),
    ("generic-rr", "generic", 2, 4, {"sockets_per_queue": 2, "pick": "rr"}),
    ("generic-2q-shared", "generic", 2, 4, {"sockets_per_queue": 2, "queues": 2, "shared_umem": True,
                                            "frames": 512}),
    ("generic-2q-own-umem", "generic", 2, 4, {"sockets_per_queue": 2, "queues": 2, "frames": 512}),
    ("generic-umem-16", "generic", 2, 3, {"sockets_per_queue": 2, "frames": 16}),
    ("native-2cpu", "native", 2, 4, {"sockets_per_queue": 2}),
]


@pytest.mark.parametrize("xdp, senders, seconds, opts", [c[1:] for c in POOLED_CLEAN],
                         ids=[c[0] for c in POOLED_CLEAN])
def test_pooled_sockets_clean_on_the_host_kernel(bin_dir, xdp, senders, seconds, opts):
    """The host kernel carries a1356ac7749c: sockets sharing a pool are serialised, so no violation;
    and both sockets of each queue really received (the XDP program spread the load)."""
    queues = opts.get("queues", 1)
    with veth_pair(queues) as pair:
        out = rxdrop_run(bin_dir, pair, seconds=seconds, senders=senders, xdp=xdp, **opts)
        assert not _xdp_attached(pair[1]), "the checker left its XDP program attached"
    assert_clean(out)
    assert out.ready["sockets"] == queues * 2, out.ready
    if queues == 1:
        assert all(n > 0 for n in out.done["socket_rx"]), out.summary() + f" socket_rx={out.done['socket_rx']}"
