"""TAP 13 and KCIDB exports (lab/export.py): the TAP stream read back by Perl's
TAP::Parser (an independent consumer), each point judged as the command's exit code
judges its row or cell, and the KCIDB document checked against kcidb-io's own v4.0
JSON schema (vendored under tests/fixtures/kcidb)."""
import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import cli, export
from lab import matrix as m
from lab import verdict as v
from lab.config import RunConfig
from lab.session import Outcome

ROOT = Path(__file__).resolve().parent.parent
KCIDB_SCHEMA = json.loads((ROOT / "tests/fixtures/kcidb/kcidb-io.schema.v4.0.json").read_text())
# a real `racelab matrix --kernels 6.1.192,6.1.192+revert-generic-rx --scenarios generic-rx-race`
MATRIX = json.loads((ROOT / "tests/fixtures/results/matrix-generic-vm.json").read_text())

# TAP::Parser's view of a stream, as JSON: what a Perl harness (prove) would make of it
READ_TAP = r"""
use strict; use warnings; use TAP::Parser; use JSON::PP;
local $/; my $p = TAP::Parser->new({tap => scalar <STDIN>});
my (@points, $last);
while (my $r = $p->next) {
    if ($r->is_test) {
        $last = {n => $r->number, ok => ($r->is_ok ? 1 : 0), skip => ($r->has_skip ? 1 : 0),
                 description => $r->description, explanation => $r->explanation};
        push @points, $last;
    } elsif ($r->is_yaml) { $last->{yaml} = $r->data }
}
print JSON::PP->new->canonical->encode({version => $p->version, plan => $p->plan, passed => [$p->passed],
    failed => [$p->failed], skipped => [$p->skipped], errors => [$p->parse_errors],
    points => \@points});
"""


def read_tap(text):
    if not shutil.which("perl") or subprocess.run(["perl", "-MTAP::Parser", "-e1"]).returncode:
        pytest.skip("needs Perl's TAP::Parser (Debian: apt-get install perl)")
    p = subprocess.run(["perl", "-e", READ_TAP], input=text, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def row(kernel="k", kinds=None, packets=10_000, **kw):
    return v.decide(kernel, vms=1, packets=packets, seconds=5.0, wall=9.5, by_kind=kinds or {},
                    first_violation_s=0.25 if kinds else None, **kw)


ROWS = {
    "reproduced": lambda: row(kinds={"order": 45, "late": 3}),
    "window": lambda: row(window_hits=7, window_available=True),
    "clean": lambda: row(window_available=True),
    "inconclusive": lambda: row(packets=0, infra_errors=["LostVM: guest 1 died"]),
}


@pytest.mark.parametrize("verdict", sorted(ROWS))
@pytest.mark.parametrize("expect", [None, "reproduced", "window", "clean"])
def test_run_and_repro_points_are_judged_as_their_exit_codes(tmp_path, capsys, verdict, expect):
    """ok exactly when the command's exit code says the row is fine: run's --expect,
    repro's --expect or else the catalog's expectation of each kernel."""
    r = ROWS[verdict]()
    tap = tmp_path / "t.tap"
    cfg = RunConfig(scenario="generic-rx-race", scenario_data={}, expect=expect)
    rc = cli._report(Outcome([r], [], tmp_path, {}), cfg, False, str(tap))
    first = tap.read_text().splitlines()[2]
    assert first.startswith("ok 1 - " if rc == 0 else "not ok 1 - "), (rc, first)
    # repro without --expect: the catalog's level for the kernel, from the run's provenance
    cfg = RunConfig(scenario="generic-rx-race", scenario_data={})
    rc = cli._report_repro(Outcome([r], [], tmp_path, {"expected": {"k": expect} if expect else {}}), cfg,
                           False, str(tap))
    first = tap.read_text().splitlines()[2]
    assert first.startswith("ok 1 - " if rc == 0 else "not ok 1 - "), (rc, first)
    assert first.endswith(f"k generic-rx-race: {r.verdict}")
    capsys.readouterr()


def test_a_run_tap_reads_back_with_its_diagnostics(tmp_path):
    repro = row("6.1.192+revert-generic-rx", kinds={"order": 45, "late": 3})
    clean = row("6.1.192", kinds={"order": 1})
    lost = row("6.1.192+x", packets=0, infra_errors=["LostVM: guest 1 died"])
    levels = {"6.1.192+revert-generic-rx": "reproduced", "6.1.192": "clean", "6.1.192+x": "clean"}
    text = export.tap(export.row_points([repro, clean, lost], "generic-rx-race", levels))
    assert text.startswith("TAP version 13\n1..3\nok 1 - 6.1.192+revert-generic-rx generic-rx-race: REPRODUCED\n")
    t = read_tap(text)
    assert t["errors"] == [] and t["version"] == 13 and t["plan"] == "1..3"
    assert (t["passed"], t["failed"], t["skipped"]) == ([1], [2, 3], [])
    ok, bad, inconclusive = (p["yaml"] for p in t["points"])
    assert ok["verdict"] == "REPRODUCED" and ok["packets"] == "10000" and ok["seconds"] == "5.0"
    assert ok["violations"] == {"order": "45", "late": "3"} and ok["expected"] == "reproduced"
    assert "message" not in ok
    assert bad["message"] == "expected clean, got REPRODUCED"
    assert inconclusive["message"] == "INCONCLUSIVE (infrastructure: LostVM: guest 1 died)"
    assert inconclusive["first_violation_s"] is None and inconclusive["violations"] == {}


def _cells(tmp_path, missed):
    """Four cells judged by lab.matrix.decide(), the matrix's own decision, under `missed`."""
    def cell(kernel, scenario, expected, r, out=""):
        c = m.Cell(kernel, scenario, expected, r, out=out)
        d = m.decide(kernel, scenario, expected, r, budget=300, missed=missed)
        c.outcome, c.status, c.message = d.outcome, d.status, d.message
        return c
    lost = m.Cell("bad#1", "veth-napi-race", "clean", None, m.ERROR, error="LostVM: guest died")
    lost.status, lost.message = m.ERROR, "infrastructure: LostVM: guest died"
    return [cell("6.1.192", "generic-rx-race", "clean", row("6.1.192"), str(tmp_path / "a")),
            cell("6.1.192+revert-veth-napi", "veth-napi-race", "window", row()),
            cell("deb:6.1.0-47-amd64", "veth-napi-race", "clean", row(kinds={"poison": 1})),
            lost]


def test_matrix_points_count_a_cell_as_the_matrix_does(tmp_path):
    """--missed skip: the affected kernel that missed its level is ok # SKIP, as junit.xml's
    <skipped> and the exit code (0) have it; --missed fail (the default): it is not ok."""
    skip = _cells(tmp_path, "skip")
    text = export.tap(export.cell_points(skip))
    assert "ok 2 - 6.1.192+revert-veth-napi veth-napi-race: NOT REPRODUCED # SKIP 6.1.192+revert-veth-napi " \
           "is affected by veth-napi-race but did not reach the window level within 300s" in text
    assert "not ok 4 - bad\\#1 veth-napi-race: ERROR\n" in text     # a '#' in a name starts no directive
    t = read_tap(text)
    assert t["errors"] == [] and (t["passed"], t["failed"], t["skipped"]) == ([1, 2], [3, 4], [2])
    assert t["points"][1]["explanation"].startswith("6.1.192+revert-veth-napi is affected by veth-napi-race")
    assert t["points"][3]["description"] == "- bad\\#1 veth-napi-race: ERROR"
    passed, missed, failed, error = (p["yaml"] for p in t["points"])
    assert passed["results"] == str(tmp_path / "a") and passed["outcome"] == "pass"
    assert failed["message"].startswith("deb:6.1.0-47-amd64 is expected to be fixed for veth-napi-race but showed")
    assert failed["violations"] == {"poison": "1"}
    assert error == {"message": "infrastructure: LostVM: guest died", "expected": "clean", "outcome": "error"}
    # the matrix's exit code: 0 with pass and skipped cells only
    assert all(p.ok for p in export.cell_points(skip[:2]))
    fail = _cells(tmp_path, "fail")
    t = read_tap(export.tap(export.cell_points(fail)))
    assert t["errors"] == [] and (t["passed"], t["failed"], t["skipped"]) == ([1], [2, 3, 4], [])
    assert t["points"][1]["yaml"]["message"].startswith("6.1.192+revert-veth-napi is affected by")


def test_the_tap_file_and_its_directory_are_made(tmp_path):
    path = export.write_tap(tmp_path / "new" / "dir" / "x.tap", [])
    assert path.read_text() == "TAP version 13\n1..0\n"


@pytest.mark.parametrize("how", ["directory", "under-a-file", "proc"])
def test_an_unwritable_export_path_is_named(tmp_path, how):
    (tmp_path / "file").write_text("kept")
    path = {"directory": tmp_path, "under-a-file": tmp_path / "file" / "x.tap",
            "proc": Path("/proc/racelab-x/x.tap")}[how]
    why = export.file_problem(path)
    assert why and {"directory": "is a directory", "under-a-file": "is not a directory",
                    "proc": "/proc"}[how] in why, why
    assert export.file_problem(tmp_path / "file") is None and (tmp_path / "file").read_text() == "kept"
    assert export.file_problem(tmp_path / "a" / "b" / "x.tap") is None and not (tmp_path / "a").exists()


# --- KCIDB -----------------------------------------------------------------------

def kcidb_problems(doc):
    from jsonschema import Draft7Validator
    val = Draft7Validator(KCIDB_SCHEMA, format_checker=Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in val.iter_errors(doc)]


def test_a_real_matrix_as_kcidb_follows_kcidbs_schema():
    doc = export.kcidb(MATRIX)
    assert kcidb_problems(doc) == []
    assert doc["version"] == {"major": 4, "minor": 0}
    cells = MATRIX["cells"]
    assert len(doc["builds"]) == len({c["kernel"] for c in cells}) and len(doc["tests"]) == len(cells)
    for c, t in zip(cells, doc["tests"], strict=True):
        (b,) = [b for b in doc["builds"] if b["id"] == t["build_id"]]
        assert b["id"] == f"racelab:{c['build']['key']}" and b["misc"]["config_hash"] == c["build"]["config_hash"]
        assert b["compiler"] == c["build"]["compiler"] and b["comment"] == c["kernel"]
        assert any(co["id"] == b["checkout_id"] for co in doc["checkouts"])
        assert t["path"] == "racelab.generic-rx-race" and t["status"] == "PASS"
        assert t["misc"]["verdict"] == c["row"]["verdict"] and t["misc"]["by_kind"] == c["row"]["by_kind"]
        env = t["environment"]["misc"]
        assert env["host_kernel"] == c["environment"]["host_kernel"] and env["qemu"].startswith("QEMU")
        assert env["accelerator"] in ("kvm", "tcg")
    assert len({t["id"] for t in doc["tests"]}) == len(cells)
    # the revert patch's checkout: patchset_hash from the sums the run recorded, as kcidb-io's shell line has it
    shell = subprocess.run("sha256sum kernels/patches/6.1/revert-generic-rx.patch | cut -c-64 | sha256sum | cut -c-64",
                           shell=True, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert sorted(co["patchset_hash"] for co in doc["checkouts"]) == sorted(["", shell])
    assert all(x["origin"] == "racelab" and x["id"].startswith("racelab:")
               for x in doc["checkouts"] + doc["builds"] + doc["tests"])


def test_the_kcidb_check_has_teeth():
    doc = export.kcidb(MATRIX)
    for break_it, where in ((lambda d: d["tests"][0].update(status="CLEAN"), "tests/0/status"),
                            (lambda d: d["builds"][0].update(id="no-origin"), "builds/0/id"),
                            (lambda d: d["tests"][0].pop("build_id"), "tests/0"),
                            (lambda d: d["tests"][0].update(path="racelab.generic rx"), "tests/0/path")):
        broken = copy.deepcopy(doc)
        break_it(broken)
        found = kcidb_problems(broken)
        assert any(p.startswith(where) for p in found), found


def test_kcidb_statuses_follow_the_cells_outcomes(tmp_path):
    for missed, status in (("skip", "SKIP"), ("fail", "FAIL")):
        cells = _cells(tmp_path, missed)
        doc = export.kcidb({"schema_version": 1, "seed": 7, "cells": [c.to_dict() for c in cells]})
        assert kcidb_problems(doc) == []
        assert [t["status"] for t in doc["tests"]] == ["PASS", status, "FAIL", "ERROR"]
        assert doc["tests"][3]["log_excerpt"] == "LostVM: guest died" and "duration" not in doc["tests"][3]
    # a matrix.json from before cells carried a status: its outcome decides, a missed cell skipped
    old = [{k: v for k, v in c.to_dict().items() if k not in ("status", "message")} for c in _cells(tmp_path, "fail")]
    doc = export.kcidb({"schema_version": 1, "seed": 7, "cells": old})
    assert [t["status"] for t in doc["tests"]] == ["PASS", "SKIP", "FAIL", "ERROR"]


def test_patchset_hash_is_kcidbs(tmp_path):
    """As kcidb-io defines it: sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64."""
    for name, text in (("a.patch", "--- a\n+++ b\n"), ("b.patch", "other\n")):
        (tmp_path / name).write_text(text)
    shell = subprocess.run("sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert export.patchset_hash([str(tmp_path / "a.patch"), str(tmp_path / "b.patch")]) == shell
    assert export.patchset_hash([]) == ""
    assert export.patchset_hash([str(tmp_path / "gone.patch")]) is None
    # the sums matrix.json recorded stand for files that are gone since
    sums = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.patch", "b.patch")]
    assert export.patchset_hash(["/gone/a.patch", "/gone/b.patch"], sums) == shell


def test_matrix_records_the_patches_it_asked_for_with_their_sums(tmp_path):
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a\n+++ b\n")
    art = type("Artifact", (), {"key": "k", "patches": ("/old/clone/fix.patch",), "config_hash": "c"})()
    spec = type("Spec", (), {"patches": (str(patch),)})()
    info = m.build_info(art, spec)
    assert info["patches"] == [str(patch)]
    assert info["patches_sha256"] == [hashlib.sha256(patch.read_bytes()).hexdigest()]
    assert "patches_sha256" not in m.build_info(art) and m.build_info(None) == {}


def test_one_source_with_two_configs_is_one_checkout_two_builds():
    base = {"source": "debsrc:linux-source-6.1", "source_identity": "debsrc:linux-source-6.1=6.1.192-3",
            "patches": [], "compiler": "gcc 12"}
    cells = [{"kernel": k, "scenario": "generic-rx-race", "expected": "clean", "outcome": "pass", "out": "",
              "error": "", "row": None, "build": {**base, "key": key, "fragments": frags}}
             for k, key, frags in (("6.1.192", "k1", ["kernels/config/lab.config"]),
                                   ("6.1.192+kasan.config", "k2", ["lab.config", "kasan.config"]))]
    doc = export.kcidb({"seed": 1, "cells": cells})
    assert len(doc["checkouts"]) == 1 and [b["config_name"] for b in doc["builds"]] == ["lab", "lab+kasan"]
    assert doc["checkouts"][0]["patchset_hash"] == ""


def test_the_module_converts_a_matrix_json(tmp_path):
    import sys
    f = tmp_path / "matrix.json"
    f.write_text(json.dumps(MATRIX))
    p = subprocess.run([sys.executable, "-m", "lab.export", "kcidb", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == export.kcidb(MATRIX)
