"""Scenarios: the TOML files under scenarios/, validated completely before use.

A scenario is data: the bug it hunts (commits, versions), the topology, the
XDP mode, the checker set-up and the load.  load() applies --set overrides
and reports every bad field at once.  to_topology() and agent_spec() turn a
scenario into what the agent builds and runs inside the kernel under test.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.amplifier import METHODS as AMPLIFIER_METHODS
from lab.amplifier import check_probe_spec
from lab.amplifier import SYMBOL as PROBE_SYMBOL
from lab.config import parse_duration
from lab.run import BadInput, project_root
from lab.topology import TopologySpec, VethSpec

MITIGATIONS = ("single-queue", "threaded-napi", "gro-on", "busy-poll")


def _pos(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pow2(v: Any) -> bool:
    return _pos(v) and v & (v - 1) == 0


def _dur(v: Any) -> bool:
    try:
        parse_duration(v)
    except BadInput:
        return False
    return True


# section -> field -> (check, what a good value looks like).  The schema is
# data, so validation can name every bad field at once.
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "bug": {
        "name": (lambda v: isinstance(v, str) and v, "a non-empty string"),
        "title": (lambda v: isinstance(v, str), "a string"),
        "fix": (lambda v: isinstance(v, str) and len(v) >= 7, "a commit hash"),
        "fixed_in": (lambda v: isinstance(v, str), "a version string"),
        "introduced_by": (lambda v: isinstance(v, str), "a commit hash"),
        "introduced_in": (lambda v: isinstance(v, str), "a version string"),
        "stable_backports": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                             "a list of version strings"),
        "follow_ups": (lambda v: isinstance(v, list), "a list of commit hashes"),
        "revert_patch": (lambda v: isinstance(v, str), "a patch name"),
        "mechanism": (lambda v: isinstance(v, str), "a string"),
        "user_visible": (lambda v: isinstance(v, list), "a list of violation kinds"),
    },
    "kernels": {
        "affected": (lambda v: isinstance(v, str) and v, "a kernel name"),
        "fixed": (lambda v: isinstance(v, str) and v, "a kernel name"),
    },
    "topology": {
        "queues": (lambda v: _pos(v) and v <= 64, "an integer 1..64"),
        "gro": (lambda v: isinstance(v, bool), "true or false"),
        "threaded_napi": (lambda v: isinstance(v, bool), "true or false"),
        "channels": (_nonneg, "an integer >= 0"),
        "xps": (lambda v: v in ("auto", "same", "spread"), "auto, same or spread"),
    },
    "xdp": {
        "mode": (lambda v: v in ("generic", "native"), "generic or native"),
    },
    "checker": {
        "mode": (lambda v: v in ("rxdrop", "forward"), "rxdrop or forward"),
        "queues": (lambda v: _pos(v) and v <= 64, "an integer 1..64"),
        "frame_size": (lambda v: v in (2048, 4096), "2048 or 4096"),
        "headroom": (lambda v: _nonneg(v) and v <= 1024, "an integer 0..1024"),
        "frames": (lambda v: _pos(v) and v <= 1 << 20, "an integer 1..1048576"),
        "shared_umem": (lambda v: isinstance(v, bool), "true or false"),
        "batch": (lambda v: _pos(v) and v <= 4096, "an integer 1..4096"),
        "busy_poll": (lambda v: isinstance(v, bool), "true or false"),
    },
    "load": {
        "senders": (lambda v: _nonneg(v) and v <= 64, "an integer 0..64"),
        "burst": (lambda v: _pos(v) and v <= 1024, "an integer 1..1024"),
        "gap_ns": (_nonneg, "an integer >= 0"),
        "size": (lambda v: isinstance(v, int) and 64 <= v <= 1500, "an integer 64..1500"),
        "rate": (_nonneg, "an integer >= 0 (0 = as fast as possible)"),
        "iperf3": (lambda v: isinstance(v, bool), "true or false"),
        "iperf3_clients": (lambda v: _pos(v) and v <= 16, "an integer 1..16 (client i pinned to CPU i)"),
    },
    "vm": {
        "vcpus": (lambda v: _pos(v) and v <= 64, "an integer 1..64"),
        "memory_mib": (lambda v: isinstance(v, int) and 256 <= v <= 65536, "an integer 256..65536"),
        "cmdline": (lambda v: isinstance(v, str), "a string"),
        "pin": (lambda v: isinstance(v, bool), "true or false"),
        "silence": (lambda v: _dur(v) and parse_duration(v) >= 5, "a duration >= 5s, like 60s"),
        "stalls": (lambda v: v in ("auto", "note", "violation"), "auto, note or violation"),
    },
    "run": {
        "duration": (_dur, "a duration like 30s or 2m"),
        "budget": (_dur, "a duration like 60s or 10m"),
        "confidence": (lambda v: isinstance(v, float) and 0.5 <= v < 1, "a number in [0.5, 1)"),
    },
    "amplifier": {
        "method": (lambda v: v in AMPLIFIER_METHODS, "one of " + ", ".join(AMPLIFIER_METHODS)),
        "widen_rx_ns": (lambda v: _nonneg(v) and v <= 1_000_000, "an integer 0..1000000 (ns)"),
        "delay_ns": (lambda v: _nonneg(v) and v <= 1_000_000, "an integer 0..1000000 (ns)"),
        "probe": (check_probe_spec, '"" (found per kernel) or SYMBOL+OFFSET[,SYMBOL+OFFSET...]'),
        "gate": (lambda v: isinstance(v, str) and (v == "" or PROBE_SYMBOL.fullmatch(v) is not None),
                 '"" (every hit) or a function name, e.g. "veth_poll"'),
    },
    "mitigations": {m: (lambda v: v in ("prevents", "no-effect"), "prevents or no-effect")
                    for m in MITIGATIONS},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    data: dict[str, Any]   # validated sections, overrides applied

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    @property
    def bug(self) -> dict[str, Any]:
        return self.data["bug"]

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
    problems += validate(data)
    name = data.get("bug", {}).get("name") if isinstance(data.get("bug"), dict) else None
    if isinstance(name, str) and name and Path(path).suffix == ".toml" and name != Path(path).stem:
        problems.append(f"bug.name: {name!r} differs from the file name {Path(path).stem!r}")
    if problems:
        raise BadInput(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems),
                       hint="fix the fields named above (see scenarios/generic-rx-race.toml)")
    return Scenario(name=data["bug"]["name"], path=path, data=data)


OPTIONAL_SECTIONS = {"amplifier": {"widen_rx_ns": 0}}
# fields added after scenarios were written: their default when a file leaves them out
OPTIONAL_FIELDS = {"vm": {"silence": "60s", "stalls": "auto"}, "load": {"iperf3_clients": 1},
                   "amplifier": {"method": "auto", "delay_ns": 0, "probe": "", "gate": ""}}


def validate(data: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    bad: set[str] = set()     # "section.field" that failed on its own: cross-checks skip them
    for section, defaults in OPTIONAL_SECTIONS.items():
        if isinstance(data, dict) and section not in data:
            data[section] = dict(defaults)   # type: ignore[index]
    for section, defaults in OPTIONAL_FIELDS.items():
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            for fld, value in defaults.items():
                data[section].setdefault(fld, value)   # type: ignore[index]
    for section, fields in SCHEMA.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            problems.append(f"[{section}]: missing section")
            bad.update(f"{section}.{fld}" for fld in fields)
            continue
        for fld, (check, good) in fields.items():
            if fld not in sec:
                problems.append(f"{section}.{fld}: missing (expected {good})")
                bad.add(f"{section}.{fld}")
                continue
            try:
                ok = bool(check(sec[fld]))
            except Exception:  # a check on a wrong type
                ok = False
            if not ok:
                problems.append(f"{section}.{fld}: {sec[fld]!r} is not {good}")
                bad.add(f"{section}.{fld}")
        for fld in sec:
            if fld not in fields:
                problems.append(f"{section}.{fld}: unknown field")
    for section in data:
        if section not in SCHEMA and section != "variants":
            problems.append(f"[{section}]: unknown section")
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
            check, good = SCHEMA[section][fld]
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
    if ok("checker.mode", "load.iperf3") and c["mode"] == "rxdrop" and load["iperf3"]:
        problems.append("load.iperf3: TCP needs checker.mode = \"forward\"")
    if ok("load.size", "checker.frame_size", "checker.headroom") and \
            load["size"] > c["frame_size"] - 256 - c["headroom"] - 64:
        problems.append("load.size: frames do not fit frame_size - 256 - headroom")
    if ok("bug.user_visible"):
        from lab.dataplane import INJECT_KINDS
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
    if s["checker"]["mode"] == "rxdrop":
        return TopologySpec(("tx", "rx"), (
            VethSpec("tx", "v0", "rx", "v1", a_addr="198.18.0.1/24", b_addr="198.18.0.2/24",
                     a_mac=MAC_TX, b_mac=MAC_RX, xps_a=t["xps"], **common),))
    # forward: cli -- a0|a1 [checker forwards a1 <-> b1] b1|b0 -- srv, one L2 segment
    return TopologySpec(("cli", "mid", "srv"), (
        VethSpec("cli", "a0", "mid", "a1", a_addr="198.18.1.1/24", a_mac=MAC_CLI, b_mac=MAC_MID_A,
                 xps_a=t["xps"], **common),
        VethSpec("srv", "b0", "mid", "b1", a_addr="198.18.1.2/24", a_mac=MAC_SRV, b_mac=MAC_MID_B,
                 xps_a=t["xps"], **common),
    ))
