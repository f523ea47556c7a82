"""The run-time amplifier: where the probe goes, and which method a kernel gets.

The disassembly fixtures are objdump output of __xsk_rcv_zc from two real
6.1 builds: the lab's own config (tests/fixtures/amplifier/lab-6.1.192.objdump)
and Debian's linux-image-6.1.0-47-amd64 (a distro config with KASLR on and no
System.map, located through a booted guest's /proc/kallsyms: debian-6.1.170.objdump;
`python -m lab.amplifier KERNEL [--kallsyms FILE] --objdump OUT` writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import amplifier
from lab.amplifier import NoSite, Plan, find_sites, parse_objdump
from lab.run import BadInput

FIX = Path(__file__).parent / "fixtures" / "amplifier"


def _sites(name: str) -> list[amplifier.Site]:
    text = (FIX / name).read_text()
    head = json.loads(text.splitlines()[0].lstrip("# "))
    return find_sites(head["symbol"], int(head["start"], 16), parse_objdump(text))


def test_the_lab_build_has_its_probe_after_cached_prod_plus_plus():
    sites = _sites("lab-6.1.192.objdump")
    assert [s.probe for s in sites] == ["__xsk_rcv_zc+0x7a"]     # where the hand-placed probe worked
    assert sites[0].after.endswith(",0x8(%rdx)") and sites[0].insn.startswith("mov %r")


def test_a_distro_build_with_kaslr_and_other_code_around_it():
    # Debian's __xsk_rcv_zc is 208 bytes (the lab's is 192): other code, the same window
    sites = _sites("debian-6.1.170.objdump")
    assert [s.probe for s in sites] == ["__xsk_rcv_zc+0x7a"]
    assert sites[0].insn == "mov %r8,0x140(%rax)" and sites[0].after == "mov %edi,0x8(%rdx)"


SYNTH = """\
ffffffff81000000:\t8b 4a 08             \tmov    0x8(%rdx),%ecx
ffffffff81000003:\t8d 79 01             \tlea    0x1(%rcx),%edi
ffffffff81000006:\t89 7a 08             \tmov    %edi,0x8(%rdx)
ffffffff81000009:\t23 0a                \tand    (%rdx),%ecx
ffffffff8100000b:\t48 c1 e1 04          \tshl    $0x4,%rcx
ffffffff8100000f:\t48 01 c8             \tadd    %rcx,%rax
ffffffff81000012:\t4c 89 80 40 01 00 00 \tmov    %r8,0x140(%rax)
ffffffff81000019:\t89 b0 48 01 00 00    \tmov    %esi,0x148(%rax)
"""


def test_the_pattern_needs_the_load_of_cached_prod_before_the_store():
    assert [s.offset for s in find_sites("f", 0xffffffff81000000, parse_objdump(SYNTH))] == [0x12]
    # a 32-bit store to 0x8(base) with no load of it before is not an increment of cached_prod
    no_load = "\n".join(SYNTH.splitlines()[2:])
    assert find_sites("f", 0xffffffff81000000, parse_objdump(no_load)) == []


def test_an_in_memory_increment_counts_and_a_call_ends_the_search():
    text = ("ffffffff81000000:\t83 42 08 01          \taddl   $0x1,0x8(%rdx)\n"
            "ffffffff81000004:\t48 89 30             \tmov    %rsi,(%rax)\n")
    assert [s.offset for s in find_sites("g", 0xffffffff81000000, parse_objdump(text))] == [4]
    text = ("ffffffff81000000:\t83 42 08 01          \taddl   $0x1,0x8(%rdx)\n"
            "ffffffff81000004:\te8 00 00 00 00       \tcall   0xffffffff81000009\n"
            "ffffffff81000009:\t48 89 30             \tmov    %rsi,(%rax)\n")
    assert find_sites("g", 0xffffffff81000000, parse_objdump(text)) == []


def test_system_map_symbols_and_sizes(tmp_path):
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _text\nffffffff81000100 t __xsk_rcv_zc\n"
                 "ffffffff81000180 t __xsk_rcv\nffffffff81000400 T xsk_generic_rcv\n"
                 "ffffffff81000400 T xsk_generic_rcv_alias\nffffffff81000480 T zzz\n"
                 "ffffffff81000500 t dup\nffffffff81000600 t dup\n")
    syms = amplifier.read_system_map(m, ["__xsk_rcv_zc", "__xsk_rcv", "xsk_generic_rcv", "dup"])
    assert syms["__xsk_rcv_zc"] == (0xffffffff81000100, 0x80)
    assert syms["xsk_generic_rcv"] == (0xffffffff81000400, 0x80)
    assert "dup" not in syms      # ambiguous for a kprobe: left out


def test_kallsyms_are_moved_back_to_link_time_addresses():
    import struct
    # a minimal ELF64 with one PT_LOAD at the usual kernel text address
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0xffffffff81000000, 0, 0x100, 0x100, 0x1000)
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 1)
    elf = bytes(hdr) + ph
    kallsyms = ("ffffffff9a000000 T _text\nffffffff9a1fef40 t __xsk_rcv_zc\n"
                "ffffffffc0001000 t veth_poll\t[veth]\n")
    lines = amplifier.kallsyms_map(kallsyms, elf).splitlines()
    assert "ffffffff811fef40 t __xsk_rcv_zc" in lines
    assert not any("veth_poll" in ln for ln in lines)     # module symbols are not in the image
    with pytest.raises(NoSite, match="_text"):
        amplifier.kallsyms_map("0000000000000000 T _text\n", elf)


@dataclass
class FakeArtifact:
    name: str
    config: Path
    system_map: Path
    bzimage: Path
    patches: tuple[str, ...] = ()


def _art(tmp_path: Path, config: str, patches: tuple[str, ...] = (), system_map: str = "") -> FakeArtifact:
    (tmp_path / "config").write_text(config)
    (tmp_path / "System.map").write_text(system_map)
    return FakeArtifact("k", tmp_path / "config", tmp_path / "System.map", tmp_path / "bzImage", patches)


FULL = "CONFIG_KPROBES=y\nCONFIG_KPROBE_EVENTS=y\nCONFIG_BPF_EVENTS=y\nCONFIG_BPF_SYSCALL=y\n"
VETH = {"method": "auto", "widen_rx_ns": 4000, "delay_ns": 4000, "probe": ""}


def test_auto_takes_the_patch_where_the_kernel_has_it(tmp_path):
    p = amplifier.plan(VETH, _art(tmp_path, FULL, ("/k/patches/6.1/widen-rx.patch",)))
    assert (p.method, p.widen_rx_ns, p.probes) == ("patch", 4000, ())


def test_auto_takes_a_delayed_probe_elsewhere_and_defers_the_site_without_a_system_map(tmp_path):
    p = amplifier.plan(VETH, _art(tmp_path, FULL), defer=True)
    assert (p.method, p.delay_ns) == ("kprobe-delay", 4000) and amplifier.needs_guest(p)
    given = amplifier.plan({**VETH, "probe": "__xsk_rcv_zc+0x7a"}, _art(tmp_path, FULL))
    assert given.probes == ("__xsk_rcv_zc+0x7a",) and not amplifier.needs_guest(given)


def test_auto_falls_back_to_the_trap_without_bpf_events(tmp_path):
    cfg = "CONFIG_KPROBES=y\nCONFIG_KPROBE_EVENTS=y\n# CONFIG_BPF_EVENTS is not set\n"
    p = amplifier.plan({**VETH, "probe": "f+0x1"}, _art(tmp_path, cfg))
    assert p.method == "kprobe" and p.delay_ns == 0 and "BPF" in p.why


def test_a_kernel_that_cannot_be_amplified_is_bad_input_not_a_silent_unamplified_run(tmp_path):
    with pytest.raises(BadInput, match="CONFIG_KPROBE"):
        amplifier.plan(VETH, _art(tmp_path, "# CONFIG_KPROBES is not set\n"))
    with pytest.raises(BadInput, match="widen-rx"):
        amplifier.plan({**VETH, "method": "patch"}, _art(tmp_path, FULL))
    with pytest.raises(BadInput, match="BPF"):
        amplifier.plan({**VETH, "method": "kprobe-delay"}, _art(tmp_path, "CONFIG_KPROBES=y\n"
                                                                          "CONFIG_KPROBE_EVENTS=y\n"))


def test_off_and_a_scenario_without_a_window(tmp_path):
    art = _art(tmp_path, FULL)
    assert amplifier.plan({**VETH, "method": "off"}, art).method == "off"
    assert amplifier.plan({"method": "auto", "widen_rx_ns": 0, "delay_ns": 0, "probe": ""}, art).method == "off"


def test_probe_spec_validation():
    assert amplifier.check_probe_spec("")
    assert amplifier.check_probe_spec("__xsk_rcv_zc+0x7a")
    assert amplifier.check_probe_spec("__xsk_rcv_zc+122, xsk_rcv+0x10")
    for bad in ("__xsk_rcv_zc", "+0x7a", "f+0xzz", 5, "f+1;rm"):
        assert not amplifier.check_probe_spec(bad)


def test_the_plan_round_trips_through_the_agent_spec():
    from lab import scenario
    from lab.agent.agent import AgentSpec
    from lab.workload import agent_spec

    s = scenario.load("veth-napi-race")
    p = Plan("kprobe-delay", "test", delay_ns=4000, probes=("__xsk_rcv_zc+0x7a",))
    spec = agent_spec(s, duration=5, seed=1, bin_dir="/b", stop_on_first=False, amplifier=p)
    assert spec.knobs == {}                                        # no patch knob for a probe plan
    back = AgentSpec.from_json(spec.to_json())
    assert back.amplifier["probes"] == ["__xsk_rcv_zc+0x7a"] and back.amplifier["delay_ns"] == 4000
    patch = agent_spec(s, duration=5, seed=1, bin_dir="/b", stop_on_first=False,
                       amplifier=Plan("patch", "test", widen_rx_ns=2000))
    assert patch.knobs == {amplifier.PATCH_KNOB: "2000"} and patch.amplifier["method"] == "patch"


def test_a_probe_that_never_fired_while_packets_flowed_is_said(tmp_path):
    @dataclass
    class T:
        label: str
        packets: int
        amplifier: dict

    p = Plan("kprobe", "test", probes=("f+0x1",))
    quiet = amplifier.summary(p, [T("k/vm-0", 1000, {"hits": [0, 0], "hits_total": 0})])
    assert quiet["hits"] == 0 and "never fired" in quiet["warning"]
    busy = amplifier.summary(p, [T("k/vm-0", 1000, {"hits": [600, 400], "hits_total": 1000})])
    assert busy["hits"] == 1000 and busy["hits_per_vcpu"] == {"k/vm-0": [600, 400]} and "warning" not in busy


def test_a_hold_is_planned_with_its_wait_and_its_hits_kept_apart_from_the_windows():
    @dataclass
    class T:
        label: str
        packets: int
        amplifier: dict

    amp = {"method": "kprobe-delay", "delay_ns": 50000, "gate": "veth_poll", "probe": "__xsk_rcv_zc+0x7a",
           "hold": "xdp_do_flush+0", "hold_ns": 0}
    p = amplifier.plan(amp, None)
    assert p.holds == ("xdp_do_flush+0",) and p.hold_ns == 50000          # 0: the window's delay
    assert "50000 ns at xdp_do_flush+0 on every hit" in p.text()
    assert amplifier.plan({**amp, "hold_ns": 10000}, None).hold_ns == 10000
    assert amplifier.plan({**amp, "hold": ""}, None).holds == ()
    assert amplifier.plan({**amp, "method": "kprobe"}, None).holds == ()  # the trap alone: no waits
    # a hold that fired while the window's probe never did: the run was not amplified
    done = {"hits": [5, 5], "hits_total": 10, "by_probe": [
        {"probe": "__xsk_rcv_zc+0x7a", "hits_total": 0, "hold": False},
        {"probe": "xdp_do_flush+0x0", "hits_total": 10, "hold": True}]}
    s = amplifier.summary(p, [T("k/vm-0", 1000, done)])
    assert s["hits"] == 0 and s["hold_hits"] == 10 and "never fired" in s["warning"]


def test_a_hold_takes_the_name_the_kernel_has(tmp_path):
    @dataclass
    class K:
        system_map: Path
        name: str = "5.4.0"
        config: None = None
    amp = {"method": "kprobe-delay", "delay_ns": 50000, "probe": "__xsk_rcv_zc+0x7a", "hold": "xdp_do_flush+0"}
    old = "".join(f"ffffffff81{i:06x} T sym_{i}\n" for i in range(9000)) + "ffffffff82000000 T xdp_do_flush_map\n"
    sm = tmp_path / "System.map"
    sm.write_text(old)
    p = amplifier.plan(amp, K(sm))                  # before 5.6 the flush had its older name
    assert p.holds == ("xdp_do_flush_map+0",) and "xdp_do_flush is xdp_do_flush_map in this kernel" in p.why
    sm.write_text(old.replace("xdp_do_flush_map", "xdp_do_flush"))
    assert amplifier.plan(amp, K(sm)).holds == ("xdp_do_flush+0",)
    sm.write_text(old.replace("xdp_do_flush_map", "something_else"))
    with pytest.raises(BadInput, match="no text symbol xdp_do_flush"):
        amplifier.plan(amp, K(sm))
    # the guest's /proc/kallsyms (a kernel without a System.map) names it as well
    assert amplifier.resolve_holds(("xdp_do_flush+0",), "0000000000000000 T xdp_do_flush_map\n",
                                   "k")[0] == ("xdp_do_flush_map+0",)
    assert amplifier.resolve_holds(("xdp_do_flush+0",), None, "k") == (("xdp_do_flush+0",), "")


def test_on_a_host_without_kprobes_auto_is_off_out_loud_and_an_explicit_probe_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(amplifier, "KPROBE_PMU", tmp_path / "no-kprobe-pmu")
    monkeypatch.setattr(amplifier, "PATCH_KNOB", str(tmp_path / "no-knob"))
    p = amplifier.host_plan(VETH)
    assert p.method == "off" and "says little" in p.why
    with pytest.raises(BadInput, match="no kprobes"):
        amplifier.host_plan({**VETH, "method": "kprobe"})
    with pytest.raises(BadInput, match="patch, but this machine's kernel has no"):
        amplifier.host_plan({**VETH, "method": "patch"})
    (tmp_path / "no-knob").write_text("0\n")
    assert amplifier.host_plan(VETH).method == "patch"


def test_kcore_bytes_reads_the_segment_at_a_run_time_address(tmp_path):
    import struct
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 1)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x100, 0xffffffff9a000000, 0, 0x20, 0x20, 0x1000)
    core = tmp_path / "kcore"
    core.write_bytes(bytes(hdr) + ph + b"\0" * (0x100 - 120) + bytes(range(32)))
    assert amplifier.kcore_bytes(0xffffffff9a000004, 4, core) == bytes([4, 5, 6, 7])
    with pytest.raises(ValueError):
        amplifier.kcore_bytes(0xffffffff9b000000, 4, core)
