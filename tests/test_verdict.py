import math

import pytest

from lab import verdict as v


def test_zero_events_upper_bound_is_rule_of_three():
    assert v.upper_bound(0, 1_000_000) == pytest.approx(-math.log(0.05) / 1e6, rel=1e-6)


@pytest.mark.parametrize("k,lo,hi", [(1, 0.0253, 5.572), (5, 1.624, 11.67), (10, 4.795, 18.39)])
def test_garwood_interval_matches_tables(k, lo, hi):
    a, b = v.poisson_interval(k, 1.0)
    assert a == pytest.approx(lo, rel=2e-3)
    assert b == pytest.approx(hi, rel=2e-3)


def test_gamma_quantile_inverts():
    for a in (1, 2.5, 10, 200):
        for p in (0.025, 0.5, 0.975):
            x = v.gamma_quantile(a, p)
            assert v._gamma_p(a, x) == pytest.approx(p, abs=1e-9)


def test_budget_gives_miss_probability():
    t = v.budget_for(0.1, miss=0.01)
    assert 1 - v.detection_probability(0.1, t) == pytest.approx(0.01)
    assert v.budget_for(0) == math.inf


def test_decide_reproduced_and_not():
    r = v.decide("k", vms=2, packets=10_000, seconds=20, wall=25, by_kind={"order": 3, "poison": 1},
                 first_violation_s=0.2)
    assert r.verdict == v.REPRODUCED and r.violations == 4
    assert r.corruption.per_packet[0] > 0
    c = v.decide("k", vms=2, packets=10_000, seconds=20, wall=25, by_kind={}, first_violation_s=None)
    assert c.verdict == v.NOT_REPRODUCED
    assert "NOT REPRODUCED (rate < 3" in v.verdict_text(c)
    assert v.matches(c, "clean") and not v.matches(c, "reproduced")


def test_lost_infrastructure_is_never_not_reproduced():
    r = v.decide("k", vms=1, packets=0, seconds=0, wall=5, by_kind={}, first_violation_s=None,
                 infra_errors=["vm-0: LostVM"])
    assert r.verdict == v.INCONCLUSIVE
    assert not v.matches(r, "clean")


def test_partly_lost_fleet_is_never_not_reproduced():
    # one guest of two lost, the other clean: the lost one's exposure is unknown
    r = v.decide("k", vms=2, packets=50_000, seconds=30, wall=35, by_kind={}, first_violation_s=None,
                 infra_errors=["vm-1: LostVM"])
    assert r.verdict == v.INCONCLUSIVE and "vm-1: LostVM" in v.verdict_text(r)
    # ...but a violation seen on the surviving guest is still a reproduction
    r = v.decide("k", vms=2, packets=50_000, seconds=30, wall=35, by_kind={"order": 1},
                 first_violation_s=2.0, infra_errors=["vm-1: LostVM"])
    assert r.verdict == v.REPRODUCED


def test_reproduced_text_gives_packets_and_time_per_violation():
    r = v.decide("k", vms=1, packets=1_000_000, seconds=20, wall=25, by_kind={"order": 4},
                 first_violation_s=0.5)
    text = r.rate_text()
    assert "1 per 250,000 pkts" in text and "1 per 5 s" in text and "(95%)" in text


def test_the_rate_counts_onsets_and_the_table_shows_both():
    """The last generic-rx repro row: order=111 over 7,436 packets, one lost descriptor."""
    r = v.decide("k", vms=1, packets=7436, seconds=0.5, wall=30, by_kind={"order": 111},
                 first_violation_s=0.2, onsets_by_kind={"order": 1})
    assert r.verdict == v.REPRODUCED and r.violations == 111 and r.onsets == 1
    assert r.corruption.per_packet == v.poisson_interval(1, 7436)
    assert "1 onset: 1 per 7,436 pkts" in r.rate_text()
    assert v.kinds_text(r) == "order=111 (1 onset)"
    plain = v.decide("k", vms=1, packets=7436, seconds=0.5, wall=30, by_kind={"poison": 2, "late": 1},
                     first_violation_s=0.2, onsets_by_kind={"poison": 2, "late": 0})
    assert v.kinds_text(plain) == "late=1 (0 onsets), poison=2" and plain.onsets == 2


def test_a_violation_always_has_an_onset():
    r = v.decide("k", vms=1, packets=100, seconds=1, wall=2, by_kind={"late": 3},
                 first_violation_s=0.1, onsets_by_kind={"late": 0})
    assert r.onsets == 1 and r.verdict == v.REPRODUCED


def test_an_interrupted_row_is_inconclusive_whatever_it_saw():
    r = v.decide("k", vms=1, packets=12_345, seconds=3.2, wall=5, by_kind={"order": 1},
                 first_violation_s=0.5, interrupted=True)
    assert r.verdict == v.INCONCLUSIVE and not v.matches(r, "reproduced")
    assert v.verdict_text(r) == "INCONCLUSIVE (interrupted: 12,345 packets over 3.2 s of traffic so far)"


def _row(by_kind=None, hits=0, available=True, packets=1_544_470, **kw):
    return v.decide("6.1.192+revert-veth-napi", vms=1, packets=packets, seconds=30, wall=60,
                    by_kind=by_kind or {}, first_violation_s=None, window_hits=hits,
                    window_available=available, **kw)


def test_window_hits_without_corruption_are_their_own_verdict():
    """The issue's row: 927 hits over 1,544,470 packets was NOT REPRODUCED."""
    r = _row(hits=927)
    assert r.verdict == v.WINDOW_HIT != v.NOT_REPRODUCED
    assert v.verdict_text(r) == "WINDOW HIT (927 interleavings; no corruption in 1,544,470 packets)"
    assert v.verdict_text(_row(hits=1)).startswith("WINDOW HIT (1 interleaving;")
    assert v.level_of(r) == "window"


def test_verdicts_and_levels_are_closed_sets_whose_words_are_unchanged():
    # the words summary.json, the tables and --expect use
    assert [x.value for x in v.Verdict] == ["REPRODUCED", "NOT REPRODUCED", "INCONCLUSIVE", "WINDOW HIT"]
    assert v.REPRODUCED is v.Verdict.REPRODUCED and f"{v.NOT_REPRODUCED}" == "NOT REPRODUCED"
    assert [x.value for x in v.EXPECT_LEVELS] == ["reproduced", "window", "clean"]
    assert v.Expect("window") is v.Expect.WINDOW


def test_window_levels_of_expect():
    hit, clean, corrupt = _row(hits=5), _row(), _row(by_kind={"poison": 1}, hits=5)
    assert [v.matches(hit, e) for e in v.EXPECT_LEVELS] == [False, True, False]
    assert [v.matches(clean, e) for e in v.EXPECT_LEVELS] == [False, False, True]
    # corruption needs the window: it meets "window" as well as "reproduced"
    assert [v.matches(corrupt, e) for e in v.EXPECT_LEVELS] == [True, True, False]
    with pytest.raises(ValueError, match="one of reproduced, window, clean"):
        v.matches(hit, "vulnerable")


def test_hits_of_an_unmeasured_window_are_no_evidence():
    """Probes that missed make the level unavailable: its count decides nothing, and the
    clean verdict says the window was not measured."""
    r = _row(hits=12, available=False, window_note="kprobes missed 3 hit(s)")
    assert r.verdict == v.NOT_REPRODUCED
    assert "window not measured: kprobes missed 3 hit(s)" in v.verdict_text(r)
    assert "0 window hits" in v.verdict_text(_row())


def test_window_hits_decide_over_a_lost_guest_but_not_over_an_interrupt():
    r = _row(hits=3, infra_errors=["vm-1: LostVM"])
    assert r.verdict == v.WINDOW_HIT and v.matches(r, "window")
    assert _row(hits=3, interrupted=True).verdict == v.INCONCLUSIVE
    # no hits and a lost guest: still no verdict either way
    assert _row(infra_errors=["vm-1: LostVM"]).verdict == v.INCONCLUSIVE


def test_run_traces_a_rare_corruption_scenario_by_default():
    from lab import cli
    from lab import scenario as scen
    from lab.run import BadInput

    veth, generic = scen.load("veth-napi-race"), scen.load("generic-rx-race")
    assert veth["evidence"]["corruption_rare"] and not generic["evidence"]["corruption_rare"]
    assert cli._evidence([], veth) == ("trace",)
    assert cli._evidence([], generic) == ()
    assert cli._evidence(["none"], veth) == ()
    assert cli._evidence(["trace"], generic) == ("trace",)
    with pytest.raises(BadInput, match="none with other"):
        cli._evidence(["none", "trace"], veth)
    a = cli.make_parser().parse_args(["run", "veth-napi-race", "--expect", "window"])
    assert a.expect == "window"
