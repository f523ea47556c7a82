"""summary.json and matrix.json against their JSON Schemas (lab/schemas): real runs' output
conforms, and documents that break the contract are caught, named where they break.  Real
runs are checked too, in test_cli_root (netns) and test_repro_vm (VMs); bisect.json, made
by a whole bisection over a real git history, in test_bisect."""
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
# a real `racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx --scenarios generic-rx-race
# --budget 20s` (VMs, TCG)
MATRIX = json.loads((ROOT / "tests/fixtures/results/matrix-generic-vm.json").read_text())


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


def test_a_real_matrix_conforms():
    assert results.problems(MATRIX, "matrix") == []
    assert MATRIX["schema_version"] == results.MATRIX_VERSION
    assert {c["row"]["verdict"] for c in MATRIX["cells"]} == {"REPRODUCED", "NOT REPRODUCED"}


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d.pop("seed"), "'seed' is a required property"),
    (lambda d: d["cells"][0].update(outcome="passed"), "cells/0/outcome"),
    (lambda d: d["cells"][0].update(expected="dirty"), "cells/0/expected"),
    # the row is summary's: its definition is reached through the other file
    (lambda d: d["cells"][1]["row"].update(verdict="CLEAN"), "cells/1/row/verdict: 'CLEAN' is not one of"),
    (lambda d: d["cells"][1]["row"].pop("packets"), "cells/1/row: 'packets' is a required property"),
    (lambda d: d["cells"][1].update(row=[]), "cells/1/row: [] is not of type 'null'"),
    (lambda d: d["cells"][0]["build"].update(config_hash=7), "cells/0/build/config_hash"),
    (lambda d: d["cells"][0]["environment"].update(vcpus=0), "cells/0/environment/vcpus"),
])
def test_a_broken_matrix_is_named_where_it_breaks(break_it, where):
    doc = copy.deepcopy(MATRIX)
    break_it(doc)
    found = results.problems(doc, "matrix")
    assert found and any(where in p for p in found), found


def test_a_cell_without_a_row_is_allowed_but_not_a_row_of_the_wrong_shape():
    doc = copy.deepcopy(MATRIX)
    doc["cells"][0].update(row=None, outcome="error", error="LostVM: guest died")
    assert results.problems(doc, "matrix") == []
    doc["cells"][0]["row"] = {"verdict": "REPRODUCED"}
    assert results.problems(doc, "matrix")


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


def run_validate(*args):
    return subprocess.run([sys.executable, "-m", "lab.results", "validate", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_validate_tells_the_kinds_apart_by_name_or_content(tmp_path):
    (tmp_path / "matrix.json").write_text(json.dumps(MATRIX))
    p = run_validate(tmp_path / "matrix.json")
    assert p.returncode == 0 and "ok (matrix schema version 1)" in p.stdout, p.stdout + p.stderr
    renamed = tmp_path / "grid-of-tuesday.json"
    broken = copy.deepcopy(MATRIX)
    broken["cells"][0]["outcome"] = "maybe"
    renamed.write_text(json.dumps(broken))
    p = run_validate(renamed)                      # no telling name: its "cells" say it
    assert p.returncode == 1 and "cells/0/outcome" in p.stdout, p.stdout + p.stderr
    p = run_validate(renamed, "--kind", "summary")  # told otherwise, it is checked as that
    assert p.returncode == 1 and "'rows' is a required property" in p.stdout, p.stdout + p.stderr
    other = tmp_path / "other.json"
    other.write_text('{"schema_version": 1}')
    p = run_validate(other)
    assert p.returncode == 2 and "--kind" in p.stderr, p.stdout + p.stderr


@pytest.mark.parametrize("kind", sorted(results.VERSIONS))
def test_the_schemas_are_valid_draft_2020_12_schemas(kind):
    from jsonschema import Draft202012Validator
    s = results.schema(kind)
    Draft202012Validator.check_schema(s)
    assert s["properties"]["schema_version"] == {"const": results.VERSIONS[kind]}


def test_the_schemas_ship_with_the_package():
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lab"]
    shipped = {p.name for pattern in data for p in (ROOT / "lab").glob(pattern)}
    assert {f"{k}.schema.json" for k in results.VERSIONS} <= shipped
