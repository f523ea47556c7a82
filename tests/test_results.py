"""summary.json against its JSON Schema (lab/schemas): a real run's output conforms, and
documents that break the contract are caught.  Real runs are checked too, in test_cli_root
(netns) and test_repro_vm (VMs)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab import results

ROOT = Path(__file__).resolve().parent.parent
# a real `racelab repro generic-rx-race` summary (VMs, TCG), its long arrays cut short
REAL = json.loads((ROOT / "tests/fixtures/results/summary-repro-generic-vm.json").read_text())


def test_a_real_repro_summary_conforms():
    assert results.problems(REAL) == []
    assert REAL["schema_version"] == results.SUMMARY_VERSION


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d["rows"][0].update(verdict="CLEAN"), "rows/0/verdict"),
    (lambda d: d["rows"][0].update(packets=-1), "rows/0/packets"),
    (lambda d: d["rows"][0]["by_kind"].update(order="3"), "rows/0/by_kind/order"),
    (lambda d: d["targets"][1].update(infra_error=3), "targets/1/infra_error"),
    (lambda d: d["provenance"].pop("rerun"), "rerun"),
    (lambda d: d.update(backend="kvm"), "backend"),
])
def test_a_broken_summary_is_named_where_it_breaks(break_it, where):
    doc = copy.deepcopy(REAL)
    break_it(doc)
    found = results.problems(doc)
    assert found and any(where in p for p in found), found


def test_validate_command(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(REAL))
    broken = copy.deepcopy(REAL)
    broken["rows"][0]["verdict"] = "MAYBE"
    bad.write_text(json.dumps(broken))
    run = lambda f: subprocess.run([sys.executable, "-m", "lab.results", "validate", str(f)],  # noqa: E731
                                   cwd=ROOT, capture_output=True, text=True, timeout=60)
    p = run(good)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr
    p = run(bad)
    assert p.returncode == 1 and "rows/0/verdict" in p.stdout, p.stdout + p.stderr


def test_the_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator
    Draft202012Validator.check_schema(results.schema())
