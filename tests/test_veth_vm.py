"""The veth NAPI race (fa349e396e48) as user-visible corruption, with the window amplifier.

`racelab repro veth-napi-race` with the scenario's defaults: the kernel with
the fix reverted (6.1.192+revert-veth-napi) and the fixed one (6.1.192), both
as built from source with no source amplifier.  The run-time amplifier (a
kprobe at the window found in each kernel's code, with a BPF busy-wait while
another CPU is inside veth_poll()) runs identically on both: the reverted
kernel must show ring corruption, and the fixed kernel, with the same probe,
the same delay and the same load in the same run, must stay clean.  The fixed
control is what shows that the checker responds to the race and not to the
amplifier or the load.

The same with widen-rx.patch built into both kernels (auto then takes the
patch's knob) keeps the source amplifier honest too.

Measured on the 2-core TCG host: the reverted kernel's first violation comes
within seconds with either amplifier, so a 2-3 minute budget leaves a wide
margin.  Kernels and the image come from the cache.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.kernels import kernel
from lab import scenario as scen

ROOT = Path(__file__).resolve().parent.parent
KNOB = "/sys/module/xsk/parameters/widen_rx_ns"


def racelab(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_defaults_are_plain_kernels_amplified_at_run_time():
    """No source amplifier in the defaults: auto widens the window with the probe on both."""
    s = scen.load("veth-napi-race")
    aff, fixed = s["kernels"]["affected"], s["kernels"]["fixed"]
    for name in (aff, fixed):
        patches = [Path(p).name for p in kernel.resolve(name).patches]
        assert "widen-rx.patch" not in patches, (name, patches)
    assert "veth-napi-race" in kernel.resolve(aff).affected
    assert "veth-napi-race" not in kernel.resolve(fixed).affected
    amp = s["amplifier"]
    assert amp["method"] == "auto" and amp["delay_ns"] > 0 and amp["gate"] == "veth_poll"


def _rows(tmp_path):
    summary = json.loads((tmp_path / "summary.json").read_text())
    return {r["kernel"]: r for r in summary["rows"]}, summary


def _affected_again(aff, a, tmp_path, why):
    """The race is a rate, not a certainty: under a loaded CI host the reverted kernel may
    miss a 2-minute budget (it then shows the window, WINDOW HIT), or its guest may be lost
    (INCONCLUSIVE).  Once, it runs again alone with the same budget; the repro's own exit
    code then says "mismatch" and is not checked.  Returns the affected row, the note, whether
    it ran again, and the results directory that row came from (its events hold its knobs)."""
    if a["verdict"] == "REPRODUCED":
        return a, why, False, tmp_path
    again = tmp_path / "again"
    racelab("run", "veth-napi-race", "--backend", "vm", "--kernel", aff, "--duration", "2m",
            "--stop-on-first", "--out", str(again), "--json")
    rows, _ = _rows(again)
    why = f"{why}; the affected kernel missed its first budget ({a['verdict']}: {a['verdict_text']}), again: {again}"
    return rows[aff], why, True, again


def _knob_notes(out):
    """kernel -> (applied, text) of the widen_rx_ns note its agent sent."""
    notes = {}
    for line in (out / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("type") == "note" and str(ev.get("text", "")).startswith(KNOB):
            notes[ev["target"].split("/")[0]] = (ev.get("applied", True), ev["text"])
    return notes


def _corrupted_and_clean(a, f, s, why):
    # reverted + amplifier: corruption reached user space, of a kind this race produces
    assert a["verdict"] == "REPRODUCED", (a, why)
    assert a["violations"] > 0 and a["first_violation_s"] is not None, (a, why)
    kinds = {k for k, n in a["by_kind"].items() if n}
    assert kinds & set(s.bug["user_visible"]), (kinds, why)
    # fixed + the same amplifier and load: clean
    assert f["verdict"] == "NOT REPRODUCED", (f, why)
    assert f["violations"] == 0 and not f["infra_errors"], (f, why)
    assert f["packets"] > 50_000, (f["packets"], why)


@pytest.mark.vm
@pytest.mark.slow
def test_run_time_amplified_repro_corrupts_reverted_and_fixed_stays_clean(tmp_path):
    s = scen.load("veth-napi-race")
    aff, fixed = s["kernels"]["affected"], s["kernels"]["fixed"]
    p = racelab("repro", "veth-napi-race", "--budget", "2m", "--out", str(tmp_path), "--json")
    rows, _ = _rows(tmp_path)
    assert set(rows) == {aff, fixed}, "both kernels in the same run"
    f = rows[fixed]
    a, why, retried, _ = _affected_again(aff, rows[aff], tmp_path, f"results: {tmp_path}")
    # the same amplifier, found in each kernel's own code, ran in both and fired in both
    amps = {aff: a["extra"]["amplifier"], fixed: f["extra"]["amplifier"]}
    for k, amp in amps.items():
        assert amp["method"] == "kprobe-delay" and amp["gate"] == "veth_poll", (k, amp, why)
        assert amp["probes"] and amp["hits"] > 0 and "warning" not in amp, (k, amp, why)
    assert amps[aff]["probes"] == amps[fixed]["probes"] and amps[aff]["delay_ns"] == amps[fixed]["delay_ns"]
    _corrupted_and_clean(a, f, s, why)
    assert retried or p.returncode == 0, p.stderr[-4000:]


@pytest.mark.vm
@pytest.mark.slow
def test_patch_amplified_repro_corrupts_reverted_and_fixed_stays_clean(tmp_path):
    s = scen.load("veth-napi-race")
    aff, fixed = "6.1.192+revert-veth-napi+widen-rx", "6.1.192+widen-rx"
    widen = s["amplifier"]["widen_rx_ns"]
    p = racelab("repro", "veth-napi-race", "--kernel", aff, "--kernel", fixed, "--budget", "2m",
                "--out", str(tmp_path), "--json")
    rows, _ = _rows(tmp_path)
    assert set(rows) == {aff, fixed}, "both kernels in the same run"
    a, why, retried, a_dir = _affected_again(aff, rows[aff], tmp_path, f"results: {tmp_path}")
    # auto took the patch's knob on both, and the agent set the same value in both guests
    for k, row, out in ((aff, a, a_dir), (fixed, rows[fixed], tmp_path)):
        assert row["extra"]["amplifier"]["method"] == "patch", (row["extra"], why)
        notes = _knob_notes(out)
        applied, text = notes.get(k, (False, ""))
        assert applied and text.startswith(f"{KNOB} = {widen} "), (k, notes, why)
    _corrupted_and_clean(a, rows[fixed], s, why)
    assert retried or p.returncode == 0, p.stderr[-4000:]
