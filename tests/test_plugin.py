"""The pytest plugin on a small grid, with two workers, including a deliberate mismatch."""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.root
def test_grid_with_two_workers_passes_and_fails_per_cell(tmp_path):
    junit = tmp_path / "grid.xml"
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-v",
         "--racelab-kernels=host", "--racelab-scenarios=generic-rx-race,veth-napi-race",
         "--racelab-backend=netns", "--racelab-budget=3s",
         # deliberate mismatch: the host kernel has the veth fix, so this cell must fail
         "--racelab-expect=host:veth-napi-race=reproduced",
         f"--junitxml={junit}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RACELAB_GRID_OUT": str(tmp_path)})
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    cases = {tc.get("name"): tc for tc in ET.parse(junit).getroot().iter("testcase")}
    assert set(cases) == {"test_cell[generic-rx-race-host]", "test_cell[veth-napi-race-host]"}
    ok, bad = cases["test_cell[generic-rx-race-host]"], cases["test_cell[veth-napi-race-host]"]
    assert ok.find("failure") is None
    failure = bad.find("failure")
    assert failure is not None and "did not reach the reproduced level" in failure.get("message")
    props = {pr.get("name"): pr.get("value") for pr in ok.iter("property")}
    assert props["verdict"] == "NOT REPRODUCED" and int(props["packets"]) > 0 and props["expected"] == "clean"
    assert "rate <" in props["rate"]
    # -v: xdist names the worker of each result ("[gw1] [ 50%] PASSED ...::test_cell[...]");
    # two cells on two workers go one to each (xdist's load scheduling, fewer items than 2 per worker)
    result = re.compile(r"^\[(gw\d+)\] \[\s*\d+%\] (?:PASSED|FAILED) \S+::(test_cell\[[^\]]+\])", re.M)
    ran_on = {cell: worker for worker, cell in result.findall(p.stdout)}
    assert set(ran_on) == set(cases) and len(set(ran_on.values())) == 2, p.stdout[-3000:]
