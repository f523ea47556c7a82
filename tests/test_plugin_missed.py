"""One policy for an affected kernel that does not reach its level within the budget:
`racelab matrix --missed` and the pytest grid's `--racelab-missed` decide each cell with
lab.matrix.decide, so the same rows count the same on both surfaces, by default (fail) and
with either value.  No guest boots: fleet.run_vm is a fake that gives every cell a clean row,
so the fixed kernel passes and the affected one misses."""
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab import cli

pytest_plugins = ["pytester"]

FIXED, AFFECTED = "6.1.192", "6.1.192+revert-generic-rx"     # as the catalog says
SCENARIO = "generic-rx-race"


@pytest.fixture
def no_guests(monkeypatch):
    from lab import fleet, image
    from lab import verdict as v
    ran = []

    def run_vm(cfg, progress=True, expected=None):
        ran.append(cfg.kernels[0])
        return types.SimpleNamespace(out=Path(cfg.out), meta={}, rows=[v.decide(
            cfg.kernels[0], vms=1, packets=5000, seconds=5, wall=6, by_kind={}, first_violation_s=None)])
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    monkeypatch.setattr(fleet, "preflight_vm", lambda: None)
    monkeypatch.setattr(fleet, "build_kernels", lambda names, progress=True: [None] * len(names))
    monkeypatch.setattr(image, "ensure_image", lambda progress=True: None)
    return ran


def statuses(junit: Path, name_of) -> dict[str, tuple[str, str]]:  # noqa: ANN001
    """kernel -> (passed|failed|skipped|error, message) from a JUnit file."""
    out = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        for tag, status in (("failure", "failed"), ("skipped", "skipped"), ("error", "error")):
            el = tc.find(tag)
            if el is not None:
                out[name_of(tc)] = (status, el.get("message", ""))
                break
        else:
            out[name_of(tc)] = ("passed", "")
    return out


def run_matrix(tmp_path: Path, policy: str | None, capsys) -> tuple[int, dict]:  # noqa: ANN001
    out = tmp_path / "matrix"
    rc = cli.main(["matrix", "--kernels", f"{FIXED},{AFFECTED}", "--scenarios", SCENARIO, "--budget", "5s",
                   "--out", str(out), *(["--missed", policy] if policy else [])])
    capsys.readouterr()
    return rc, statuses(out / "junit.xml", lambda tc: tc.get("name"))


def run_grid(pytester, tmp_path: Path, policy: str | None) -> tuple[int, dict]:  # noqa: ANN001
    junit = tmp_path / "grid.xml"
    r = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", f"--racelab-kernels={FIXED},{AFFECTED}", f"--racelab-scenarios={SCENARIO}",
        "--racelab-budget=5s", *([f"--racelab-missed={policy}"] if policy else []), f"--junitxml={junit}")
    prefix = f"test_cell[{SCENARIO}-"
    return int(r.ret), statuses(junit, lambda tc: tc.get("name").removeprefix(prefix).removesuffix("]"))


@pytest.mark.parametrize("policy, affected, rc", [
    (None, "failed", 1),        # the default on both: the catalog says affected, so a miss is news
    ("fail", "failed", 1),
    ("skip", "skipped", 0),
])
def test_matrix_and_grid_count_a_missed_cell_alike(pytester, tmp_path, capsys, no_guests, policy, affected, rc):
    m_rc, m = run_matrix(tmp_path, policy, capsys)
    g_rc, g = run_grid(pytester, tmp_path, policy)
    assert sorted(no_guests) == sorted([FIXED, AFFECTED] * 2), "each surface ran each cell once"
    assert {k: s for k, (s, _) in m.items()} == {FIXED: "passed", AFFECTED: affected}
    assert {k: s for k, (s, _) in g.items()} == {FIXED: "passed", AFFECTED: affected}
    assert (m_rc, g_rc) == (rc, rc)
    for said in (m[AFFECTED][1], g[AFFECTED][1]):
        assert f"{AFFECTED} is affected by {SCENARIO} but did not reach the reproduced level within 5s" in said


def test_a_bad_missed_policy_is_refused_on_both_surfaces(pytester, capsys, no_guests):
    with pytest.raises(SystemExit) as e:        # argparse's choices: exit 2, before anything runs
        cli.main(["matrix", "--kernels", FIXED, "--scenarios", SCENARIO, "--missed", "maybe"])
    assert e.value.code == 2 and "--missed: invalid choice: 'maybe'" in capsys.readouterr().err
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--racelab-kernels={FIXED}",
                                     f"--racelab-scenarios={SCENARIO}", "--racelab-missed=maybe")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--racelab-missed 'maybe': one of fail, skip" in r.stderr.str()
    assert no_guests == []
