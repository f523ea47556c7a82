"""Scenarios: the TOML files under scenarios/, validated completely before use.

A scenario is data: the bug it hunts (commits, versions), the topology, the
XDP mode, the checker set-up and the load.  load() applies --set overrides
and reports every bad field at once.  to_topology() and agent_spec() turn a
scenario into what the agent builds and runs inside the kernel under test.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.amplifier import METHODS as AMPLIFIER_METHODS
from lab.amplifier import check_probe_spec
from lab.amplifier import SYMBOL as PROBE_SYMBOL
from lab.config import parse_duration
from lab.run import BadInput, project_root
from lab.agent.topology import TopologySpec, VethSpec

MITIGATIONS = ("single-queue", "threaded-napi", "gro-on", "busy-poll")


class Stalls(enum.StrEnum):
    """[vm] stalls: what an RCU stall or soft lockup in a guest counts as (lab.splat.stall_policy)."""

    AUTO = "auto"             # a violation where it says something about the kernel (KVM, no overcommit)
    NOTE = "note"             # noted, never a violation
    VIOLATION = "violation"   # a kernel-splat violation


def _dur(v: Any) -> bool:
    try:
        parse_duration(v)
    except BadInput:
        return False
    return True


REQUIRED: Any = object()   # a field the scenario must give: no default


@dataclass(frozen=True)
class Field:
    """One scenario field: how to check it, its default, and its JSON Schema."""
    check: Callable[[Any], Any]
    good: str                           # what a good value looks like, for messages
    default: Any = REQUIRED
    doc: str = ""                       # one line: `scenario new` comments and the JSON Schema
    json: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int, hi: int | None = None, default: Any = REQUIRED, doc: str = "",
            good: str = "") -> Field:
    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    js: dict[str, Any] = {"type": "integer", "minimum": lo}
    if hi is not None:
        js["maximum"] = hi
    return Field(lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi),
                 good or f"an integer {rng}", default, doc, js)


def choice(*values: Any, default: Any = REQUIRED, doc: str = "", good: str = "") -> Field:
    words = [str(v) for v in values]
    text = good or (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0])
    return Field(lambda v: not isinstance(v, bool) and v in values, text, default, doc, {"enum": list(values)})


def boolean(default: Any = REQUIRED, doc: str = "") -> Field:
    return Field(lambda v: isinstance(v, bool), "true or false", default, doc, {"type": "boolean"})


def string(default: Any = REQUIRED, doc: str = "", nonempty: bool = False, min_len: int = 0,
           good: str = "a string") -> Field:
    n = max(min_len, 1 if nonempty else 0)
    return Field(lambda v: isinstance(v, str) and len(v) >= n, good, default, doc,
                 {"type": "string", **({"minLength": n} if n else {})})


def strings(default: Any = REQUIRED, doc: str = "", good: str = "a list of strings") -> Field:
    return Field(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), good, default, doc,
                 {"type": "array", "items": {"type": "string"}})


def duration(min_s: float = 0, default: Any = REQUIRED, doc: str = "", good: str = "") -> Field:
    return Field(lambda v: _dur(v) and parse_duration(v) >= min_s,
                 good or "a duration like 30s or 2m", default, doc,
                 {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"})


# section -> field -> Field: the one place that says what a scenario may hold,
# what each value must look like, and what it is when the file leaves it out.
# Only [bug] and [kernels] have required fields.  Validation walks this table
# (naming every bad field at once), `racelab scenario new` writes it out, and
# scenarios/schema.json is generated from it (tests/test_scenario.py keeps it current).
SCHEMA: dict[str, dict[str, Field]] = {
    "bug": {
        "name": string(nonempty=True, good="a non-empty string", doc="must equal the file name"),
        "title": string(doc="the fix's subject line"),
        "fix": string(min_len=7, good="a commit hash", doc="the commit that fixed it"),
        "fixed_in": string(good="a version string", doc="first release carrying the fix"),
        "introduced_by": string(default="", good="a commit hash", doc="the commit that brought the race in"),
        "introduced_in": string(default="", good="a version string", doc="its release"),
        "stable_backports": strings(default=[], good="a list of version strings",
                                    doc="stable releases that carry the fix"),
        "follow_ups": strings(default=[], good="a list of commit hashes", doc="later commits on the same lock"),
        "revert_patch": string(default="", good="a patch name", doc="the catalog patch that puts the race back"),
        "mechanism": string(doc="how the race happens, in a few lines"),
        "user_visible": strings(default=[], good="a list of violation kinds",
                                doc="violation kinds the race can show in user space"),
    },
    "kernels": {
        "affected": string(nonempty=True, good="a kernel name", doc="default affected kernel (a catalog name)"),
        "fixed": string(nonempty=True, good="a kernel name", doc="default fixed control"),
    },
    "topology": {
        "queues": integer(1, 64, 1, "queues on each veth end"),
        "gro": boolean(False, "GRO on the receiving end"),
        "threaded_napi": boolean(False, "threaded NAPI on the receiving end"),
        "channels": integer(0, None, 0, "ethtool -L combined N on the receiving end; 0 = leave"),
        "xps": choice("auto", "same", "spread", default="auto", doc="sender CPU -> tx queue"),
    },
    "xdp": {
        "mode": choice("generic", "native", default="generic", doc="generic (SKB mode) or native (driver) XDP"),
    },
    "checker": {
        "mode": choice("rxdrop", "forward", default="rxdrop", doc="rxdrop, or forward between two veths"),
        "queues": integer(1, 64, 1, "queues with sockets, 0..N-1"),
        "frame_size": choice(2048, 4096, default=2048, doc="UMEM frame size"),
        "headroom": integer(0, 1024, 0, "UMEM headroom"),
        "frames": integer(1, 1 << 20, 256, "UMEM frames, split between the queues"),
        "shared_umem": boolean(False, "one UMEM for the sockets of all queues"),
        "sockets_per_queue": integer(1, 8, 1, "sockets bound to each queue sharing its pool (XDP_SHARED_UMEM)"),
        "pick": choice("cpu", "rr", default="cpu",
                       doc="how the XDP program picks among them: by CPU, or round-robin"),
        "batch": integer(1, 4096, 64, "descriptors per ring pass"),
        "busy_poll": boolean(False, "preferred busy polling"),
    },
    "load": {
        "senders": integer(0, 64, 2, "sender processes, one per CPU, pinned"),
        "burst": integer(1, 1024, 32, "frames per sendmmsg()"),
        "gap_ns": integer(0, None, 0, "busy-wait between bursts"),
        "size": integer(64, 1500, 64, "frame size in bytes"),
        "rate": integer(0, None, 0, "packets/s, all senders together",
                        good="an integer >= 0 (0 = as fast as possible)"),
        "iperf3": boolean(False, "TCP through forward mode"),
        "iperf3_clients": integer(1, 16, 1, "iperf3 clients, client i pinned to CPU i",
                                  good="an integer 1..16 (client i pinned to CPU i)"),
    },
    "vm": {
        "vcpus": integer(1, 64, 2, "guest vCPUs"),
        "memory_mib": integer(256, 65536, 1024, "guest memory"),
        "cmdline": string(default="", doc="extra kernel command line"),
        "pin": boolean(False, "pin guest g's vCPU i to host CPU (g*vcpus + i) % host CPUs"),
        "silence": duration(5, "60s", "no agent output for this long: the guest stopped answering",
                            good="a duration >= 5s, like 60s"),
        "stalls": choice(*(s.value for s in Stalls), default=Stalls.AUTO.value,
                         doc="RCU stalls / soft lockups: violations under KVM, notes under TCG (auto)"),
    },
    "run": {
        "duration": duration(default="30s", doc="`racelab run` default"),
        "budget": duration(default="60s", good="a duration like 60s or 10m", doc="`racelab repro` default per kernel"),
        "confidence": Field(lambda v: isinstance(v, float) and 0.5 <= v < 1, "a number in [0.5, 1)", 0.95,
                            "confidence of the verdicts' intervals",
                            {"type": "number", "minimum": 0.5, "exclusiveMaximum": 1}),
        # repro: a clean control stops once an affected-like kernel would have shown an
        # onset with probability >= 1 - control_miss; 0 = always run the whole budget
        "control_miss": Field(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 0.5,
                              "a probability in [0, 0.5), e.g. 1e-3 (0: controls run their whole budget)", 1e-3,
                              "repro: a clean control stops once a miss this unlikely",
                              {"type": "number", "minimum": 0, "exclusiveMaximum": 0.5}),
    },
    "amplifier": {
        "method": choice(*AMPLIFIER_METHODS, default="auto", good="one of " + ", ".join(AMPLIFIER_METHODS),
                         doc="how to widen the race window"),
        "widen_rx_ns": integer(0, 1_000_000, 0, "widen-rx.patch busy-wait", good="an integer 0..1000000 (ns)"),
        "delay_ns": integer(0, 1_000_000, 0, "run-time amplifier busy-wait", good="an integer 0..1000000 (ns)"),
        "probe": Field(check_probe_spec, '"" (found per kernel) or SYMBOL+OFFSET[,SYMBOL+OFFSET...]', "",
                       "where the run-time amplifier waits", {"type": "string"}),
        "gate": Field(lambda v: isinstance(v, str) and (v == "" or PROBE_SYMBOL.fullmatch(v) is not None),
                      '"" (every hit) or a function name, e.g. "veth_poll"', "",
                      "only wait when called from this function", {"type": "string"}),
        "hold": Field(check_probe_spec, '"" (none) or SYMBOL[+OFFSET][,SYMBOL[+OFFSET]...]', "",
                      "kprobe-delay: where the other side of the window waits, on every hit (never gated)",
                      {"type": "string"}),
        "hold_ns": integer(0, 1_000_000, 0, "the hold's busy-wait (0: delay_ns)",
                           good="an integer 0..1000000 (ns)"),
    },
    "evidence": {
        # code in lab/evidence.py computes both measures; which one is this race's window is data
        "window": choice("overlap_hits", "unflushed_hits", default="unflushed_hits",
                         doc="the trace measure that counts this race's window: overlap_hits (two CPUs "
                             "inside one socket's receive) or unflushed_hits (a receive while another "
                             "CPU's are unflushed)"),
        # a race whose corruption seldom reaches user space: without the window a vulnerable
        # kernel looks fixed, so `racelab run` traces it unless --evidence none, and affected
        # matrix/grid cells judge the window level
        "corruption_rare": boolean(False, "user space seldom sees this race's corruption: `racelab run` "
                                          "collects window evidence by default"),
    },
    "mitigations": {m: choice("prevents", "no-effect", "unknown", default="unknown",
                              doc="what this workaround does to the race (unknown: not measured)")
                    for m in MITIGATIONS},
}


def defaults() -> dict[str, dict[str, Any]]:
    """Every section with its defaulted fields (required ones left out)."""
    return {sec: {f: copy.deepcopy(fd.default) for f, fd in fields.items() if not fd.required}
            for sec, fields in SCHEMA.items()}


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of a scenario file, from SCHEMA, for editors (TOML via JSON)."""
    props: dict[str, Any] = {}
    for sec, fields in SCHEMA.items():
        fp = {}
        for name, fd in fields.items():
            p = dict(fd.json)
            p["description"] = (fd.doc + "; " if fd.doc else "") + f"expected: {fd.good}"
            if not fd.required:
                p["default"] = fd.default
            fp[name] = p
        req = [n for n, fd in fields.items() if fd.required]
        props[sec] = {"type": "object", "additionalProperties": False, "properties": fp,
                      **({"required": req} if req else {})}
    props["variants"] = {"type": "object", "description": "named sets of \"section.field\" = value overrides "
                         "(--variant NAME)", "additionalProperties": {"type": "object"}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://racelab.invalid/scenario.schema.json",
            "title": "racelab scenario", "description": "A race scenario (scenarios/NAME.toml); generated "
            "from lab/scenario.py SCHEMA by `racelab scenario schema`",
            "type": "object", "additionalProperties": False, "required": ["bug", "kernels"],
            "properties": props}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    data: dict[str, Any]   # validated sections, overrides applied

    def __getitem__(self, section: str) -> dict[str, Any]:
        sec: dict[str, Any] = self.data[section]
        return sec

    @property
    def bug(self) -> dict[str, Any]:
        bug: dict[str, Any] = self.data["bug"]
        return bug

    def duration(self) -> float:
        return parse_duration(self.data["run"]["duration"])

    def budget(self) -> float:
        return parse_duration(self.data["run"]["budget"])


def scenario_dir() -> Path:
    return project_root() / "scenarios"


def available() -> list[str]:
    return sorted(p.stem for p in scenario_dir().glob("*.toml"))


def find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    if p.suffix == ".toml" or "/" in name_or_path:   # a path, not a name: say the file is missing
        raise BadInput(f"no such file: {p}", hint=f"check the path; or name a scenario: {', '.join(available())}")
    cand = scenario_dir() / f"{name_or_path}.toml"
    if cand.exists():
        return cand
    names = available()
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known scenarios: {', '.join(names)}"
    raise BadInput(f"unknown scenario {name_or_path!r}", hint=hint)


def load(name_or_path: str, overrides: Mapping[str, Any] | None = None,
         variant: str | None = None) -> Scenario:
    path = find(name_or_path)
    try:
        raw = with_variant(tomllib.loads(path.read_text()), variant, str(path))
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: malformed TOML: {e}",
                       hint="fix the syntax; see scenarios/generic-rx-race.toml for the format") from None
    return from_data(raw, path=str(path), overrides=overrides)


def from_data(raw: Mapping[str, Any], path: str = "<data>",
              overrides: Mapping[str, Any] | None = None) -> Scenario:
    data = copy.deepcopy(dict(raw))
    problems: list[str] = []
    for key, value in (overrides or {}).items():
        section, _, fld = key.partition(".")
        if section not in SCHEMA or fld not in SCHEMA[section]:
            close = difflib.get_close_matches(key, [f"{s}.{f}" for s in SCHEMA for f in SCHEMA[s]], n=1)
            problems.append(f"--set {key}: no such field" + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        data.setdefault(section, {})[fld] = value
    # a bad value given with --set is the command line's fault, not the file's: say so
    given = {k: v for k, v in (overrides or {}).items() if not any(p.startswith(f"--set {k}:") for p in problems)}
    for p in validate(data):
        key = p.partition(":")[0]
        problems.append(f"--set {p}" if key in given else p)
    name = data.get("bug", {}).get("name") if isinstance(data.get("bug"), dict) else None
    if isinstance(name, str) and name and Path(path).suffix == ".toml" and name != Path(path).stem:
        problems.append(f"bug.name: {name!r} differs from the file name {Path(path).stem!r}")
    if problems and all(p.startswith("--set ") for p in problems):
        raise BadInput(f"--set: {len(problems)} problem(s) (scenario {path}):\n  " + "\n  ".join(problems),
                       hint=f"fix the --set values named above; `racelab scenario show {Path(path).stem}` "
                            "lists every field and its value")
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems),
                       hint="fix the fields named above (see scenarios/generic-rx-race.toml)")
    return Scenario(name=data["bug"]["name"], path=path, data=data)


def validate(data: Mapping[str, Any]) -> list[str]:
    """Every problem with data, at once; fills in the defaults (in place) of what it leaves out."""
    problems: list[str] = []
    bad: set[str] = set()     # "section.field" that failed on its own: cross-checks skip them
    for section, fields in SCHEMA.items():
        if section not in data and not any(fd.required for fd in fields.values()) and isinstance(data, dict):
            data[section] = {}
        sec = data.get(section)
        if not isinstance(sec, dict):
            problems.append(f"[{section}]: missing section" if sec is None else f"[{section}]: not a table")
            bad.update(f"{section}.{fld}" for fld in fields)
            continue
        for fld, fd in fields.items():
            if fld not in sec:
                if fd.required:
                    problems.append(f"{section}.{fld}: missing (expected {fd.good})")
                    bad.add(f"{section}.{fld}")
                    continue
                sec[fld] = copy.deepcopy(fd.default)
                continue
            try:
                ok = bool(fd.check(sec[fld]))
            except Exception:  # a check on a wrong type
                ok = False
            if not ok:
                problems.append(f"{section}.{fld}: {sec[fld]!r} is not {fd.good}")
                bad.add(f"{section}.{fld}")
        for fld in sec:
            if fld not in fields:
                close = difflib.get_close_matches(fld, list(fields), n=1)
                problems.append(f"{section}.{fld}: unknown field" + (f" (did you mean {close[0]}?)" if close else ""))
    for section in data:
        if section not in SCHEMA and section != "variants":
            close = difflib.get_close_matches(section, list(SCHEMA), n=1)
            problems.append(f"[{section}]: unknown section" + (f" (did you mean [{close[0]}]?)" if close else ""))
    problems += _check_variants(data.get("variants", {}))
    problems += cross_check(data, bad)
    return problems


def _check_variants(variants: Any) -> list[str]:
    """[variants.NAME]: "section.field" = value, each a known field with a valid value
    (the whole scenario with a variant applied is validated again when it is chosen)."""
    if not isinstance(variants, dict):
        return ["[variants]: a table of named variants, e.g. [variants.iperf3]"]
    problems = []
    for name, keys in variants.items():
        if not isinstance(keys, dict) or not keys:
            problems.append(f"variants.{name}: a table of \"section.field\" = value overrides")
            continue
        for key, value in keys.items():
            section, _, fld = str(key).partition(".")
            if section not in SCHEMA or fld not in SCHEMA[section]:
                problems.append(f"variants.{name}: {key!r}: no such field")
                continue
            fd = SCHEMA[section][fld]
            check, good = fd.check, fd.good
            try:
                ok = bool(check(value))
            except Exception:  # a check on a wrong type
                ok = False
            if not ok:
                problems.append(f"variants.{name}: {key} = {value!r} is not {good}")
    return problems


def with_variant(raw: Mapping[str, Any], variant: str | None, path: str = "<data>") -> dict[str, Any]:
    """The scenario's data with a named variant's overrides applied (--variant NAME)."""
    data = copy.deepcopy(dict(raw))
    if not variant:
        return data
    variants = data.get("variants") or {}
    if variant not in variants:
        known = ", ".join(sorted(variants)) or "none"
        raise BadInput(f"{path}: no variant {variant!r}", hint=f"variants of this scenario: {known}")
    for key, value in variants[variant].items():
        section, _, fld = str(key).partition(".")
        data.setdefault(section, {})[fld] = value
    return data


def cross_check(data: Mapping[str, Any], bad: set[str]) -> list[str]:
    """Rules over several fields; each runs when all its fields are valid on their own."""
    def ok(*keys: str) -> bool:
        return not bad.intersection(keys)

    problems = []
    c, t, load = data.get("checker", {}), data.get("topology", {}), data.get("load", {})
    if ok("checker.queues", "topology.queues") and c["queues"] > t["queues"]:
        problems.append(f"checker.queues: {c['queues']} sockets but topology.queues is {t['queues']}")
    if ok("checker.frames", "checker.queues", "checker.mode"):
        if c["frames"] < c["queues"]:
            problems.append(f"checker.frames: {c['frames']} frames cannot feed {c['queues']} sockets")
        elif c["mode"] == "forward" and c["frames"] < 2 * c["queues"]:
            problems.append(f"checker.frames: forward mode needs at least 2 frames per queue "
                            f"({2 * c['queues']} for {c['queues']} queue(s)), got {c['frames']}")
    if ok("checker.mode", "checker.sockets_per_queue") and c["mode"] == "forward" and c["sockets_per_queue"] > 1:
        problems.append("checker.sockets_per_queue: several sockets on one queue need checker.mode = \"rxdrop\"")
    if ok("checker.queues", "checker.sockets_per_queue") and c["queues"] * c["sockets_per_queue"] > 128:
        problems.append(f"checker.sockets_per_queue: {c['queues']} queues x {c['sockets_per_queue']} sockets "
                        f"is more than the checker's 128")
    if ok("checker.mode", "load.iperf3") and c["mode"] == "rxdrop" and load["iperf3"]:
        problems.append("load.iperf3: TCP needs checker.mode = \"forward\"")
    if ok("load.size", "checker.frame_size", "checker.headroom") and \
            load["size"] > c["frame_size"] - 256 - c["headroom"] - 64:
        problems.append("load.size: frames do not fit frame_size - 256 - headroom")
    if ok("bug.user_visible"):
        from lab.agent.dataplane import INJECT_KINDS
        known = set(INJECT_KINDS) | {"kernel-splat"}
        unknown = [k for k in data["bug"]["user_visible"] if k not in known]
        if unknown:
            problems.append(f"bug.user_visible: unknown violation kind(s) {', '.join(map(str, unknown))} "
                            f"(known: {', '.join(sorted(known))})")
    return problems


# Addresses live in 198.18.0.0/15 (RFC 2544 benchmarking), only inside our namespaces.
MAC_TX, MAC_RX = "02:52:4c:00:00:01", "02:52:4c:00:00:02"
MAC_CLI, MAC_MID_A, MAC_MID_B, MAC_SRV = ("02:52:4c:00:01:01", "02:52:4c:00:01:02",
                                          "02:52:4c:00:01:03", "02:52:4c:00:01:04")


@dataclass(frozen=True)
class End:
    """One end of a veth: its namespace, device, MAC and (if any) address."""

    ns: str
    dev: str
    mac: str
    addr: str = ""       # "IP/prefix", or "" (the checker's ends in forward mode carry none)

    @property
    def ip(self) -> str:
        return self.addr.split("/")[0]


@dataclass(frozen=True)
class Wiring:
    """Who sits where, per checker mode: the one source of the namespace, device and address
    names that to_topology() builds and workload.agent_spec() hands the checker and the load."""

    sender: End                  # xsksend (and the iperf3 client) run here
    checker: End                 # the device the checker binds
    target: End                  # where the sender's packets are addressed
    peer: End | None = None      # forward: the checker's other device
    server: End | None = None    # forward: the iperf3 server's end


WIRING: dict[str, Wiring] = {
    # tx:v0 -> rx:v1, the checker drops what it receives
    "rxdrop": Wiring(sender=End("tx", "v0", MAC_TX, "198.18.0.1/24"),
                     checker=End("rx", "v1", MAC_RX, "198.18.0.2/24"),
                     target=End("rx", "v1", MAC_RX, "198.18.0.2/24")),
    # cli:a0 -- a1|mid|b1 -- b0:srv, one L2 segment; the checker forwards a1 <-> b1
    "forward": Wiring(sender=End("cli", "a0", MAC_CLI, "198.18.1.1/24"),
                      checker=End("mid", "a1", MAC_MID_A), peer=End("mid", "b1", MAC_MID_B),
                      server=End("srv", "b0", MAC_SRV, "198.18.1.2/24"),
                      target=End("srv", "b0", MAC_SRV, "198.18.1.2/24")),
}


def apply_mitigation(s: Scenario, mitigation: str | None) -> Scenario:
    """The scenario with a workaround applied (see [mitigations])."""
    if not mitigation:
        return s
    if mitigation not in MITIGATIONS:
        close = difflib.get_close_matches(mitigation, MITIGATIONS, n=1)
        raise BadInput(f"unknown mitigation {mitigation!r}",
                       hint=f"did you mean {close[0]}?" if close else f"one of: {', '.join(MITIGATIONS)}")
    data = copy.deepcopy(s.data)
    if mitigation == "single-queue":
        data["topology"]["channels"] = 1
        data["checker"]["queues"] = 1
    elif mitigation == "threaded-napi":
        data["topology"]["threaded_napi"] = True
    elif mitigation == "gro-on":
        data["topology"]["gro"] = True
    elif mitigation == "busy-poll":
        data["checker"]["busy_poll"] = True
    return Scenario(name=s.name, path=s.path, data=data)


def to_topology(s: Scenario) -> TopologySpec:
    t = s["topology"]
    common = dict(queues=t["queues"], gro_b=t["gro"], threaded_b=t["threaded_napi"],
                  channels_b=t["channels"])
    w = WIRING[s["checker"]["mode"]]
    pairs = [(w.sender, w.checker)] if w.peer is None else [(w.sender, w.checker), (w.server, w.peer)]
    veths = tuple(VethSpec(a.ns, a.dev, b.ns, b.dev, a_addr=a.addr, b_addr=b.addr, a_mac=a.mac,
                           b_mac=b.mac, xps_a=t["xps"], **common) for a, b in pairs if a and b)
    return TopologySpec(tuple(dict.fromkeys(ns for v in veths for ns in (v.a_ns, v.b_ns))), veths)


# --- `racelab scenario list | show | validate | new | schema` -------------------------------

SCHEMA_FILE = "schema.json"   # under scenarios/: generated by `racelab scenario schema`


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    if "\n" in s:
        return '"""' + s.replace("\\", "\\\\").replace('"""', '\\"""') + '"""'
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key(k: str) -> str:
    return k if all(c.isalnum() or c in "-_" for c in k) else _toml_value(k)


def to_toml(data: Mapping[str, Any], notes: Mapping[str, str] | None = None) -> str:
    """data as TOML, sections in SCHEMA order; notes: "section.field" -> trailing comment."""
    notes = notes or {}
    out: list[str] = []
    for sec in [*SCHEMA, *(k for k in data if k not in SCHEMA and k != "variants")]:
        if sec not in data:
            continue
        out.append(f"[{sec}]")
        for fld, v in data[sec].items():
            line = f"{_key(fld)} = {_toml_value(v)}"
            note = notes.get(f"{sec}.{fld}")
            out.append(f"{line:<46} # {note}" if note else line)
        out.append("")
    for name, keys in (data.get("variants") or {}).items():
        out.append(f"[variants.{_key(name)}]")
        out += [f"{_key(k)} = {_toml_value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def cli_list() -> None:
    rows = []
    for name in available():
        try:
            s = load(name)
            rows.append((name, s.bug["fix"], s["kernels"]["affected"], s["kernels"]["fixed"], s.bug["title"]))
        except BadInput as e:
            rows.append((name, "-", "-", "-", f"INVALID: {str(e).splitlines()[0]}"))
    w = max([len(r[0]) for r in rows] + [8])
    print(f"{'scenario':<{w}}  {'fix':<12}  {'affected kernel':<28}  {'fixed kernel':<16}  title")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<12}  {r[2]:<28}  {r[3]:<16}  {r[4]}")


def cli_show(name: str, overrides: Mapping[str, Any], variant: str | None) -> None:
    """The fully resolved scenario: every field, and where each value came from."""
    path = find(name)
    raw = tomllib.loads(path.read_text())
    s = load(name, overrides, variant=variant)
    var = (raw.get("variants") or {}).get(variant or "", {})
    notes = {}
    for sec, fields in SCHEMA.items():
        for fld in fields:
            key = f"{sec}.{fld}"
            if key in (overrides or {}):
                notes[key] = "--set"
            elif key in var:
                notes[key] = f"variant {variant}"
            elif fld not in (raw.get(sec) or {}):
                notes[key] = "default"
    print(f"# {path}" + (f", variant {variant}" if variant else "")
          + (f", --set {', '.join(overrides)}" if overrides else ""))
    print(to_toml(s.data, notes), end="")


def cli_validate(paths: list[str]) -> int:
    """Validate each file; print every problem.  Returns the number of bad files."""
    bad = 0
    for p in paths:
        try:
            s = load(p)
        except BadInput as e:
            bad += 1
            msg = str(e)   # "PATH: N problem(s):\n  ...\n  hint: ..." or one line
            for prefix in (f"{p}: ", f"{Path(p)}: "):
                msg = msg.removeprefix(prefix)
            print(f"{p}: INVALID: {msg}")
            continue
        given = sum(len(v) for k, v in tomllib.loads(find(p).read_text()).items()
                    if k in SCHEMA and isinstance(v, dict))
        total = sum(len(f) for f in SCHEMA.values())
        print(f"{p}: ok ({s.name}: {given} of {total} fields given, the rest defaults)")
    return bad


def new_scenario_text(name: str) -> str:
    """A commented starting file: [bug] and [kernels] to fill in, every other field
    commented out at its default (uncomment to change)."""
    lines = [f"# {name}: a racelab scenario.  Fill in [bug] and [kernels]; every other field has a",
             "# default (shown commented out).  Check it with `racelab scenario validate FILE`,",
             "# see it resolved with `racelab scenario show NAME`; README \"Adding a race\".",
             ""]
    for sec, fields in SCHEMA.items():
        required = any(fd.required for fd in fields.values())
        lines.append(f"[{sec}]" if required else f"# [{sec}]")
        for fld, fd in fields.items():
            if fd.required:
                value = name if (sec, fld) == ("bug", "name") else ""
                line = f"{_key(fld)} = {_toml_value(value)}"
                tag = "REQUIRED: " + (fd.doc or fd.good)
            else:
                line = f"# {_key(fld)} = {_toml_value(fd.default)}"
                tag = fd.doc or fd.good
            lines.append(f"{line:<46} # {tag} ({fd.good})" if fd.doc else f"{line:<46} # {tag}")
        lines.append("")
    return "\n".join(lines)


def cli_new(name: str, out: str | None) -> Path:
    import re
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise BadInput(f"scenario name {name!r}: lower-case letters, digits and '-'",
                       hint="e.g. racelab scenario new my-race")
    path = Path(out) if out else scenario_dir() / f"{name}.toml"
    if path.exists():
        raise BadInput(f"{path} exists", hint="choose another name, or --out PATH")
    path.write_text(new_scenario_text(name))
    return path


def schema_text() -> str:
    import json
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def cli_schema(check: bool) -> int:
    """Write scenarios/schema.json (or, with check, say whether it is current: 0 yes, 1 no)."""
    path = scenario_dir() / SCHEMA_FILE
    text = schema_text()
    if check:
        current = path.exists() and path.read_text() == text
        print(f"{path}: {'up to date' if current else 'stale: run `racelab scenario schema`'}")
        return 0 if current else 1
    path.write_text(text)
    print(path)
    return 0
