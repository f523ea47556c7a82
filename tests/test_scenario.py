import copy
import tomllib

import pytest

from lab import scenario as scen
from lab.run import BadInput


@pytest.mark.parametrize("name", scen.available())
def test_shipped_scenarios_validate(name):
    s = scen.load(name)
    assert s.name == name
    assert s.bug["fix"] and s["kernels"]["affected"] != s["kernels"]["fixed"]
    spec = scen.to_topology(s)
    assert spec.validate() == []


def test_facts_commits_are_recorded():
    g = scen.load("generic-rx-race").bug
    v = scen.load("veth-napi-race").bug
    assert (g["fix"], g["fixed_in"], g["introduced_by"]) == ("bf0bdd1343ef", "5.3", "c497176cb2e4")
    assert (v["fix"], v["fixed_in"], v["introduced_by"]) == ("fa349e396e48", "6.2", "d1396004dd86")
    assert "a1356ac7749c" in g["follow_ups"]


def test_every_bad_field_is_named_at_once():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    bad = copy.deepcopy(raw)
    bad["load"]["senders"] = "two"
    bad["xdp"]["mode"] = "turbo"
    bad["checker"]["frame_size"] = 1000
    del bad["vm"]["vcpus"]
    bad["load"]["colour"] = "red"
    with pytest.raises(BadInput) as e:
        scen.from_data(bad)
    msg = str(e.value)
    for needle in ("load.senders", "xdp.mode", "checker.frame_size", "vm.vcpus: missing", "load.colour: unknown"):
        assert needle in msg, needle
    assert "5 problem(s)" in msg


def test_cross_field_checks():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    with pytest.raises(BadInput, match="checker.queues"):
        scen.from_data(raw, overrides={"checker.queues": 4})
    with pytest.raises(BadInput, match="load.iperf3"):
        scen.from_data(raw, overrides={"load.iperf3": True})


def test_unknown_scenario_suggests_close_matches():
    with pytest.raises(BadInput) as e:
        scen.load("generic-rx")
    assert "generic-rx-race" in e.value.hint


def test_malformed_toml_is_bad_input(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[bug\nname = ")
    with pytest.raises(BadInput, match="malformed TOML"):
        scen.load(str(p))


def test_name_must_match_file(tmp_path):
    p = tmp_path / "other.toml"
    p.write_text((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    with pytest.raises(BadInput, match="differs from the file name"):
        scen.load(str(p))


@pytest.mark.parametrize("m", scen.MITIGATIONS)
def test_mitigations_change_the_scenario(m):
    s = scen.load("veth-napi-race")
    t = scen.apply_mitigation(s, m)
    assert t.data != s.data
    assert scen.validate(t.data) == []


def test_forward_topology_has_three_namespaces():
    s = scen.load("generic-rx-race", {"checker.mode": "forward", "load.iperf3": True})
    spec = scen.to_topology(s)
    assert spec.netns == ("cli", "mid", "srv") and len(spec.veths) == 2


def test_cross_field_rules_are_reported_next_to_field_errors():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    with pytest.raises(BadInput) as e:
        # one field bad on its own, and one rule over valid fields broken: both named at once
        scen.from_data(raw, overrides={"xdp.mode": "turbo", "checker.queues": 4})
    assert "xdp.mode" in str(e.value) and "checker.queues: 4 sockets" in str(e.value)
    assert "2 problem(s)" in str(e.value)


def test_forward_mode_needs_two_frames_per_queue():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    with pytest.raises(BadInput, match="forward mode needs at least 2 frames per queue"):
        scen.from_data(raw, overrides={"checker.mode": "forward", "checker.frames": 1})
    assert scen.from_data(raw, overrides={"checker.mode": "forward", "checker.frames": 2})


def test_user_visible_kinds_must_be_violation_kinds():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    raw["bug"]["user_visible"] = ["order", "gremlins"]
    with pytest.raises(BadInput, match="bug.user_visible: unknown violation kind.*gremlins"):
        scen.from_data(raw)
