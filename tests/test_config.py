import json

import pytest

from lab import scenario as scen
from lab.config import Backend, RunConfig, parse_duration, parse_overrides
from lab.run import BadInput


def make_cfg(**kw):
    s = scen.load("generic-rx-race")
    base = dict(scenario=s.name, scenario_data=s.data, backend="vm", kernels=("6.1.192", "deb:6.1.0-47-amd64"),
                duration=12.5, vms=3, seed=42, stop_on_first=True, expect="reproduced", inject=None,
                mitigation="gro-on", evidence=("trace",), out="/tmp/x", overrides=("load.senders=4",))
    base.update(kw)
    return RunConfig(**base)


def test_run_config_round_trips_through_json():
    cfg = make_cfg()
    text = cfg.to_json()
    back = RunConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert isinstance(back.kernels, tuple) and isinstance(back.duration, float)
    assert back.backend is Backend.VM


def test_backend_is_a_closed_set_whose_words_are_unchanged():
    assert [b.value for b in Backend] == ["netns", "vm"]       # CLI words and config.json values
    assert make_cfg(backend="netns").backend is Backend.NETNS
    assert json.loads(make_cfg().to_json())["backend"] == "vm"
    with pytest.raises(BadInput, match="backend 'kvm': one of netns, vm"):
        make_cfg(backend="kvm")


def test_run_config_json_is_plain_data():
    data = json.loads(make_cfg(expect=None).to_json())
    assert data["expect"] is None
    assert data["scenario_data"]["load"]["senders"] == 2


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("500ms", 0.5), ("1.5h", 5400), (7, 7), ("10", 10)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-1s", "0", "3 parsecs"])
def test_parse_duration_rejects(text):
    with pytest.raises(BadInput):
        parse_duration(text)


def test_overrides_parse_toml_values():
    o = parse_overrides(["load.senders=4", "xdp.mode=native", "checker.shared_umem=true", "vm.cmdline=\"a b\""])
    assert o == {"load.senders": 4, "xdp.mode": "native", "checker.shared_umem": True, "vm.cmdline": "a b"}


def test_overrides_reject_missing_equals():
    with pytest.raises(BadInput, match="KEY=VALUE"):
        parse_overrides(["load.senders"])
