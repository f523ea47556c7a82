"""The race-window amplifier: which one a run uses, and where a run-time probe goes.

The veth NAPI race (fa349e396e48) corrupts user space only when a flush on
one CPU lands between `cached_prod++` and the two descriptor stores of
xskq_prod_reserve_desc() on another: three instructions, almost never hit
(docs/races.md).  Widening that window is what makes the race show in
seconds.  Methods:

  patch         widen-rx.patch's knob (/sys/module/xsk/parameters/widen_rx_ns):
                a busy-wait compiled into the kernel; only NAME+widen-rx kernels
  kprobe        an unoptimised kprobe (int3 trap) on the first descriptor
                store after cached_prod++: some delay, no kernel change
  kprobe-delay  the same kprobe with a BPF handler that busy-waits delay_ns
                (csrc/xskamp.c): the patch's delay on any kernel
  off           nothing
  auto          patch where the kernel has the knob, else kprobe-delay where
                its config allows BPF on kprobes, else kprobe

The probe site is found per kernel build from that build's own code: the
bzImage's payload (the kernel ELF) and System.map give the function's bytes,
objdump disassembles them, and find_sites() looks for the store sequence.
A probe is symbol+offset, so KASLR does not move it.

    python -m lab.amplifier KERNEL      # the sites found in a kernel, and the plan
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.cache import atomic_write
from lab.run import BadInput, cache_dir, log, require_tools, run

if TYPE_CHECKING:
    from lab.kernels.kernel import KernelArtifact

METHODS = ("auto", "off", "patch", "kprobe", "kprobe-delay")
PATCH_KNOB = "/sys/module/xsk/parameters/widen_rx_ns"
# Functions that may hold the RX descriptor reservation: __xsk_rcv_zc() in
# 5.x-6.x, or whichever caller the compiler inlined it into.
CANDIDATES = ("__xsk_rcv_zc", "__xsk_rcv", "xsk_rcv_zc", "xsk_rcv", "xsk_generic_rcv")
# offsetof(struct xsk_queue, cached_prod) (net/xdp/xsk_queue.h: ring_mask,
# nentries, cached_prod): stable from v5.4 to v6.12 at least.
CACHED_PROD = 0x8
LOOKAHEAD = 12          # instructions after the cached_prod store to find the descriptor store
LOOKBEHIND = 24         # ... and before it, the load of cached_prod (the full-ring check branches between)
FINDER_VERSION = 1      # bump when find_sites() changes what it finds (cache key)


class NoSite(BadInput):
    """The window's instruction pattern is not in this kernel's code."""


@dataclass(frozen=True)
class Insn:
    addr: int
    text: str           # AT&T, objdump's spacing collapsed: "mov %edi,0x8(%rdx)"


@dataclass(frozen=True)
class Site:
    """One probe point: the first descriptor store after a cached_prod++."""

    symbol: str
    offset: int
    insn: str           # the instruction the probe sits on (the descriptor store)
    after: str          # the cached_prod store just before it

    @property
    def probe(self) -> str:
        return f"{self.symbol}+{self.offset:#x}"


@dataclass(frozen=True)
class Plan:
    """What amplifies one kernel's run; the agent carries it out (lab.agent)."""

    method: str                          # off | patch | kprobe | kprobe-delay
    why: str                             # how it was chosen, said in the results
    widen_rx_ns: int = 0                 # patch
    delay_ns: int = 0                    # kprobe-delay
    probes: tuple[str, ...] = ()         # kprobe, kprobe-delay: SYM+OFF
    gate: str = ""                       # kprobe-delay: wait only while another CPU is in this function
    sites: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    holds: tuple[str, ...] = ()          # kprobe-delay: SYM+OFF where the flushing side waits, every hit
    hold_ns: int = 0                     # ... that long

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["probes"], d["sites"], d["holds"] = list(self.probes), list(self.sites), list(self.holds)
        return d

    def text(self) -> str:
        if self.method == "off":
            return f"off ({self.why})"
        if self.method == "patch":
            return f"patch: widen_rx_ns={self.widen_rx_ns} ({self.why})"
        what = (f"{self.delay_ns} ns BPF busy-wait" + (f" while another CPU is in {self.gate}()" if self.gate
                                                       else "")
                if self.method == "kprobe-delay" else "int3 trap only")
        where = ", ".join(self.probes) or "the window (its site is found once the guest is up)"
        hold = f"; {self.hold_ns} ns at {', '.join(self.holds)} on every hit" if self.holds else ""
        return f"{self.method} at {where}: {what}{hold} ({self.why})"


# ---------------------------------------------------------------- finding the site

_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(\S.*)$")
_REG32 = r"(?:e[a-ds]x|e[sd]i|e[bs]p|r\d+d)"
_REG64 = r"(?:r[a-ds]x|r[sd]i|r[bs]p|r\d+)"


def parse_objdump(text: str) -> list[Insn]:
    """Instructions from `objdump -d` output (continuation lines of long encodings skipped)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not m.group(2).startswith("(bad)"):
            insn = re.sub(r"\s+", " ", m.group(2).split("#", 1)[0].split("<", 1)[0]).strip()
            out.append(Insn(int(m.group(1), 16), insn))
    return out


def find_sites(symbol: str, start: int, insns: Sequence[Insn]) -> list[Site]:
    """Every `cached_prod++` followed by a 64-bit descriptor store, in one function.

    The increment is either a load of CACHED_PROD(base), arithmetic, and a
    32-bit store back to CACHED_PROD(base), or one `addl $0x1,CACHED_PROD(base)`.
    The probe goes on the first 64-bit store after it: the `addr` of the
    reserved descriptor, the store user space must not overtake."""
    d = f"{CACHED_PROD:#x}"
    store = re.compile(rf"^mov %({_REG32}),{d}\(%({_REG64})\)$")
    inc = re.compile(rf"^(?:addl \$0x1,|incl ){d}\(%({_REG64})\)$")
    desc = re.compile(rf"^mov %{_REG64},(?:-?0x[0-9a-f]+)?\(%{_REG64}(?:,%{_REG64},\d)?\)$")
    sites = []
    for i, ins in enumerate(insns):
        m = store.match(ins.text)
        base = None
        if m:
            loads = re.compile(rf"^mov {d}\(%{m.group(2)}\),%{_REG32}$")
            if any(loads.match(p.text) for p in insns[max(0, i - LOOKBEHIND):i]):
                base = m.group(2)
        else:
            m = inc.match(ins.text)
            base = m.group(1) if m else None
        if base is None:
            continue
        for nxt in insns[i + 1:i + 1 + LOOKAHEAD]:
            if desc.match(nxt.text):
                sites.append(Site(symbol, nxt.addr - start, nxt.text, ins.text))
                break
            if nxt.text.startswith(("call", "ret", "jmp")):
                break    # left the inlined reservation without a descriptor store
    return sites


def read_system_map(path: Path, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """map_symbols() of a System.map file."""
    return map_symbols(path.read_text(errors="replace"), names)


def map_symbols(text: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """name -> (address, size to the next higher symbol) for the text symbols asked for,
    from System.map-shaped lines (kallsyms' module symbols, with a 4th field, are skipped).
    A name that appears twice (two static functions of one name) is left out: a
    kprobe on it would be ambiguous."""
    want = set(names)
    addrs: list[int] = []
    found: dict[str, list[int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in "tTwW":
            continue
        try:
            a = int(parts[0], 16)
        except ValueError:
            continue
        addrs.append(a)
        if parts[2] in want:
            found.setdefault(parts[2], []).append(a)
    addrs = sorted(set(addrs))
    out = {}
    import bisect
    for name, where in found.items():
        if len(where) != 1:
            continue
        a = where[0]
        j = bisect.bisect_right(addrs, a)
        out[name] = (a, (addrs[j] - a) if j < len(addrs) else 4096)
    return out


def elf_bytes(elf: bytes, addr: int, size: int) -> bytes:
    """The bytes at a virtual address of a 64-bit ELF (from its PT_LOAD segments)."""
    if elf[:5] != b"\x7fELF\x02":
        raise ValueError("not a 64-bit ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= addr and addr + size <= p_vaddr + p_filesz:
            o = p_offset + (addr - p_vaddr)
            return elf[o:o + size]
    raise ValueError(f"address {addr:#x} is in no loaded segment")


def objdump(code: bytes, addr: int) -> str:
    """objdump's disassembly of raw x86-64 code that sits at addr."""
    require_tools("objdump")
    with tempfile.NamedTemporaryFile(prefix="racelab-code-", suffix=".bin") as f:
        f.write(code)
        f.flush()
        return run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={addr:#x}",
                    f.name]).stdout


def disassemble(code: bytes, addr: int) -> list[Insn]:
    return parse_objdump(objdump(code, addr))


def usable_map(system_map: Path | None) -> bool:
    """A real System.map (Debian's linux-image packages ship a one-line stand-in)."""
    try:
        return system_map is not None and Path(system_map).stat().st_size > 100_000
    except OSError:
        return False


def text_base(elf: bytes) -> int:
    """The link-time address of _text: the lowest kernel-half PT_LOAD (the percpu
    segment, linked at 0, is not text)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    bases: list[int] = []
    for i in range(phnum):
        p_type, _, _, p_vaddr = struct.unpack_from("<IIQQ", elf, phoff + i * phentsize)
        if p_type == 1 and p_vaddr >= 0xFFFFFFFF80000000:
            bases.append(p_vaddr)
    if not bases:
        raise ValueError("no kernel text segment")
    return min(bases)


def kallsyms_map(kallsyms: str, elf: bytes) -> str:
    """A running kernel's /proc/kallsyms as System.map lines at link-time addresses:
    KASLR moves the whole image by one offset, which _text gives."""
    lines = [ln.split() for ln in kallsyms.splitlines()]
    core = [p for p in lines if len(p) == 3]            # module symbols carry a 4th "[mod]" field
    runtime_text = next((int(p[0], 16) for p in core if p[2] == "_text"), None)
    if runtime_text is None or runtime_text == 0:
        raise NoSite("the guest's /proc/kallsyms has no _text address (kptr_restrict?)",
                     hint="the agent reads it as root; check kernel.kptr_restrict, or give "
                          "--set amplifier.probe=SYMBOL+OFFSET")
    shift = runtime_text - text_base(elf)
    return "\n".join(f"{int(p[0], 16) - shift:016x} {p[1]} {p[2]}" for p in core)


def kernel_sites(bzimage: Path, system_map: Path | None, kallsyms: str | None = None
                 ) -> tuple[list[Site], str]:
    """The probe sites of one kernel build, and what was looked at (for messages).

    Symbols come from the build's System.map or, where it has none (Debian's
    packages, a bare bzImage), from the booted guest's /proc/kallsyms."""
    from lab.kernels.bzimage import payload

    elf = payload(bzimage.read_bytes())
    if elf is None:
        raise NoSite(f"{bzimage}: its payload cannot be decompressed here (gzip, xz, lzma, bzip2 can)",
                     hint="build it with CONFIG_KERNEL_GZIP or _XZ, or --set amplifier.method=off")
    if usable_map(system_map):
        assert system_map is not None
        syms = read_system_map(system_map, CANDIDATES)
        where = "System.map"
    elif kallsyms is not None:
        syms = map_symbols(kallsyms_map(kallsyms, elf), CANDIDATES)
        where = "the guest's /proc/kallsyms"
    else:
        raise NoSite(f"{bzimage}: no System.map beside the kernel, so the window's code cannot be found",
                     hint="put the build's System.map next to the bzImage (a build tree has it at the "
                          "top), or --set amplifier.method=off to run unamplified")
    if not syms:
        raise NoSite(f"{bzimage}: none of {', '.join(CANDIDATES)} in {where} "
                     "(no AF_XDP in this kernel, or a renamed receive path)",
                     hint="check CONFIG_XDP_SOCKETS=y, or --set amplifier.method=off")
    sites: list[Site] = []
    for name in CANDIDATES:
        if name in syms:
            a, size = syms[name]
            sites += find_sites(name, a, disassemble(elf_bytes(elf, a, min(size, 16384)), a))
    looked = ", ".join(f"{n} ({syms[n][1]} bytes)" for n in CANDIDATES if n in syms)
    return sites, looked


def sites_for(artifact: KernelArtifact, kallsyms: str | None = None) -> list[Site]:
    """kernel_sites() of a kernel artifact, cached by the bzImage's bytes (the offsets
    are a property of the code, whichever symbol table located it)."""
    bz, sm = Path(artifact.bzimage), Path(artifact.system_map)
    h = hashlib.sha256(f"finder {FINDER_VERSION}\n".encode())
    h.update(bz.read_bytes())
    entry = cache_dir() / "amplifier" / f"{h.hexdigest()[:24]}.json"
    if entry.is_file():
        try:
            return [Site(**d) for d in json.loads(entry.read_text())]
        except (ValueError, TypeError):
            pass
    sites, looked = kernel_sites(bz, sm, kallsyms)
    if not sites:
        raise NoSite(f"kernel {getattr(artifact, 'name', bz)}: no `cached_prod++` followed by a descriptor "
                     f"store in {looked} (looked for a 32-bit store to {CACHED_PROD:#x}(base) after a load "
                     f"from it, then a 64-bit store, within {LOOKAHEAD} instructions)",
                     hint="give the probe yourself: --set amplifier.probe=SYMBOL+OFFSET (see "
                          "`python -m lab.amplifier KERNEL`), or --set amplifier.method=off")
    atomic_write(entry, json.dumps([asdict(s) for s in sites]))
    return sites


# ---------------------------------------------------------------- choosing the method

def config_has(config: Path | None, *options: str) -> dict[str, bool | None]:
    """CONFIG_X=y for each option, or None for all when the config is unknown."""
    try:
        text = Path(config).read_text() if config else ""
    except OSError:
        text = ""
    if not text.strip():
        return {o: None for o in options}
    return {o: re.search(rf"^{o}=y$", text, re.M) is not None for o in options}


def _delay_and_gate(chosen: str, amp: Mapping[str, Any]) -> dict[str, Any]:
    """A probe plan's waits: only kprobe-delay has them (delay_ns, else widen_rx_ns, else 4 us;
    the holds' hold_ns, else that delay)."""
    if chosen != "kprobe-delay":
        return {"delay_ns": 0, "gate": ""}
    delay = int(amp.get("delay_ns", 0)) or int(amp.get("widen_rx_ns", 0)) or 4000
    holds = tuple(h.strip() for h in str(amp.get("hold", "") or "").split(",") if h.strip())
    return {"delay_ns": delay, "gate": str(amp.get("gate", "")), "holds": holds,
            "hold_ns": (int(amp.get("hold_ns", 0)) or delay) if holds else 0}


# A hold's symbol under its older names: xdp_do_flush() was xdp_do_flush_map() before Linux 5.6
HOLD_ALIASES: dict[str, tuple[str, ...]] = {"xdp_do_flush": ("xdp_do_flush_map",)}


def resolve_holds(holds: Sequence[str], symbols: str | None, kernel: str) -> tuple[tuple[str, ...], str]:
    """The holds as this kernel names them: SYM+OFF whose SYM is not in its symbol table
    (System.map or /proc/kallsyms text; None: unknown, taken as given) becomes the older
    name of HOLD_ALIASES that is.  Raises BadInput, before anything boots, for a hold
    symbol the kernel has under no name.  Returns the holds and what was renamed."""
    if symbols is None or not holds:
        return tuple(holds), ""
    names = {parts[2] for line in symbols.splitlines()
             if len(parts := line.split()) >= 3 and parts[1] in "tTwW"}
    out, renamed = [], []
    for h in holds:
        sym, plus, off = h.partition("+")
        if sym in names:
            out.append(h)
            continue
        alias = next((a for a in HOLD_ALIASES.get(sym, ()) if a in names), None)
        if alias is None:
            raise BadInput(f"kernel {kernel}: amplifier.hold {h!r}: no text symbol {sym} in this kernel",
                           hint="name the flushing function as this kernel does (--set amplifier.hold="
                                "SYM+OFF), or --set amplifier.hold= for no hold")
        out.append(alias + plus + off)
        renamed.append(f"{sym} is {alias} in this kernel")
    return tuple(out), "; ".join(renamed)


def _symbols_text(artifact: KernelArtifact, kallsyms: str | None) -> str | None:
    if kallsyms is not None:
        return kallsyms
    sm = getattr(artifact, "system_map", None)
    if sm is not None and usable_map(sm):
        try:
            return Path(sm).read_text(errors="replace")
        except OSError:
            return None
    return None


def needs_guest(p: Plan) -> bool:
    """A probe plan whose site is found only once the guest is up (no System.map)."""
    return p.method in ("kprobe", "kprobe-delay") and not p.probes


def plan(amp: Mapping[str, Any], artifact: KernelArtifact, kallsyms: str | None = None,
         defer: bool = False) -> Plan:
    """The amplifier for one kernel from the scenario's [amplifier] section.

    Raises BadInput (before anything boots) when the method asked for cannot
    run on this kernel, or when auto finds no way and the scenario wants one.
    defer: a kernel without a System.map gets a plan with no probes yet
    (needs_guest()); call again with the guest's /proc/kallsyms."""
    method = str(amp.get("method", "auto"))
    widen, delay = int(amp.get("widen_rx_ns", 0)), int(amp.get("delay_ns", 0))
    name = getattr(artifact, "name", "") or getattr(artifact, "version", "kernel")
    has_patch = any(Path(p).name.startswith("widen-rx") for p in getattr(artifact, "patches", ()) or ())
    if method == "off" or (method == "auto" and not widen and not delay):
        return Plan("off", "asked for" if method == "off" else "the scenario widens no window")
    if method == "patch" or (method == "auto" and has_patch and widen):
        if not has_patch:
            raise BadInput(f"amplifier.method = patch, but kernel {name} carries no widen-rx.patch",
                           hint=f"use {name}+widen-rx, or --set amplifier.method=auto (run-time probe)")
        return Plan("patch", "kernel built with widen-rx.patch" if method == "auto" else "asked for",
                    widen_rx_ns=widen or 4000)
    cfg = config_has(getattr(artifact, "config", None), "CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS",
                     "CONFIG_BPF_EVENTS", "CONFIG_BPF_SYSCALL")
    if cfg["CONFIG_KPROBE_EVENTS"] is False or cfg["CONFIG_KPROBES"] is False:
        raise BadInput(f"kernel {name}: CONFIG_KPROBES/CONFIG_KPROBE_EVENTS not set, so the race window "
                       "cannot be widened at run time (unamplified, the veth race almost never shows)",
                       hint="enable CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y, use a NAME+widen-rx "
                            "kernel, or --set amplifier.method=off to run unamplified anyway")
    bpf_ok = cfg["CONFIG_BPF_EVENTS"] is not False and cfg["CONFIG_BPF_SYSCALL"] is not False
    if method == "kprobe-delay" and not bpf_ok:
        raise BadInput(f"kernel {name}: CONFIG_BPF_EVENTS/CONFIG_BPF_SYSCALL not set: no BPF handler "
                       "on a kprobe", hint="--set amplifier.method=kprobe (the trap alone)")
    chosen = method if method != "auto" else ("kprobe-delay" if bpf_ok else "kprobe")
    why = "asked for" if method != "auto" else (
        "no widen-rx.patch in this kernel" + ("" if bpf_ok else "; no CONFIG_BPF_EVENTS, trap only"))
    if amp.get("probe"):
        probes: tuple[str, ...] = tuple(p.strip() for p in str(amp["probe"]).split(",") if p.strip())
        sites: tuple[dict[str, Any], ...] = ()
        why += "; probe given"
    elif defer and kallsyms is None and not usable_map(getattr(artifact, "system_map", None)):
        return Plan(chosen, why + "; probe site from the guest's /proc/kallsyms (no System.map)",
                    **_delay_and_gate(chosen, amp))
    else:
        found = sites_for(artifact, kallsyms)
        probes = tuple(dict.fromkeys(s.probe for s in found))
        sites = tuple(asdict(s) for s in found)
    waits = _delay_and_gate(chosen, amp)
    if waits.get("holds"):
        waits["holds"], renamed = resolve_holds(waits["holds"], _symbols_text(artifact, kallsyms), name)
        why += f"; {renamed}" if renamed else ""
    return Plan(chosen, why, probes=probes, sites=sites, **waits)


def summary(plan: Plan, targets: Sequence[Any]) -> dict[str, Any]:
    """A row's amplifier: the plan, and how often it fired (per target, per vCPU);
    targets: lab.workload.TargetResult."""
    d = {k: v for k, v in plan.to_dict().items() if k != "sites"}
    if plan.method in ("kprobe", "kprobe-delay"):
        per = {t.label: list(t.amplifier.get("hits") or []) for t in targets if t.amplifier}
        d["hits"] = sum(int(t.amplifier.get("hits_total", 0) or 0) for t in targets)
        d["hits_per_vcpu"] = per
        if plan.holds:
            # the window's probes alone decide whether the run was amplified
            held = sum(int(b.get("hits_total", 0) or 0) for t in targets
                       for b in t.amplifier.get("by_probe") or [] if b.get("hold"))
            d["hold_hits"], d["hits"] = held, d["hits"] - held
        waited = [float(t.amplifier["waited_ns_avg"]) for t in targets if t.amplifier.get("waited_ns_avg")]
        if waited:
            d["waited_ns_avg"] = round(sum(waited) / len(waited), 1)
        if d["hits"] == 0 and any(t.packets for t in targets):
            d["warning"] = ("the probe never fired while packets flowed: it is not on this kernel's "
                            "receive path, so the run was effectively unamplified")
    return d


KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def kcore_bytes(addr: int, size: int, kcore: Path = Path("/proc/kcore")) -> bytes:
    """Bytes of the running kernel at a run-time address, from /proc/kcore's segments."""
    with open(kcore, "rb") as f:
        hdr = f.read(64)
        if hdr[:5] != b"\x7fELF\x02":
            raise ValueError(f"{kcore} is not a 64-bit ELF core")
        phoff, = struct.unpack_from("<Q", hdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type == 1 and p_vaddr <= addr and addr + size <= p_vaddr + p_filesz:
                f.seek(p_offset + addr - p_vaddr)
                return f.read(size)
    raise ValueError(f"address {addr:#x} is in no segment of {kcore}")


def host_plan(amp: Mapping[str, Any]) -> Plan:
    """The amplifier on this machine's own kernel (the netns backend): the patch knob
    if it is there, else a probe found in the running kernel (/proc/kallsyms and
    /proc/kcore), else off, said out loud: an unamplified veth run here is weak evidence."""
    method = str(amp.get("method", "auto"))
    widen, delay = int(amp.get("widen_rx_ns", 0)), int(amp.get("delay_ns", 0))
    if method == "off" or (method == "auto" and not widen and not delay):
        return Plan("off", "asked for" if method == "off" else "the scenario widens no window")
    if method in ("auto", "patch") and Path(PATCH_KNOB).exists() and widen:
        return Plan("patch", "this machine's kernel has widen-rx.patch", widen_rx_ns=widen)
    if method == "patch":
        raise BadInput(f"amplifier.method = patch, but this machine's kernel has no {PATCH_KNOB}",
                       hint="--set amplifier.method=auto, or run --backend vm on a NAME+widen-rx kernel")
    if not KPROBE_PMU.exists():
        if method != "auto":
            raise BadInput(f"amplifier.method = {method}, but this machine's kernel has no kprobes "
                           "(no kprobe PMU: CONFIG_KPROBE_EVENTS)",
                           hint="--backend vm on a catalog kernel, or --set amplifier.method=off")
        return Plan("off", "this machine's kernel has neither widen-rx.patch nor kprobes, so the window "
                           "runs unwidened: a clean result says little about the veth race")
    chosen = "kprobe-delay" if method in ("auto", "kprobe-delay") else "kprobe"
    if amp.get("probe"):
        probes = tuple(p.strip() for p in str(amp["probe"]).split(",") if p.strip())
    else:
        core = map_symbols(Path("/proc/kallsyms").read_text(), CANDIDATES)
        found: list[Site] = []
        for name, (a, size) in core.items():
            if a:
                found += find_sites(name, a, disassemble(kcore_bytes(a, min(size, 16384)), a))
        if not found:
            raise NoSite("this machine's kernel: no cached_prod++ / descriptor store sequence in "
                         + ", ".join(n for n in CANDIDATES if n in core),
                         hint="--set amplifier.probe=SYMBOL+OFFSET, or --set amplifier.method=off")
        probes = tuple(dict.fromkeys(s.probe for s in found))
    waits, why = _delay_and_gate(chosen, amp), "this machine's kernel"
    if waits.get("holds"):
        try:
            syms: str | None = Path("/proc/kallsyms").read_text()
        except OSError:
            syms = None
        waits["holds"], renamed = resolve_holds(waits["holds"], syms, "of this machine")
        why += f"; {renamed}" if renamed else ""
    return Plan(chosen, why, probes=probes, **waits)


PROBE_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\+(0x[0-9a-fA-F]+|\d+)$")
SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,126}")


def check_probe_spec(value: object) -> bool:
    """[amplifier] probe: "" (find it) or SYM+OFF[,SYM+OFF...]."""
    if not isinstance(value, str):
        return False
    return value == "" or all(PROBE_SPEC.match(p.strip()) for p in value.split(","))


def _dump(bzimage: Path, system_map: Path, kallsyms: str | None) -> str:
    """objdump text of the first candidate found, headed by a JSON line {symbol, start}."""
    from lab.kernels.bzimage import payload

    elf = payload(bzimage.read_bytes())
    assert elf is not None
    syms = (read_system_map(system_map, CANDIDATES) if usable_map(system_map)
            else map_symbols(kallsyms_map(kallsyms or "", elf), CANDIDATES))
    name = next(n for n in CANDIDATES if n in syms)
    a, size = syms[name]
    text = objdump(elf_bytes(elf, a, min(size, 16384)), a)
    body = "\n".join(ln for ln in text.splitlines() if _LINE.match(ln))
    return f"# {json.dumps({'symbol': name, 'start': f'{a:#x}', 'size': size})}\n{body}\n"


def cli_sites(kernel_spec: str, kallsyms: Path | None = None, objdump: Path | None = None) -> int:
    """`racelab dev amplifier KERNEL`: where the amplifier's probe would go in that kernel
    (built if needed); exit 1 if nowhere."""
    from lab.kernels import kernel

    try:
        syms_text = kallsyms.read_text() if kallsyms else None
    except OSError as e:
        raise BadInput(f"--kallsyms {kallsyms}: {e.strerror}",
                       hint="save a booted guest's: racelab vm run K -- cat /proc/kallsyms > FILE") from None
    art = kernel.ensure(kernel.resolve(kernel_spec))
    sites, looked = kernel_sites(Path(art.bzimage), Path(art.system_map), syms_text)
    if objdump:
        objdump.write_text(_dump(Path(art.bzimage), Path(art.system_map), syms_text))
    print(f"looked in: {looked}")
    for s in sites:
        print(f"{s.probe:24} {s.insn:32} after {s.after}")
    if not sites:
        print("no site found")
        return 1
    log.debug("sites: %s", sites)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.amplifier ...` is `racelab dev amplifier ...`, declared once in lab.cli."""
    from lab import cli
    return cli.module_main("lab.amplifier", argv)


if __name__ == "__main__":
    sys.exit(main())
