"""Verdicts with statistics: REPRODUCED, or NOT REPRODUCED below a rate bound.

Violations are counted as a Poisson process over packets and over time.
With k = 0 the one-sided upper bound at confidence c is -ln(1 - c) / n (the
"rule of three" at 95%).  With k > 0 the two-sided exact (Garwood) interval
comes from gamma quantiles.  No scipy: the regularised incomplete gamma
function is computed here and inverted by bisection.

Two levels (issue 8): CORRUPTION counts ring-invariant violations seen by
user space; WINDOW HIT counts kernel-side evidence of the racy interleaving.
Only corruption makes a row REPRODUCED.  A row with window hits and no
corruption is WINDOW HIT, never NOT REPRODUCED: a vulnerable kernel whose
corruption did not reach user space in time must not read like a fixed one.
NOT REPRODUCED means neither (and says whether the window was measured).
`--expect` names the level it judges (EXPECT_LEVELS).

The Poisson model needs independent events, and one kernel fault shows as a
burst of violations (a lost FILL descriptor used to give hundreds of `order`
violations).  So the corruption rate counts ONSETS (the checker marks the
violation that starts a burst, see csrc/xskcheck.c), and the raw counts by
kind are shown beside them.  The exposure is the time packets were flowing
and the packets checked, over the targets that count (lab.workload).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class Verdict(enum.StrEnum):
    """A row's verdict; the values are what summary.json and the tables show."""

    REPRODUCED = "REPRODUCED"
    NOT_REPRODUCED = "NOT REPRODUCED"
    INCONCLUSIVE = "INCONCLUSIVE"   # infrastructure lost before any packet: no verdict
    WINDOW_HIT = "WINDOW HIT"       # the racy interleaving traced, no corruption seen by user space


REPRODUCED = Verdict.REPRODUCED
NOT_REPRODUCED = Verdict.NOT_REPRODUCED
INCONCLUSIVE = Verdict.INCONCLUSIVE
WINDOW_HIT = Verdict.WINDOW_HIT


class Expect(enum.StrEnum):
    """--expect levels: reproduced = corruption seen; window = at least the window hit
    (corruption implies it); clean = neither corruption nor, where measured, window hits."""

    REPRODUCED = "reproduced"
    WINDOW = "window"
    CLEAN = "clean"


EXPECT_LEVELS: tuple[Expect, ...] = tuple(Expect)


def _gamma_p(a: float, x: float) -> float:
    """Regularised lower incomplete gamma P(a, x) (Numerical Recipes 6.2)."""
    if x <= 0:
        return 0.0
    gln = math.lgamma(a)
    if x < a + 1:
        ap, s, d = a, 1.0 / a, 1.0 / a
        for _ in range(10000):
            ap += 1
            d *= x / ap
            s += d
            if abs(d) < abs(s) * 1e-15:
                break
        return s * math.exp(-x + a * math.log(x) - gln)
    # continued fraction for Q, P = 1 - Q
    b = x + 1 - a
    c = 1 / 1e-300
    d = 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return 1.0 - math.exp(-x + a * math.log(x) - gln) * h


def gamma_quantile(a: float, p: float) -> float:
    """x such that P(a, x) = p."""
    lo, hi = 0.0, max(1.0, a)
    while _gamma_p(a, hi) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _gamma_p(a, mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def poisson_interval(k: int, exposure: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a Poisson rate with k events over exposure."""
    if exposure <= 0:
        return (0.0, math.inf)
    alpha = 1 - confidence
    lower = 0.0 if k == 0 else gamma_quantile(k, alpha / 2) / exposure
    upper = gamma_quantile(k + 1, 1 - alpha / 2) / exposure
    return (lower, upper)


def upper_bound(k: int, exposure: float, confidence: float = 0.95) -> float:
    """One-sided upper bound on a Poisson rate (k = 0: -ln(1-c)/exposure)."""
    if exposure <= 0:
        return math.inf
    return gamma_quantile(k + 1, confidence) / exposure


def detection_probability(rate_per_s: float, seconds: float) -> float:
    """P(at least one event in `seconds`) for a Poisson process."""
    return 1.0 - math.exp(-rate_per_s * seconds)


def budget_for(rate_per_s: float, miss: float = 0.01) -> float:
    """Seconds of run needed so that P(no event | present at this rate) <= miss."""
    if rate_per_s <= 0:
        return math.inf
    return -math.log(miss) / rate_per_s


def miss_probability(rate_per_s: float, seconds: float) -> float:
    """P(no event in `seconds`) for a Poisson process at this rate."""
    return math.exp(-rate_per_s * seconds)


def clean_enough(lower_rate: float, clean_seconds: float, miss: float) -> bool:
    """Has a clean control run long enough?  An affected-like kernel, with at least
    the affected kernel's rate (its lower confidence bound), would have stayed this
    clean with probability <= miss."""
    return lower_rate > 0 and clean_seconds > 0 and miss_probability(lower_rate, clean_seconds) <= miss


def control_stop_text(clean_seconds: float, lower_rate: float, confidence: float, miss: float,
                      stopped: bool) -> str:
    """Why a clean control ended when it did (its verdict line says it)."""
    rate = f">= {_sci(lower_rate)} onsets/s at {confidence * 100:.0f}%"
    if stopped:
        return (f"clean for {clean_seconds:.3g} s: an affected-like kernel ({rate}) would show one "
                f"with probability > {1 - miss:.10g}")
    if lower_rate <= 0:
        return f"ran its whole budget ({clean_seconds:.3g} s clean): the affected kernel gave no rate to test against"
    return (f"ran its whole budget ({clean_seconds:.3g} s clean, {budget_for(lower_rate, miss):.3g} s wanted): "
            f"an affected-like kernel ({rate}) would show one with probability "
            f"{_prob(detection_probability(lower_rate, clean_seconds))}")


def _prob(p: float) -> str:
    """0.999, 0.9999, 0.632: enough digits to tell it from 1."""
    if p >= 1:
        return "1"
    digits = max(3, min(12, math.ceil(-math.log10(1 - p)) + 1 if p > 0.9 else 3))
    return f"{math.floor(p * 10 ** digits) / 10 ** digits:.{digits}f}".rstrip("0").rstrip(".")


@dataclass
class Level:
    """One evidence level of a row: its count and rate statistics."""

    name: str                 # "corruption" | "window"
    count: int = 0
    per_packet: tuple[float, float] = (0.0, 0.0)   # 95% interval (k > 0) or (0, upper bound)
    per_second: tuple[float, float] = (0.0, 0.0)
    available: bool = True    # False: this evidence was not collected (e.g. no kprobes)
    note: str = ""
    packets: int = 0          # the exposure behind the rates
    seconds: float = 0.0


@dataclass
class Row:
    """The verdict for one kernel (all its VMs together)."""

    kernel: str
    vms: int
    packets: int
    seconds: float            # seconds packets flowed, summed over the targets that count
    wall: float               # wall time of the whole row
    by_kind: dict[str, int]   # raw violation counts
    first_violation_s: float | None   # from the senders' ready line to the first violation, min over VMs
    verdict: Verdict
    corruption: Level         # its count: independent onsets
    window: Level
    confidence: float = 0.95
    infra_errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    onsets_by_kind: dict[str, int] = field(default_factory=dict)
    first_violation_from_load_start_s: float | None = None   # the agent's load-start as origin
    first_violation_origin: str = ""   # "senders ready", or "load start" when no sender line came
    interrupted: bool = False          # Ctrl-C: what was counted so far, no verdict

    @property
    def violations(self) -> int:
        return sum(self.by_kind.values())

    @property
    def onsets(self) -> int:
        return self.corruption.count

    def rate_text(self) -> str:
        return level_text(self.corruption, self.packets, self.confidence)


def level(name: str, k: int, packets: int, seconds: float, confidence: float = 0.95,
          available: bool = True, note: str = "") -> Level:
    if k > 0:
        pp = poisson_interval(k, packets, confidence)
        ps = poisson_interval(k, seconds, confidence)
    else:
        pp = (0.0, upper_bound(0, packets, confidence))
        ps = (0.0, upper_bound(0, seconds, confidence))
    return Level(name, k, pp, ps, available, note, packets, seconds)


def level_text(lv: Level, packets: int, confidence: float) -> str:
    pct = f"{confidence * 100:.0f}%"
    if not lv.available:
        return f"not collected{': ' + lv.note if lv.note else ''}"
    if lv.count == 0:
        if packets <= 0:
            return "no packets"
        return (f"rate < {_sci(lv.per_packet[1])}/pkt, < {_sci(lv.per_second[1])}/s at {pct}")
    every = (f"1 per {_every(lv.packets or packets, lv.count)} pkts, 1 per {_every(lv.seconds, lv.count)} s; "
             if (lv.packets or packets) > 0 and lv.seconds > 0 else "")   # a crashed guest: no exposure
    if lv.name == "corruption":   # the rate is per onset, never per raw violation
        every = f"{lv.count:,} onset{'s' if lv.count != 1 else ''}: " + every
    return (every +
            f"{_sci(lv.per_packet[0])}..{_sci(lv.per_packet[1])}/pkt, "
            f"{_sci(lv.per_second[0])}..{_sci(lv.per_second[1])}/s ({pct})")


def _every(exposure: float, k: int) -> str:
    """Exposure per event (the point estimate), e.g. packets per violation."""
    x = exposure / k
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _sci(x: float) -> str:
    if x == math.inf:
        return "inf"
    if x == 0:
        return "0"
    if 0.01 <= x < 1000:
        return f"{x:.3g}"
    return f"{x:.2e}"


def decide(kernel: str, *, vms: int, packets: int, seconds: float, wall: float,
           by_kind: dict[str, int], first_violation_s: float | None, window_hits: int = 0,
           window_available: bool = False, window_note: str = "", confidence: float = 0.95,
           infra_errors: list[str] | None = None, onsets_by_kind: dict[str, int] | None = None,
           first_violation_from_load_start_s: float | None = None,
           first_violation_origin: str = "", interrupted: bool = False) -> Row:
    """One row.  onsets_by_kind: independent onsets (None: every violation is one);
    the rate statistics count those.  interrupted: INCONCLUSIVE whatever was seen."""
    raw = sum(by_kind.values())
    onsets = dict(by_kind) if onsets_by_kind is None else {
        kd: min(n, onsets_by_kind.get(kd, n)) for kd, n in by_kind.items()}
    # the first violation of a run always starts a fault: a row that saw any has an onset
    k = max(sum(onsets.values()), 1 if raw else 0)
    corruption = level("corruption", k, packets, seconds, confidence)
    window = level("window", window_hits, packets, seconds, confidence,
                   available=window_available, note=window_note)
    if interrupted:
        verdict = INCONCLUSIVE   # a run cut short by the user decides nothing
    elif raw > 0:
        verdict = REPRODUCED
    elif window_available and window_hits > 0:
        # positive evidence like a violation: a lost guest elsewhere in the fleet does not undo it
        verdict = WINDOW_HIT
    elif packets == 0 or infra_errors:
        # a lost guest's exposure is unknown: the row is never "not reproduced" with a loss in it
        verdict = INCONCLUSIVE
    else:
        verdict = NOT_REPRODUCED
    return Row(kernel=kernel, vms=vms, packets=packets, seconds=seconds, wall=wall,
               by_kind=dict(by_kind), first_violation_s=first_violation_s, verdict=verdict,
               corruption=corruption, window=window, confidence=confidence,
               infra_errors=list(infra_errors or []), onsets_by_kind=onsets,
               first_violation_from_load_start_s=first_violation_from_load_start_s,
               first_violation_origin=first_violation_origin, interrupted=interrupted)


def kinds_text(row: Row) -> str:
    """Raw counts by kind, with the onsets beside those that differ: order=769 (1 onset)."""
    parts = []
    for kd, n in sorted(row.by_kind.items()):
        o = row.onsets_by_kind.get(kd, n)
        parts.append(f"{kd}={n:,}" if o == n else f"{kd}={n:,} ({o:,} onset{'s' if o != 1 else ''})")
    return ", ".join(parts) or "-"


def verdict_text(row: Row) -> str:
    if row.verdict == REPRODUCED:
        return REPRODUCED
    if row.verdict == WINDOW_HIT:
        n = row.window.count
        return f"{WINDOW_HIT} ({n:,} interleaving{'s' if n != 1 else ''}; no corruption in {row.packets:,} packets)"
    if row.verdict == NOT_REPRODUCED:
        stop = row.extra.get("control_stop") or {}
        return (f"NOT REPRODUCED (rate < {_sci(row.corruption.per_packet[1])}/pkt at "
                f"{row.confidence * 100:.0f}%; {_window_clause(row)})"
                + (f"; {stop['text']}" if stop.get("text") else ""))
    if row.interrupted:
        return (f"{INCONCLUSIVE} (interrupted: {row.packets:,} packets over {row.seconds:.1f} s of "
                f"traffic so far)")
    return f"{INCONCLUSIVE} (infrastructure: {'; '.join(row.infra_errors) or 'no packets'})"


def _window_clause(row: Row) -> str:
    """What a clean row says of the window: 0 hits measured, or not measured (and why)."""
    if row.window.available:
        return "0 window hits"
    return "window not measured" + (f": {_short(row.window.note)}" if row.window.note else "")


def _short(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def level_of(row: Row) -> str:
    """The strongest level a row reached: reproduced, window, clean, or inconclusive."""
    return {REPRODUCED: "reproduced", WINDOW_HIT: "window", NOT_REPRODUCED: "clean"}.get(row.verdict,
                                                                                        "inconclusive")


def matches(row: Row, expect: str | None) -> bool:
    """--expect reproduced|window|clean against a row.  window is met by corruption too
    (it needs the window); clean by neither (a row whose window was not measured is
    judged on corruption alone, and its verdict text says so)."""
    if expect is None:
        return True
    if expect == "reproduced":
        return row.verdict == REPRODUCED
    if expect == "window":
        return row.verdict in (REPRODUCED, WINDOW_HIT)
    if expect == "clean":
        return row.verdict == NOT_REPRODUCED
    raise ValueError(f"unknown expectation {expect!r}: one of {', '.join(EXPECT_LEVELS)}")
