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
    p = scen.load("shared-pool-rx-race").bug
    assert (p["fix"], p["fixed_in"], p["introduced_by"], p["revert_patch"]) == \
        ("a1356ac7749c", "6.15", "bf0bdd1343ef", "revert-shared-pool")


def test_every_bad_field_is_named_at_once():
    raw = tomllib.loads((scen.scenario_dir() / "generic-rx-race.toml").read_text())
    bad = copy.deepcopy(raw)
    bad["load"]["senders"] = "two"
    bad["xdp"]["mode"] = "turbo"
    bad["checker"]["frame_size"] = 1000
    del bad["kernels"]["fixed"]
    bad["load"]["colour"] = "red"
    with pytest.raises(BadInput) as e:
        scen.from_data(bad)
    msg = str(e.value)
    for needle in ("load.senders", "xdp.mode", "checker.frame_size", "kernels.fixed: missing",
                   "load.colour: unknown"):
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


# ---------------------------------------------------------------- the schema and its defaults

MINIMAL = """
[bug]
name = "tiny-race"
title = "a fix"
fix = "0123456789ab"
fixed_in = "6.9"
mechanism = "two CPUs at once"

[kernels]
affected = "6.1.192+revert-generic-rx"
fixed = "6.1.192"
"""


def test_only_bug_and_kernels_have_required_fields():
    required = {(s, f) for s, fields in scen.SCHEMA.items() for f, fd in fields.items() if fd.required}
    assert {s for s, _ in required} == {"bug", "kernels"}
    assert ("kernels", "affected") in required and ("bug", "fix") in required


def test_every_default_passes_its_own_check():
    for sec, fields in scen.SCHEMA.items():
        for fld, fd in fields.items():
            if not fd.required:
                assert fd.check(fd.default), f"{sec}.{fld}: default {fd.default!r} is not {fd.good}"


def test_a_minimal_scenario_gets_every_default(tmp_path):
    p = tmp_path / "tiny-race.toml"
    p.write_text(MINIMAL)
    s = scen.load(str(p))
    assert s["checker"]["sockets_per_queue"] == 1 and s["xdp"]["mode"] == "generic"
    assert s["evidence"]["window"] == "unflushed_hits" and s["mitigations"]["gro-on"] == "unknown"
    assert s["bug"]["user_visible"] == [] and s["amplifier"]["method"] == "auto"
    for sec, fields in scen.SCHEMA.items():
        assert set(s[sec]) == set(fields), sec
    assert scen.to_topology(s).validate() == []
    # defaults are copies: changing one scenario's list does not change the next one's
    s["bug"]["stable_backports"].append("9.9")
    assert scen.load(str(p))["bug"]["stable_backports"] == []


def test_a_minimal_scenario_takes_overrides_and_rejects_bad_ones(tmp_path):
    p = tmp_path / "tiny-race.toml"
    p.write_text(MINIMAL)
    assert scen.load(str(p), {"checker.sockets_per_queue": 2})["checker"]["sockets_per_queue"] == 2
    with pytest.raises(BadInput, match="several sockets on one queue need checker.mode"):
        scen.load(str(p), {"checker.sockets_per_queue": 2, "checker.mode": "forward"})
    with pytest.raises(BadInput, match="checker.sockets_per_queue: 9 is not an integer 1..8"):
        scen.load(str(p), {"checker.sockets_per_queue": 9})


def test_missing_required_section_and_misspelt_names_are_named(tmp_path):
    p = tmp_path / "tiny-race.toml"
    p.write_text(MINIMAL.replace("[kernels]", "[kernel]").replace('mode = "x"', "")
                 + "\n[checker]\nsocket_per_queue = 2\n")
    with pytest.raises(BadInput) as e:
        scen.load(str(p))
    msg = str(e.value)
    assert "[kernels]: missing section" in msg
    assert "[kernel]: unknown section (did you mean [kernels]?)" in msg
    assert "checker.socket_per_queue: unknown field (did you mean sockets_per_queue?)" in msg


def test_json_schema_follows_the_table():
    js = scen.json_schema()
    assert js["required"] == ["bug", "kernels"]
    checker = js["properties"]["checker"]["properties"]
    assert checker["sockets_per_queue"] == {**checker["sockets_per_queue"], "type": "integer",
                                            "minimum": 1, "maximum": 8, "default": 1}
    assert checker["pick"]["enum"] == ["cpu", "rr"]
    assert js["properties"]["bug"]["required"] == [f for f, fd in scen.SCHEMA["bug"].items() if fd.required]
    assert js["properties"]["evidence"]["properties"]["window"]["default"] == "unflushed_hits"
    for sec, fields in scen.SCHEMA.items():
        assert set(js["properties"][sec]["properties"]) == set(fields), sec


def test_shipped_json_schema_is_up_to_date():
    path = scen.scenario_dir() / scen.SCHEMA_FILE
    assert path.read_text() == scen.schema_text(), "scenarios/schema.json is stale: run `racelab scenario schema`"


def test_shipped_scenarios_satisfy_the_json_schema():
    """The JSON Schema accepts what the validator accepts (checked by hand: no jsonschema dependency)."""
    js = scen.json_schema()
    for name in scen.available():
        raw = tomllib.loads((scen.scenario_dir() / f"{name}.toml").read_text())
        assert set(raw) <= set(js["properties"]), name
        for sec, body in raw.items():
            if sec == "variants":
                continue
            props = js["properties"][sec]["properties"]
            for fld, v in body.items():
                p = props[fld]
                if "enum" in p:
                    assert v in p["enum"], (name, sec, fld)
                if p.get("type") == "integer":
                    assert isinstance(v, int) and p["minimum"] <= v <= p.get("maximum", v), (name, sec, fld)


def test_window_measure_is_the_scenario_field():
    from lab import evidence
    assert evidence.window_measure("generic-rx-race") == "overlap_hits"
    assert evidence.window_measure("veth-napi-race") == "unflushed_hits"
    assert evidence.window_measure("veth-napi-race", "overlap_hits") == "overlap_hits"
    assert evidence.trace_options("shared-pool-rx-race")["window"] == "overlap_hits"


# ---------------------------------------------------------------- racelab scenario ...

def _cli(*argv):
    from lab.cli import main
    return main(list(argv))


def test_scenario_validate_names_every_problem_of_bad_files(tmp_path, capsys):
    good = tmp_path / "tiny-race.toml"
    good.write_text(MINIMAL)
    bad = tmp_path / "bad-race.toml"
    bad.write_text(MINIMAL.replace('name = "tiny-race"', 'name = "bad-race"')
                   .replace('fix = "0123456789ab"', 'fix = "12"')
                   + '\n[checker]\nsockets_per_queue = "two"\n[load]\nsenders = -1\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[bug\n")
    assert _cli("scenario", "validate", str(good)) == 0
    assert "ok (tiny-race" in capsys.readouterr().out
    assert _cli("scenario", "validate", str(good), str(bad), str(broken)) == 2
    out = capsys.readouterr().out
    assert f"{bad}: INVALID" in out and "3 problem(s)" in out
    for needle in ("bug.fix: '12' is not a commit hash", "checker.sockets_per_queue: 'two' is not an integer 1..8",
                   "load.senders: -1 is not an integer 0..64"):
        assert needle in out, needle
    assert f"{broken}: INVALID" in out and "malformed TOML" in out


def test_scenario_new_writes_a_file_validate_explains(tmp_path, capsys):
    out = tmp_path / "my-race.toml"
    assert _cli("scenario", "new", "my-race", "--out", str(out)) == 0
    text = out.read_text()
    assert "# sockets_per_queue = 1" in text and "REQUIRED" in text
    # as written, only the required fields are left to fill in
    assert _cli("scenario", "validate", str(out)) == 2
    msg = capsys.readouterr().out
    assert "bug.fix" in msg and "kernels.affected" in msg and "checker." not in msg
    # filled in, it validates, and every commented default is the schema's
    filled = text.replace('fix = ""', 'fix = "0123456789ab"').replace('affected = ""', 'affected = "a"') \
                 .replace('fixed = ""', 'fixed = "b"')
    out.write_text(filled)
    assert _cli("scenario", "validate", str(out)) == 0
    uncommented = "\n".join(line[2:] if line.startswith("# ") and "=" in line.split("#")[1] or line.startswith("# [")
                            else line for line in filled.splitlines()[4:])
    assert scen.from_data(tomllib.loads(uncommented), path=str(out)).data == scen.load(str(out)).data
    assert _cli("scenario", "new", "my-race", "--out", str(out)) == 2   # never overwrites


def test_scenario_show_marks_defaults_variants_and_overrides(capsys):
    assert _cli("scenario", "show", "shared-pool-rx-race", "--variant", "one-socket", "--set", "load.senders=3") == 0
    out = capsys.readouterr().out
    resolved = tomllib.loads(out)
    assert resolved["checker"]["sockets_per_queue"] == 1 and resolved["load"]["senders"] == 3
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if "=" in line}
    assert lines["sockets_per_queue"].endswith("# variant one-socket")
    assert lines["senders"].endswith("# --set")
    assert lines["iperf3_clients"].endswith("# default")
    assert scen.from_data(resolved, path="shared-pool-rx-race.toml").data["checker"] == resolved["checker"]


def test_scenario_list_names_all(capsys):
    assert _cli("scenario", "list") == 0
    out = capsys.readouterr().out
    for name in scen.available():
        assert name in out
