from lab import matrix as m
from lab import verdict as v


def row(kind_counts, packets=1000):
    return v.decide("k", vms=1, packets=packets, seconds=10, wall=12, by_kind=kind_counts, first_violation_s=None)


def test_judge():
    assert m.judge("clean", row({})) == m.PASS
    assert m.judge("clean", row({"order": 1})) == m.FAIL
    assert m.judge("reproduced", row({"order": 1})) == m.PASS
    assert m.judge("reproduced", row({})) == m.MISSED
    assert m.judge("clean", row({}, packets=0)) == m.ERROR


def test_expected_from_catalog_affected():
    class K:
        affected = ("generic-rx-race",)
    assert m.expected_for(K, "generic-rx-race") == "reproduced"
    assert m.expected_for(K, "veth-napi-race") == "clean"


def test_junit_round_trip_and_heatmap(tmp_path):
    cells = [
        m.Cell("6.1.192", "generic-rx-race", "clean", row({}), m.PASS, str(tmp_path / "a")),
        m.Cell("6.1.192+revert-generic-rx", "generic-rx-race", "reproduced", row({"order": 5}), m.PASS),
        m.Cell("6.1.192+revert-veth-napi", "veth-napi-race", "reproduced", row({}), m.MISSED),
        m.Cell("deb:6.1.0-47-amd64", "veth-napi-race", "clean", row({"poison": 1}), m.FAIL),
        m.Cell("bad", "veth-napi-race", "clean", None, m.ERROR, error="LostVM: guest died"),
    ]
    m.write_junit(tmp_path / "j.xml", cells)
    parsed = m.parse_junit(tmp_path / "j.xml")
    assert parsed[("generic-rx-race", "6.1.192")]["verdict"] == "NOT REPRODUCED"
    assert parsed[("generic-rx-race", "6.1.192+revert-generic-rx")]["outcome"] == "pass"
    assert parsed[("veth-napi-race", "6.1.192+revert-veth-napi")]["outcome"] == m.MISSED
    assert parsed[("veth-napi-race", "deb:6.1.0-47-amd64")]["outcome"] == "fail"
    assert parsed[("veth-napi-race", "bad")]["verdict"] == "error"
    text = (tmp_path / "j.xml").read_text()
    assert 'failures="1"' in text and 'skipped="1"' in text and 'errors="1"' in text
    grid = [cells[0], m.Cell("6.1.192", "veth-napi-race", "clean", row({"poison": 2}), m.FAIL)]
    m.write_heatmap(tmp_path / "h.html", grid, ["6.1.192"], ["generic-rx-race", "veth-napi-race"])
    page = (tmp_path / "h.html").read_text()
    assert "#27ae60" in page and "#c0392b" in page and "REPRODUCED (2 viol)" in page
