"""The veth NAPI race (fa349e396e48) as user-visible corruption, with the window amplifier.

`racelab repro veth-napi-race` with the scenario's defaults: the reverted
kernel (6.1.192+revert-veth-napi+widen-rx) must show ring corruption, and
the fixed kernel built with the same amplifier (6.1.192+widen-rx), running
the same knob and the same load in the same run, must stay clean.  The
fixed control is what shows that the checker responds to the race and not
to the amplifier or the load (issue 8, part 4).

Measured on the 2-core TCG host (bench/veth_levers): the reverted kernel's
first violation comes a few seconds to about a minute into the load, so a 3
minute budget leaves a wide margin while the fixed kernel gets 3 minutes of
the same load.  Kernels and the image come from the cache.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import kernel
from lab import scenario as scen

ROOT = Path(__file__).resolve().parent.parent
KNOB = "/sys/module/xsk/parameters/widen_rx_ns"


def racelab(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_defaults_pair_the_amplifier_with_amplified_kernels():
    """The amplifier is on by default, so both default kernels must carry widen-rx.patch
    (the knob does not exist elsewhere), and only the affected one has the fix reverted."""
    s = scen.load("veth-napi-race")
    assert s["amplifier"]["widen_rx_ns"] > 0
    aff, fixed = s["kernels"]["affected"], s["kernels"]["fixed"]
    for name in (aff, fixed):
        patches = [Path(p).name for p in kernel.resolve(name).patches]
        assert "widen-rx.patch" in patches, (name, patches)
    assert "veth-napi-race" in kernel.resolve(aff).affected
    assert "veth-napi-race" not in kernel.resolve(fixed).affected


@pytest.mark.vm
@pytest.mark.slow
def test_amplified_repro_corrupts_reverted_and_fixed_stays_clean(tmp_path):
    s = scen.load("veth-napi-race")
    aff, fixed = s["kernels"]["affected"], s["kernels"]["fixed"]
    widen = s["amplifier"]["widen_rx_ns"]
    p = racelab("repro", "veth-napi-race", "--budget", "3m", "--out", str(tmp_path), "--json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["kernel"]: r for r in summary["rows"]}
    assert set(rows) == {aff, fixed}, "both kernels in the same run"
    a, f = rows[aff], rows[fixed]
    why = f"results: {tmp_path}"

    # the same amplifier value was really set in both guests (the agent notes every knob it sets)
    notes = {}
    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("type") == "note" and str(ev.get("text", "")).startswith(KNOB):
            notes[ev["target"].split("/")[0]] = (ev.get("applied", True), ev["text"])
    for k in (aff, fixed):
        applied, text = notes.get(k, (False, ""))
        assert applied and text.startswith(f"{KNOB} = {widen} "), (k, notes, why)

    # reverted + amplifier: corruption reached user space, of a kind this race produces
    assert a["verdict"] == "REPRODUCED", (a, why)
    assert a["violations"] > 0 and a["first_violation_s"] is not None, (a, why)
    kinds = {k for k, n in a["by_kind"].items() if n}
    assert kinds & set(s.bug["user_visible"]), (kinds, why)

    # fixed + the same amplifier and load: clean over the whole budget
    assert f["verdict"] == "NOT REPRODUCED", (f, why)
    assert f["violations"] == 0 and not f["infra_errors"], (f, why)
    assert f["packets"] > 50_000 and f["seconds"] > 150, (f["packets"], f["seconds"], why)
    if f["window"]["available"]:
        assert f["window"]["count"] == 0, (f["window"], why)   # no interleaving on a fixed kernel either

    # repro's exit code: both verdicts as the catalog expects
    assert p.returncode == 0, p.stderr[-4000:]
