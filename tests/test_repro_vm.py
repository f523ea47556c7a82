"""`racelab repro generic-rx-race` end to end: real kernels, real guests, real verdicts.

The affected kernel (6.1.192 with bf0bdd1343ef and a1356ac7749c reverted)
must show REPRODUCED and the fixed one (6.1.192 as shipped) NOT REPRODUCED,
in the same run.  Kernels and the image come from the cache (built on a cold
machine by the first test that needs them).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import scenario as scen

pytestmark = [pytest.mark.vm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def racelab(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_repro_generic_rx_race_affected_vs_fixed(tmp_path):
    budget = 90.0
    p = racelab("repro", "generic-rx-race", "--budget", f"{budget:g}s", "--out", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    from lab import results
    assert results.problems(summary) == [], "summary.json follows lab/schemas/summary.schema.json"
    rows = {r["kernel"]: r for r in summary["rows"]}
    assert set(rows) == {"6.1.192+revert-generic-rx", "6.1.192"}, "both kernels in the same run"
    affected, fixed = rows["6.1.192+revert-generic-rx"], rows["6.1.192"]
    assert affected["verdict"] == "REPRODUCED", affected
    assert affected["first_violation_s"] is not None and affected["violations"] > 0
    assert fixed["verdict"] == "NOT REPRODUCED", fixed
    assert fixed["packets"] > 10_000 and fixed["violations"] == 0
    # the control stopped once its clean traffic ruled out the affected kernel's rate,
    # long before the budget, and says so in its verdict line
    stop = fixed["extra"]["control_stop"]
    assert stop["stopped_early"], stop
    assert stop["lower_rate_per_s"] > 0 and stop["needed_s"] <= fixed["seconds"] < budget - 20, (stop, fixed)
    assert fixed["verdict_text"].endswith(stop["text"]) and "probability > 0.999" in stop["text"]
    assert [t["reason"] for t in summary["targets"] if t["kernel"] == "6.1.192"] == ["stopped"]
    phases = summary["phases"]
    for k in ("build_check", "boot", "setup", "load", "evidence", "teardown", "report"):
        assert 0 <= phases[k] < phases["wall"], (k, phases)
    # what produced it is recorded
    prov = summary["provenance"]
    for k in ("host_kernel", "qemu", "seed"):
        assert prov[k] not in ("", None), k
    for k in rows:
        assert prov["kernels"][k]["key"] and prov["kernels"][k]["accelerator"] in ("tcg", "kvm")
    # reports exist and say the same
    assert (tmp_path / "junit.xml").exists() and (tmp_path / "report.html").exists()
    assert "REPRODUCED" in (tmp_path / "report.html").read_text()
    # flight recorder and evidence files
    assert list((tmp_path / "evidence").glob("*.dmesg"))


@pytest.mark.parametrize("mitigation", scen.MITIGATIONS)
def test_mitigation_verdicts_match_facts(mitigation, tmp_path):
    """Each workaround on the affected kernel does what FACTS.md predicts for this race."""
    predicted = scen.load("generic-rx-race")["mitigations"][mitigation]
    p = racelab("repro", "generic-rx-race", "--kernel", "6.1.192+revert-generic-rx",
                "--mitigation", mitigation, "--budget", "25s", "--out", str(tmp_path), "--json")
    assert p.returncode in (0, 1), p.stderr[-4000:]
    (row,) = json.loads((tmp_path / "summary.json").read_text())["rows"]
    want = "NOT REPRODUCED" if predicted == "prevents" else "REPRODUCED"
    assert row["verdict"] == want, f"{mitigation}: FACTS.md predicts {predicted}, got {row['verdict']}: {row}"
    assert p.returncode == 0, "repro's exit code follows the catalog + mitigation expectation"
