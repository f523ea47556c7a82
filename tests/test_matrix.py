from lab import matrix as m
from lab import report
from lab import verdict as v


def row(kind_counts, packets=1000):
    return v.decide("k", vms=1, packets=packets, seconds=10, wall=12, by_kind=kind_counts, first_violation_s=None)


def test_cell_outcome():
    assert m.cell_outcome("clean", row({})) == m.PASS
    assert m.cell_outcome("clean", row({"order": 1})) == m.FAIL
    assert m.cell_outcome("reproduced", row({"order": 1})) == m.PASS
    assert m.cell_outcome("reproduced", row({})) == m.MISSED
    assert m.cell_outcome("clean", row({}, packets=0)) == m.ERROR


def test_expected_from_catalog_affected():
    class K:
        affected = ("generic-rx-race",)
    assert m.expected_for(K, "generic-rx-race") == "reproduced"
    assert m.expected_for(K, "veth-napi-race") == "clean"


def test_junit_round_trip_and_heatmap(tmp_path):
    cells = [
        m.Cell("6.1.192", "generic-rx-race", "clean", row({}), m.PASS, str(tmp_path / "a"), status=m.PASSED),
        m.Cell("6.1.192+revert-generic-rx", "generic-rx-race", "reproduced", row({"order": 5}), m.PASS,
               status=m.PASSED),
        m.Cell("6.1.192+revert-veth-napi", "veth-napi-race", "reproduced", row({}), m.MISSED, status=m.SKIPPED),
        m.Cell("deb:6.1.0-47-amd64", "veth-napi-race", "clean", row({"poison": 1}), m.FAIL, status=m.FAILED),
        m.Cell("bad", "veth-napi-race", "clean", None, m.ERROR, error="LostVM: guest died"),
    ]
    report.write_junit(tmp_path / "j.xml", "racelab.matrix", m.junit_cases(cells))
    parsed = m.parse_junit(tmp_path / "j.xml")
    assert parsed[("generic-rx-race", "6.1.192")]["verdict"] == "NOT REPRODUCED"
    assert parsed[("generic-rx-race", "6.1.192+revert-generic-rx")]["outcome"] == "pass"
    assert parsed[("veth-napi-race", "6.1.192+revert-veth-napi")]["outcome"] == m.MISSED
    assert parsed[("veth-napi-race", "deb:6.1.0-47-amd64")]["outcome"] == "fail"
    assert parsed[("veth-napi-race", "bad")]["verdict"] == "error"
    text = (tmp_path / "j.xml").read_text()
    assert 'failures="1"' in text and 'skipped="1"' in text and 'errors="1"' in text
    grid = [cells[0], m.Cell("6.1.192", "veth-napi-race", "clean", row({"poison": 2}), m.FAIL, status=m.FAILED)]
    m.write_heatmap(tmp_path / "h.html", grid, ["6.1.192"], ["generic-rx-race", "veth-napi-race"])
    page = (tmp_path / "h.html").read_text()
    assert "#27ae60" in page and "#c0392b" in page and "REPRODUCED (2 viol)" in page


def wrow(hits, kinds=None):
    return v.decide("k", vms=1, packets=50_000, seconds=10, wall=12, by_kind=kinds or {},
                    first_violation_s=None, window_hits=hits, window_available=True)


def test_cells_judge_the_level_they_name():
    # a fixed kernel's window hit fails its cell: the window is the race
    assert m.cell_outcome("clean", wrow(4)) == m.FAIL
    assert m.cell_outcome("clean", wrow(0)) == m.PASS
    assert m.cell_outcome("window", wrow(4)) == m.PASS
    assert m.cell_outcome("window", wrow(0, {"poison": 1})) == m.PASS
    assert m.cell_outcome("window", wrow(0)) == m.MISSED
    # judged at corruption, a window hit is not enough: missed, never pass
    assert m.cell_outcome("reproduced", wrow(4)) == m.MISSED
    c = m.Cell("6.1.192+revert-veth-napi", "veth-napi-race", "window", wrow(4), m.PASS)
    assert m.cell_text(c) == ("WINDOW HIT (4 interleavings, no corruption in 50,000 pkts) "
                              "[pass, judged: window]")
    assert "judged: clean" in m.cell_text(m.Cell("6.1.192", "veth-napi-race", "clean", wrow(0), m.PASS))


def test_a_rare_corruption_scenario_judges_affected_kernels_at_the_window():
    class K:
        affected = ("generic-rx-race", "veth-napi-race")
    assert m.expected_for(K, "veth-napi-race") == "window"
    assert m.expected_for(K, "generic-rx-race") == "reproduced"

    class Fixed:
        affected = ()
    assert m.expected_for(Fixed, "veth-napi-race") == "clean"


def test_grid_cells_that_judge_the_window_collect_the_trace():
    from lab.racelab_grid import trace_for
    assert trace_for({"expected": "window"}, {"corruption_rare": False}) == ("trace",)
    assert trace_for({"expected": "clean"}, {"corruption_rare": True}) == ("trace",)
    assert trace_for({"expected": "reproduced"}, {"corruption_rare": False}) == ()


def test_run_junit_names_the_level_a_window_hit_falls_short_of(tmp_path):
    import xml.etree.ElementTree as ET

    from lab import report
    rows = [wrow(4)]
    for exp, failed in (("window", False), ("reproduced", True), ("clean", True)):
        report.write_junit(tmp_path / "j.xml", "s", report.junit_cases(rows, "s", {"k": exp}))
        fail = ET.parse(tmp_path / "j.xml").getroot().find("testcase/failure")
        assert (fail is not None) == failed
        if failed:
            assert fail.get("message").startswith(f"expected {exp}, got WINDOW HIT (4 interleavings")


def test_run_junit_counts_an_inconclusive_kernel_as_an_error_not_a_failure(tmp_path):
    import dataclasses
    import xml.etree.ElementTree as ET

    rows = [dataclasses.replace(wrow(4), kernel="lost", verdict=v.INCONCLUSIVE), wrow(4)]
    report.write_junit(tmp_path / "j.xml", "s", report.junit_cases(rows, "s", {"k": "reproduced"}))
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "1")
    assert suite.find("testcase[@name='lost']/error") is not None


def test_matrix_json_puts_the_document_alone_on_stdout(monkeypatch, tmp_path, capsys):
    """matrix --json: stdout is matrix.json (schema_version 1), the grid and the results
    line go to stderr.  The cells are judged from rows a fake run_cell gives (no VMs)."""
    import json
    import types
    from pathlib import Path

    from lab import fleet, image
    from lab import matrix as m
    from lab import verdict as v

    monkeypatch.setattr(fleet, "preflight_vm", lambda: None)
    monkeypatch.setattr(fleet, "build_kernels", lambda names, progress=True: [None] * len(names))
    monkeypatch.setattr(image, "ensure_image", lambda progress=True: None)

    def run_vm(cfg, **kw):
        k = cfg.kernels[0]
        return types.SimpleNamespace(out=Path(cfg.out), meta={}, rows=[v.decide(
            k, vms=1, packets=1000, seconds=5, wall=6, by_kind={"order": 1} if "+" in k else {},
            first_violation_s=0.1)])
    monkeypatch.setattr(fleet, "run_vm", run_vm)
    a = m.MatrixArgs(kernels="6.1.192,6.1.192+revert-generic-rx", scenarios="generic-rx-race",
                     budget="5s", vms=1, jobs=1, out=str(tmp_path / "m"), uris=(), as_json=True, missed="fail",
                     tap=str(tmp_path / "t" / "m.tap"), kcidb=str(tmp_path / "k.json"))
    assert m.main(a) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and len(doc["cells"]) == 2 and doc["missed"] == "fail"
    assert [c["status"] for c in doc["cells"]] == ["passed", "passed"]
    assert doc == json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert "racelab matrix" in err and "results:" in err
    from lab import results
    assert results.problems(doc, "matrix") == []
    # --tap and --kcidb: written beside, said on stderr (stdout stays the document)
    tap = (tmp_path / "t" / "m.tap").read_text()
    assert tap.startswith("TAP version 13\n1..2\nok 1 - 6.1.192 generic-rx-race: NOT REPRODUCED\n")
    assert "ok 2 - 6.1.192+revert-generic-rx generic-rx-race: REPRODUCED\n" in tap
    kc = json.loads((tmp_path / "k.json").read_text())
    assert [t["status"] for t in kc["tests"]] == ["PASS", "PASS"] and len(kc["builds"]) == 2
    assert f"TAP: {tmp_path / 't' / 'm.tap'}" in err and f"KCIDB: {tmp_path / 'k.json'}" in err


# ---------------------------------------------------------------- the missed policy: one decision

def test_decide_counts_a_missed_affected_cell_as_the_policy_says():
    clean, hit = row({}), row({"order": 3})
    for missed in ("fail", "skip"):
        # what the cell showed does not depend on the policy; only a missed cell's count does
        assert m.decide("6.1.192", "generic-rx-race", "clean", clean, budget=60, missed=missed).status == m.PASSED
        assert m.decide("6.1.192", "generic-rx-race", "clean", hit, budget=60, missed=missed).status == m.FAILED
        assert m.decide("k", "generic-rx-race", "reproduced", hit, budget=60, missed=missed).status == m.PASSED
        assert m.decide("k", "generic-rx-race", "clean", row({}, packets=0), budget=60,
                        missed=missed).status == m.ERROR
    d = m.decide("6.1.192+revert-generic-rx", "generic-rx-race", "reproduced", clean, budget=300)
    assert (d.outcome, d.status) == (m.MISSED, m.FAILED), "the default: an affected kernel that misses is news"
    assert "did not reach the reproduced level within 300s" in d.message and "rate <" in d.message
    assert m.decide("6.1.192+revert-generic-rx", "generic-rx-race", "reproduced", clean, budget=300,
                    missed="fail") == d
    skip = m.decide("6.1.192+revert-generic-rx", "generic-rx-race", "reproduced", clean, budget=300, missed="skip")
    assert (skip.outcome, skip.status, skip.message) == (m.MISSED, m.SKIPPED, d.message)
    fixed = m.decide("6.1.192", "generic-rx-race", "clean", hit, budget=300)
    assert "expected to be fixed for generic-rx-race but showed REPRODUCED" in fixed.message
    import pytest
    with pytest.raises(ValueError, match="unknown missed policy 'maybe'"):
        m.decide("k", "s", "clean", clean, budget=1, missed="maybe")


def test_every_surface_has_the_same_default_and_choices():
    """racelab matrix --missed and pytest --racelab-missed declare the policy's default without
    importing lab.matrix (startup, TAB): this keeps them lab.matrix's."""
    from lab import cli
    from lab import pytest_plugin as plugin
    a = cli.make_parser().parse_args(["matrix", "--kernels", "k", "--scenarios", "s"])
    assert a.missed == m.DEFAULT_MISSED == "fail"
    sub = next(x for x in cli.make_parser()._actions if x.dest == "cmd")
    missed = next(x for x in sub.choices["matrix"]._actions if x.dest == "missed")
    assert tuple(missed.choices) == m.MISSED_POLICIES

    class Group:
        def addoption(self, name, **kw):
            opts[name] = kw
    opts = {}
    plugin.pytest_addoption(type("P", (), {"getgroup": lambda self, *a: Group()})())
    assert opts["--racelab-missed"]["default"] == m.DEFAULT_MISSED
