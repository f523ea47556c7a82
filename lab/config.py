"""The frozen run configuration, built from scenario TOML + CLI + environment.

It is passed down explicitly (never a global) and round-trips to JSON, so
every result directory records exactly what produced it.
"""

from __future__ import annotations

import enum
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from lab.agent.jsonable import from_jsonable, to_jsonable
from lab.run import BadInput

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")   # a sign, to say "must be positive"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """'30s', '2m', '1.5h', '500ms', '14d' or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise BadInput(f"{what} must be positive, got {text}")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise BadInput(f"bad {what}: {text!r}", hint="use e.g. 500ms, 30s, 2m, 1h")
    v = float(m.group(1)) * _UNITS[m.group(2)]
    if v <= 0:
        raise BadInput(f"{what} must be positive, got {text!r}", hint="use e.g. 500ms, 30s, 2m, 1h")
    return v


def fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


class Backend(enum.StrEnum):
    """Where a run's kernels are: this machine's, or guests'."""

    NETNS = "netns"    # the host kernel, in network namespaces
    VM = "vm"          # guests on chosen kernels, through libvirtd


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what one `racelab run` / `repro` does."""

    scenario: str                       # scenario name (scenarios/NAME.toml)
    scenario_data: dict[str, Any]       # the validated, override-applied scenario as data
    backend: Backend = Backend.NETNS
    kernels: tuple[str, ...] = ()       # kernel specs (vm backend); empty = host kernel
    duration: float = 30.0              # seconds of load per target
    vms: int = 1                        # guests per kernel (vm backend)
    seed: int = 0                       # seeds names and sender payloads
    stop_on_first: bool = False         # end a target's run at its first violation
    stop_grace: float = 0.0             # ...but keep the load on this long after it
    expect: str | None = None           # reproduced | clean | None
    inject: str | None = None           # fault class the checker commits on purpose
    mitigation: str | None = None       # workaround applied to the affected kernel
    variant: str | None = None          # [variants.NAME] of the scenario, applied before --set
    evidence: tuple[str, ...] = ()      # extra evidence: "trace"
    out: str = ""                       # results directory
    overrides: tuple[str, ...] = ()     # the --set KEY=VALUE strings, as given
    uris: tuple[str, ...] = ("qemu:///system",)  # libvirt hosts for the fleet

    def __post_init__(self) -> None:
        try:   # a plain "vm" becomes Backend.VM; an unknown word is bad input (a hand-edited config.json)
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            raise BadInput(f"backend {self.backend!r}: one of {', '.join(Backend)}") from None

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        cfg: RunConfig = from_jsonable(cls, json.loads(text))
        return cfg


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """--set load.senders=4 --set xdp.mode=native -> {'load.senders': 4, ...}.

    Values are parsed as TOML values where possible (numbers, booleans,
    quoted strings, arrays), otherwise taken as bare strings.
    """
    import tomllib

    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. load.senders=4")
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    if problems:
        raise BadInput("; ".join(problems))
    return out


__all__ = ["RunConfig", "parse_duration", "fmt_duration", "to_jsonable", "from_jsonable",
           "parse_overrides", "field"]
