"""Named scenario variants, several pinned iperf3 clients, and the rerun command."""

from __future__ import annotations

import pytest

from lab import scenario
from lab.agent.agent import _iperf_sum
from lab.config import RunConfig
from lab.report import rerun_command
from lab.run import BadInput


def test_the_iperf3_variant_is_the_forwarding_set_up_with_two_pinned_clients():
    s = scenario.load("veth-napi-race", variant="iperf3")
    assert s["checker"]["mode"] == "forward" and s["load"]["iperf3"] is True
    assert s["load"]["iperf3_clients"] == 2 and s["load"]["senders"] == 0
    plain = scenario.load("veth-napi-race")
    assert plain["checker"]["mode"] == "rxdrop" and plain["load"]["iperf3_clients"] == 1
    # --set still wins over the variant
    s = scenario.load("veth-napi-race", {"load.iperf3_clients": 3}, variant="iperf3")
    assert s["load"]["iperf3_clients"] == 3


def test_an_unknown_variant_names_the_ones_there_are():
    with pytest.raises(BadInput) as e:
        scenario.load("veth-napi-race", variant="iperf")
    assert "no variant 'iperf'" in str(e.value) and "iperf3" in (e.value.hint or "")


def test_a_variant_with_a_bad_field_or_value_is_reported_with_the_rest():
    raw = scenario.with_variant(__import__("tomllib").loads(
        (scenario.scenario_dir() / "veth-napi-race.toml").read_text()), None)
    raw["variants"] = {"bad": {"load.sendrs": 2, "load.senders": -1}, "empty": {}}
    with pytest.raises(BadInput) as e:
        scenario.from_data(raw, path="veth-napi-race.toml")
    msg = str(e.value)
    assert "variants.bad: 'load.sendrs': no such field" in msg
    assert "variants.bad: load.senders = -1 is not" in msg and "variants.empty" in msg


def test_the_agent_sums_several_iperf3_reports_and_keeps_every_error():
    one = {"type": "iperf", "returncode": 0, "bits_per_second": 2e7, "bytes": 100, "seconds": 60.0}
    assert _iperf_sum([one]) is one
    both = _iperf_sum([one, {**one, "bits_per_second": 1e7, "error": "iperf3 moved no data", "returncode": 1}])
    assert both["bits_per_second"] == 3e7 and both["bytes"] == 200 and both["seconds"] == 60.0
    assert both["error"] == "client 1: iperf3 moved no data" and both["returncode"] == 1
    assert both["per_client_bits_per_second"] == [2e7, 1e7]


def test_the_rerun_command_carries_what_decided_the_run():
    cfg = RunConfig(scenario="veth-napi-race", scenario_data={}, backend="vm",
                    kernels=("6.1.192+revert-veth-napi", "bzimage:/a b/bzImage"), duration=30.0, vms=2,
                    seed=7, overrides=("amplifier.delay_ns=2000",), variant="iperf3", evidence=("trace",),
                    stop_on_first=True, mitigation="gro-on")
    cmd = rerun_command(cfg)
    assert cmd.startswith("racelab run veth-napi-race --backend vm --kernel 6.1.192+revert-veth-napi "
                          "--kernel 'bzimage:/a b/bzImage' --vms 2 --duration 30s --seed 7")
    for part in ("--variant iperf3", "--set amplifier.delay_ns=2000", "--mitigation gro-on",
                 "--evidence trace", "--stop-on-first"):
        assert part in cmd
    from lab.cli import make_parser
    a = make_parser().parse_args(__import__("shlex").split(cmd)[1:])
    assert a.variant == "iperf3" and a.seed == 7 and a.kernel == list(cfg.kernels)
