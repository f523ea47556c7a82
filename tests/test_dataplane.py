"""lab.dataplane without root: events, argv, the build cache, the binaries' argument checks."""
import dataclasses
import json
import re
import shutil
import subprocess

import pytest

from lab import dataplane as dpbuild
from lab.agent import dataplane as dp
from lab.run import BadInput, BuildFailed, project_root

BIN = "/opt/bin"


# ------------------------------------------------------------------ kinds

def test_kinds_match_the_checker_source():
    src = (project_root() / "csrc" / "xskcheck.c").read_text()
    table = re.search(r"kind_name\[NKINDS\] = \{(.*?)\};", src, re.S).group(1)
    assert tuple(re.findall(r'"([a-z-]+)"', table)) == dp.VIOLATION_KINDS


def test_every_kind_can_be_injected():
    assert set(dp.INJECT_KINDS) == set(dp.VIOLATION_KINDS)
    assert set(dp.SENDER_INJECT_KINDS) <= set(dp.INJECT_KINDS)


# ------------------------------------------------------------------ events

READY = ('{"type":"ready","t":0.0,"sockets":1,"queues":1,"xdp":"generic","mode":"rxdrop","frames":256,'
         '"frame_size":2048,"headroom":0,"expected_offset":256,"ring":256,"shared_umem":false,'
         '"checks":"all","inject":null,"dev":"v1","peer_dev":null,"pid":42}')


def violation_line(kind, t=0.25):
    return json.dumps({"type": "violation", "t": t, "kind": kind, "dev": "v1", "queue": 0, "cpu": 1,
                       "addr": 16045690984833335023, "expected": 256, "actual": 320, "detail": "x"})


def test_parse_ready():
    ev = dp.parse_event(READY + "\n")
    assert ev.type == "ready" and ev.t == 0.0 and ev.kind is None
    assert ev.get("expected_offset") == 256 and ev.get("pid") == 42


@pytest.mark.parametrize("kind", dp.VIOLATION_KINDS)
def test_parse_violation_of_each_kind(kind):
    ev = dp.parse_event(violation_line(kind))
    assert ev.type == "violation" and ev.kind == kind and ev.t == 0.25
    assert ev.queue == 0 and ev.cpu == 1 and ev.addr == 0xDEADBEEFDEADBEEF and ev.detail == "x"


def test_parse_stats_and_done():
    by_kind = {k: 0 for k in dp.VIOLATION_KINDS} | {"order": 3}
    line = json.dumps({"type": "done", "t": 20.0, "rx": 123, "violations": 3, "by_kind": by_kind,
                       "rx_dropped": 5, "reason": "duration"})
    ev = dp.parse_event(line)
    assert ev.type == "done" and ev.rx == 123 and ev.violations == 3
    assert ev.by_kind["order"] == 3 and set(ev.by_kind) == set(dp.VIOLATION_KINDS)
    assert dp.parse_event('{"type":"stats","t":1,"rx":7}').rx == 7


def test_parse_onsets():
    ev = dp.parse_event(json.dumps({"type": "violation", "t": 1, "kind": "order", "onset": False}))
    assert ev.onset is False
    assert dp.parse_event(violation_line("order")).onset is True     # a line that does not say
    done = dp.parse_event('{"type":"done","t":2,"violations":769,"onsets":1}')
    assert done.violations == 769 and done.onsets == 1


def test_parse_sender_lines():
    ev = dp.parse_event(b'{"type":"done","t":2.0,"sent":64,"per_sender":[32,32]}')
    assert ev.type == "done" and ev.get("per_sender") == [32, 32]


@pytest.mark.parametrize("line", [
    "", "   ", "garbage", "xskcheck: note: something", "{", "{}", "[1, 2]", "null", "42",
    '{"t": 1.0}', '{"type": 5, "t": 1}', '{"type": "", "t": 1}', '{"type": "stats", "t": "soon"}',
    '{"type": "stats", "t": true}', '{"type": "stats", "t": NaN}', '{"type": "violation", "t": 1}',
    '{"type": "violation", "t": 1, "kind": 3}', '{"type":"stats","t":1} trailing',
    "\x00\xff{binary", '{"type":"stats","t":1',
])
def test_garbage_is_none(line):
    assert dp.parse_event(line) is None


def test_events_are_frozen():
    ev = dp.parse_event(violation_line("order"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.kind = "poison"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.data["kind"] = "poison"  # type: ignore[index]


def test_missing_fields_are_tolerated():
    ev = dp.parse_event('{"type":"stats","t":1,"by_kind":{"order":"many"}}')
    assert ev.rx == 0 and ev.violations == 0 and ev.by_kind == {} and ev.queue is None


# ------------------------------------------------------------------ argv

def test_checker_argv_defaults():
    argv = dp.checker_argv(BIN, dev="v1")
    assert argv[0] == "/opt/bin/xskcheck"
    assert argv[1:] == ["--dev", "v1", "--mode", "rxdrop", "--xdp", "generic", "--queues", "1",
                        "--frame-size", "2048", "--headroom", "0", "--frames", "256", "--batch", "64",
                        "--duration", "0", "--stats-ms", "500", "--checks", "all"]


def test_checker_argv_everything():
    argv = dp.checker_argv(BIN, dev="m0", peer_dev="m1", mode="forward", xdp="native", queues=2,
                           frame_size=4096, headroom=64, frames=1024, shared_umem=True, ring=2048,
                           batch=32, duration=2.5, stats_ms=100, inject="meta", stop_on_first=True,
                           trace_marker=True, cpus=[0, 1], seed=7, busy_poll=True, idle_us=0, spin=10)
    s = " ".join(argv)
    for part in ["--peer-dev m1", "--mode forward", "--xdp native", "--queues 2", "--frame-size 4096",
                 "--headroom 64", "--frames 1024", "--shared-umem", "--ring 2048", "--batch 32",
                 "--duration 2.5", "--stats-ms 100", "--inject meta", "--stop-on-first",
                 "--trace-marker", "--cpus 0,1", "--seed 7", "--busy-poll", "--idle-us 0", "--spin 10"]:
        assert part in s
    assert "--cpus 0-1" in " ".join(dp.checker_argv(BIN, dev="v1", cpus="0-1"))
    assert "--busy-poll-usec 50" in " ".join(dp.checker_argv(BIN, dev="v1", busy_poll_usec=50))


def test_checker_argv_lists_every_problem():
    with pytest.raises(BadInput) as e:
        dp.checker_argv(BIN, dev="a very long interface name", mode="bridge", xdp="offload",
                        frame_size=1000, frames=0, ring=100, checks="some", inject="nope", cpus="x")
    msg = str(e.value)
    for field in ["dev:", "mode:", "xdp:", "frame_size:", "frames:", "ring:", "checks:", "inject:", "cpus:"]:
        assert field in msg


@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "forward"}, "peer_dev"),
    ({"peer_dev": "v2"}, "peer_dev"),
    ({"inject": "order", "checks": "none"}, "inject"),
    ({"headroom": 1800}, "headroom"),
    ({"queues": 4, "frames": 2}, "frames"),
])
def test_checker_argv_rejects(kwargs, needle):
    with pytest.raises(BadInput, match=needle):
        dp.checker_argv(BIN, dev="v1", **kwargs)


def test_sender_argv():
    argv = dp.sender_argv(BIN, dev="v0", dst_mac="02:00:00:00:00:02", src_ip="198.18.0.1",
                          dst_ip="198.18.0.2", senders=2, cpus=[0, 1], burst=16, gap_ns=1000,
                          size=1500, duration=3, rate=100000, flow_base=10, seed=3, inject="sequence")
    assert argv[0] == "/opt/bin/xsksend"
    s = " ".join(argv)
    for part in ["--dev v0", "--dst-mac 02:00:00:00:00:02", "--src-ip 198.18.0.1", "--dst-ip 198.18.0.2",
                 "--senders 2", "--cpus 0,1", "--burst 16", "--gap-ns 1000", "--size 1500",
                 "--duration 3", "--rate 100000", "--flow-base 10", "--seed 3", "--inject sequence"]:
        assert part in s


def test_sender_argv_lists_every_problem():
    with pytest.raises(BadInput) as e:
        dp.sender_argv(BIN, dev="v0", dst_mac="02:00", src_ip="300.1.1.1", dst_ip="x", senders=0,
                       size=9000, rate=-1, inject="order")
    msg = str(e.value)
    for field in ["dst_mac:", "src_ip:", "dst_ip:", "senders:", "size:", "rate:", "inject:"]:
        assert field in msg


# ------------------------------------------------------------------ build

def _fake_tree(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(project_root() / "csrc", src)
    monkeypatch.setattr(dpbuild, "source_dir", lambda: src)
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path / "cache"))
    return src


def test_source_hash_follows_contents(tmp_path, monkeypatch):
    src = _fake_tree(tmp_path, monkeypatch)
    h1 = dpbuild.source_hash(src)
    (src / "README.txt").write_text("not a build input")
    assert dpbuild.source_hash(src) == h1
    (src / "common.h").write_text((src / "common.h").read_text() + "\n/* changed */\n")
    assert dpbuild.source_hash(src) != h1


def test_missing_compiler_names_build_essential(tmp_path, monkeypatch):
    _fake_tree(tmp_path, monkeypatch)
    import lab.agent.run
    monkeypatch.setattr(lab.agent.run.shutil, "which", lambda tool: None)
    with pytest.raises(BadInput, match="build-essential"):
        dpbuild.build()


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                    reason="needs gcc and make: apt-get install build-essential")
def test_build_is_cached_and_reports_compiler_errors(tmp_path, monkeypatch):
    src = _fake_tree(tmp_path, monkeypatch)
    d = dpbuild.build()
    assert d.parent == tmp_path / "cache" / "bin" and d.name == dpbuild.source_hash(src)[:16]
    assert (d / "xskcheck").stat().st_mtime == dpbuild.build().joinpath("xskcheck").stat().st_mtime
    assert [p.name for p in d.parent.iterdir()] == [d.name]   # no temporary directories left

    # the binaries are static and check their arguments without root
    for binary, args in [("xskcheck", ["--dev", "v1", "--mode", "bogus", "--xdp", "generic"]),
                         ("xsksend", ["--dev", "v0"])]:
        p = subprocess.run([str(d / binary), *args], capture_output=True, text=True)
        assert p.returncode == 2 and "usage" in p.stderr
    assert "not a dynamic executable" in subprocess.run(["ldd", str(d / "xskcheck")], capture_output=True,
                                                        text=True).stdout + subprocess.run(
        ["ldd", str(d / "xskcheck")], capture_output=True, text=True).stderr

    (src / "xsksend.c").write_text("int main(void) { return syntax error; }\n")
    with pytest.raises(BuildFailed) as e:
        dpbuild.build()
    assert "xsksend.c" in str(e.value) and "error" in str(e.value)
    assert [p.name for p in d.parent.iterdir()] == [d.name]


# ------------------------------------------------------------------ the checks, without a kernel

@pytest.fixture(scope="module")
def built():
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("needs gcc and make: apt-get install build-essential")
    return dpbuild.build()


def selfbench(built, *args, descs=200000):
    p = subprocess.run([str(built / "xskcheck"), "--selfbench", str(descs), *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    events = [e for e in map(dp.parse_event, p.stdout.splitlines()) if e]
    done = [e for e in events if e.type == "done"]
    assert len(done) == 1 and any(e.type == "selfbench" for e in events), p.stdout
    return done[0], [e for e in events if e.type == "violation"]


@pytest.mark.parametrize("args", [[], ["--frames", "1"], ["--frames", "16", "--batch", "3"],
                                  ["--selfbench-size", "1500", "--frame-size", "4096", "--headroom", "100"]])
def test_a_correct_kernel_gives_no_violations(built, args):
    """xskcheck --selfbench feeds the checker from a correct in-memory kernel."""
    done, violations = selfbench(built, *args)
    assert done.violations == 0 and not violations
    assert done.rx == 200000 and done.get("ours") == 200000


@pytest.mark.parametrize("kind", dp.INJECT_KINDS)
def test_each_injected_fault_fires_only_its_detector(built, kind):
    done, violations = selfbench(built, "--inject", kind)
    assert done.by_kind[kind] >= 1
    assert {k: n for k, n in done.by_kind.items() if n and k != kind} == {}
    assert violations and {v.kind for v in violations} == {kind}
    # three faults, 2,000 descriptors apart: three onsets, however many violations each gave
    assert done.onsets == 3 and done.get("onsets_by_kind")[kind] == 3, done.data
    assert violations[0].onset


def test_a_lost_fill_descriptor_then_1000_in_order_frames_is_one_onset(built):
    """--inject order records a FILL entry the kernel never gets (the lost descriptor of a
    FILL-ring race) after 500 descriptors; 1,000 correct ones follow.  Without the FIFO's
    resynchronisation every one of them was an order violation (732 here)."""
    done, violations = selfbench(built, "--inject", "order", descs=1500)
    assert done.rx == 1500 and done.by_kind["order"] == 1, done.data
    assert done.onsets == 1 and done.get("skipped") == 1, done.data
    assert [v.onset for v in violations] == [True]
    assert "resynchronised" in violations[0].detail


def test_a_slot_published_unwritten_on_the_first_pass_is_one_poison_not_a_cascade(built):
    """The veth NAPI race publishes an RX slot before the kernel writes it.  On the ring's
    first pass that slot once held zeros: addr 0, a real frame, so the checker took frame 0
    a second time and put it in circulation twice (an offset violation, then an order
    cascade: 41 violations here, and in a guest thousands for the rest of the run, which
    hid every later onset).  The rings now start as the poison: one poison violation, the
    lost frame's one resynchronisation, one onset."""
    done, violations = selfbench(built, "--selfbench-unwritten", "100", descs=5000)
    assert done.by_kind["poison"] == 1 and done.by_kind["order"] == 1 and done.violations == 2, done.data
    assert done.onsets == 1 and done.get("onsets_by_kind")["poison"] == 1, done.data
    assert [v.kind for v in violations] == ["poison", "order"] and violations[0].onset
    assert done.rx == 5000 and done.get("ours") == 4999 and done.get("skipped") == 1, done.data


def test_a_passed_over_frame_that_arrives_is_late_and_nothing_else(built):
    done, violations = selfbench(built, "--inject", "late", descs=1500)
    assert done.by_kind["late"] == 1 and done.violations == 1, done.data
    assert done.onsets == 1


def test_missing_static_libc_is_bad_input_naming_libc6_dev(tmp_path, monkeypatch):
    _fake_tree(tmp_path, monkeypatch)
    import subprocess as sp
    real_run = dpbuild.run

    def fake_run(argv, **kw):
        if argv[:2] == ["gcc", "-print-file-name=libc.a"]:
            # what gcc prints when it has no libc.a: the bare name
            return sp.CompletedProcess(argv, 0, stdout="libc.a\n", stderr="")
        return real_run(argv, **kw)
    monkeypatch.setattr(dpbuild, "run", fake_run)
    monkeypatch.setattr(dpbuild, "require_tools", lambda *t: None)
    with pytest.raises(BadInput, match="static glibc") as e:
        dpbuild.build()
    assert "libc6-dev" in e.value.hint


# ------------------------------------------------------------------ xskamp (the run-time amplifier)

def test_amplifier_argv_defaults_and_several_probes():
    argv = dp.amplifier_argv(BIN, probes=["__xsk_rcv_zc+0x7a", "xsk_flush+16"], delay_ns=4000)
    assert argv == ["/opt/bin/xskamp", "--probe", "__xsk_rcv_zc+0x7a", "--probe", "xsk_flush+16",
                    "--delay-ns", "4000", "--loop", "auto", "--stats-ms", "1000", "--duration", "0"]
    argv = dp.amplifier_argv(BIN, probes=("f",), loop="bounded", stats_ms=250, duration=2.5)
    assert " ".join(argv).endswith("--probe f --delay-ns 0 --loop bounded --stats-ms 250 --duration 2.5")


def test_amplifier_argv_holds_wait_on_every_hit():
    argv = dp.amplifier_argv(BIN, probes=["__xsk_rcv_zc+0x7a"], delay_ns=50000, gate="veth_poll",
                             holds=["xdp_do_flush+0"])
    assert argv[argv.index("--gate"):] == ["--gate", "veth_poll", "--hold", "xdp_do_flush+0"]
    argv = dp.amplifier_argv(BIN, probes=["f+1"], delay_ns=1000, holds=("g", "h+0x10"), hold_ns=20000)
    assert argv[argv.index("--duration") + 2:] == ["--hold", "g", "--hold", "h+0x10", "--hold-ns", "20000"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"holds": ["g+"]}, "holds: bad probe 'g+'"),
    ({"holds": ["f+0x0"]}, "holds: 'f+0x0' is the same probe as 'f+0'"),
    ({"holds": ["g"], "delay_ns": 0}, "holds: need hold_ns or delay_ns > 0"),
    ({"holds": ["g"], "hold_ns": -1}, "hold_ns: an integer 0..1000000"),
    ({"holds": [f"g+{i}" for i in range(16)]}, "probes and holds: at most 16 in all, got 17"),
])
def test_amplifier_argv_rejects_bad_holds(kwargs, needle):
    with pytest.raises(BadInput, match=re.escape(needle)):
        dp.amplifier_argv(BIN, **{"probes": ["f+0"], "delay_ns": 1000, **kwargs})


@pytest.mark.parametrize("spec, parsed", [
    ("__xsk_rcv_zc+0x7a", ("__xsk_rcv_zc", 0x7A)), ("__xsk_rcv_zc+122", ("__xsk_rcv_zc", 122)),
    ("f", ("f", 0)), ("f.cold+0X1F", ("f.cold", 0x1F)), ("f+010", ("f", 10)),
])
def test_probe_specs_parse_like_xskamp(spec, parsed):
    assert dp.parse_probe(spec) == parsed
    assert dp.probe_name(*parsed) == f"{parsed[0]}+{parsed[1]:#x}"


@pytest.mark.parametrize("spec", ["", "+0x7a", "f+", "f+0x", "f+1x", "f+-4", "f+0x7a+1", "f g+1",
                                  "f/g+1", "f+0x100000", "x" * 128])
def test_bad_probe_specs_are_refused_naming_the_probe(spec):
    assert dp.parse_probe(spec) is None
    with pytest.raises(BadInput, match="bad probe") as e:
        dp.amplifier_argv(BIN, probes=[spec])
    assert repr(spec) in str(e.value) and "SYM+OFF" in str(e.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"delay_ns": -1}, "delay_ns: an integer 0..1000000"),
    ({"delay_ns": 1_000_001}, "delay_ns"),
    ({"delay_ns": 2.5}, "delay_ns"),
    ({"delay_ns": True}, "delay_ns"),
    ({"loop": "unrolled"}, "loop: one of auto, bpf_loop, bounded"),
    ({"stats_ms": 5}, "stats_ms"),
    ({"duration": -1}, "duration"),
    ({"probes": []}, "probes: 1..16"),
    ({"probes": [f"f+{i}" for i in range(17)]}, "probes: 1..16"),
    ({"probes": "__xsk_rcv_zc+0x7a"}, "a list of SYM+OFF"),
    ({"probes": ["f+0x10", "f+16"]}, "'f+16' is the same probe as 'f+0x10'"),
])
def test_amplifier_argv_rejects(kwargs, needle):
    with pytest.raises(BadInput, match=re.escape(needle)):
        dp.amplifier_argv(BIN, **{"probes": ["f+0"], **kwargs})


def test_amplifier_argv_lists_every_problem():
    with pytest.raises(BadInput) as e:
        dp.amplifier_argv(BIN, probes=["ok+1", "bad+"], delay_ns=-5, loop="x", stats_ms=0, duration=-2)
    msg = str(e.value)
    for field in ["probes: bad probe 'bad+'", "delay_ns:", "loop:", "stats_ms:", "duration:"]:
        assert field in msg
    assert "ok+1" not in msg


def test_xskamp_is_built_and_in_the_binaries():
    assert "xskamp" in dp.BINARIES
    assert "$(OUT)/xskamp" in (project_root() / "csrc" / "Makefile").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--probe", "f+1x"], "bad --probe"),
    (["--probe", "f+0x10", "--probe", "f+16"], "the same --probe twice 'f+0x10'"),
    (["--probe", "f", "--delay-ns", "-1"], "bad --delay-ns"),
    (["--probe", "f", "--loop", "unrolled"], "bad --loop"),
    (["--probe", "f", "--hold", "g+"], "bad --hold"),
    (["--probe", "f", "--hold", "g", "--hold-ns", "0"], "bad --hold-ns"),
    (["--probe", "f", "--hold", "f+0"], "the same --probe twice 'f+0x0'"),
    ([], "at least one --probe"),
])
def test_xskamp_checks_its_arguments_without_a_kernel(built, args, needle):
    p = subprocess.run([str(built / "xskamp"), *args], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and needle in p.stderr and "usage" in p.stderr
    assert p.stdout == ""


def test_xskamp_accepts_what_amplifier_argv_builds(built):
    """The Python grammar and the C one agree: a valid argv gets past argument
    parsing (on a kernel without kprobes it then stops at the PMU, naming it)."""
    import os
    argv = dp.amplifier_argv(built, probes=["__xsk_rcv_zc+0x7a", "f.cold+10"], delay_ns=4000,
                             loop="bounded", stats_ms=100, duration=0.1, gate="veth_poll",
                             holds=["xdp_do_flush+0"], hold_ns=8000)
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        pytest.skip("this kernel has a kprobe PMU: the probes would really be placed (see test_amplifier_vm)")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "usage" not in p.stderr
    assert "no kprobe PMU" in p.stderr and "CONFIG_KPROBE_EVENTS" in p.stderr
    assert p.stdout == ""


@pytest.mark.root
@pytest.mark.parametrize("loop", ["bpf_loop", "bounded"])
def test_the_delay_program_passes_this_kernels_verifier_and_waits_n_ns(built, loop):
    """Both busy-wait loops, as the host kernel's verifier sees them (run as a
    socket filter: this host has no kprobes): every run waits at least N, the
    average stays near N, and the bound never cut a loop short."""
    p = subprocess.run([str(built / "xskamp"), "--try-prog", "2000", "--delay-ns", "4000", "--loop", loop],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ready, done = [json.loads(x) for x in p.stdout.splitlines()]
    assert ready["type"] == "ready" and ready["loop"] == loop and ready["delay_ns"] == 4000
    assert done["type"] == "done" and done["retval"] == 1     # 1: the perf event still counts the hit
    assert done["runs"] == 2000 and done["capped"] == 0
    assert 4000 <= done["waited_ns_avg"] < 4000 * 3, done
    assert done["waited_under_2n"] >= 0.5 * done["runs"], done
    assert done["waited_ns_total"] >= 2000 * 4000
