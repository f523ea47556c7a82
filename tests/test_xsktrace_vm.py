"""The guest's trace scanner in a real run: `racelab repro generic-rx-race` on the default kernels.

The fixed kernel's clean control is counted in its guest by xsktrace (0 window hits) and its
trace never leaves the guest; the affected kernel's trace (hits, a violation marker) is still
fetched and analysed on the host, where its flight recorder is read.  Kernels and the image come
from the cache.  Run under `flock /tmp/racelab-vm.lock`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
AFFECTED, FIXED = "6.1.192+revert-generic-rx", "6.1.192"


def repro(out: Path, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "lab.cli", "repro", "generic-rx-race", *args, "--out", str(out),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def test_a_clean_control_is_analysed_in_its_guest(tmp_path):
    summary = repro(tmp_path / "both", "--budget", "40s")
    rows = {r["kernel"]: r for r in summary["rows"]}
    targets = {t["kernel"]: t for t in summary["targets"]}
    assert set(rows) == {AFFECTED, FIXED}

    fixed = targets[FIXED]["evidence"]
    assert rows[FIXED]["verdict"] == "NOT REPRODUCED" and "0 window hits" in rows[FIXED]["verdict_text"]
    assert fixed["analysed_in"] == "guest" and fixed["trace_needed"] is False, fixed.get("guest_analysis_note")
    assert fixed["trace_file"] is None and "trace_path" not in fixed and fixed["guest_trace_path"]
    assert fixed["available"] and fixed["window_hits"] == 0 and fixed["receives"] > 10_000
    assert fixed["span_s"] > 1 and fixed["recorder_problems"] == []
    g = fixed["guest_analysis"]
    assert g["trace_bytes"] > 1 << 20 and 0 <= g["seconds"] <= g["wall_seconds"] < 30
    assert not list((tmp_path / "both" / "evidence").glob(f"{FIXED}_*.trace")), "the clean trace was fetched"
    assert 0 <= summary["phases"]["by_kernel"][FIXED]["evidence"] < summary["phases"]["wall"]

    # the race sometimes takes the affected guest down with its trace (a kernel splat): again, alone
    assert rows[AFFECTED]["verdict"] == "REPRODUCED"
    for attempt in (1, 2):
        if targets[AFFECTED]["reason"] != "guest-crashed":
            break
        print(f"attempt {attempt}: {AFFECTED} crashed of a kernel splat; running it again")
        again = repro(tmp_path / f"again{attempt}", "--kernel", AFFECTED, "--budget", "20s")
        targets = {t["kernel"]: t for t in again["targets"]}
    assert targets[AFFECTED]["reason"] != "guest-crashed", f"{AFFECTED} crashed in every attempt"
    bad = targets[AFFECTED]["evidence"]
    assert bad["analysed_in"] == "host" and bad["trace_needed"] is True and Path(bad["trace_file"]).is_file()
    assert bad["guest_analysis"]["overlap_hits"] == bad["overlap_hits"] > 0
    assert bad["interleaving_focus"] == "violation" and bad["violation_mark"].startswith("racelab violation")
