"""Adaptive drafting: the chosen draft length follows acceptance and cost; it never changes output."""
from nudge_engine.engine.draft_policy import PROBE_EVERY, DraftPolicy, DraftStats, expected_speedup


def test_drafts_more_when_drafts_are_accepted_and_cheap():
    policy = DraftPolicy(cost_ratio=0.15)
    good, bad = DraftStats(), DraftStats()
    for _ in range(20):
        good.observe(accepted=4, rejected=0)
        bad.observe(accepted=0, rejected=1)
    assert policy.choose(good, 8) >= 4
    assert policy.choose(bad, 8) == 0
    assert policy.choose(good, 0) == 0  # draft_tokens = 0 means never speculate
    expensive = DraftPolicy(cost_ratio=2.0)
    assert expensive.choose(good, 8) < policy.choose(good, 8)


def test_a_request_that_stopped_drafting_probes_again():
    policy = DraftPolicy(cost_ratio=0.5)
    stats = DraftStats()
    for _ in range(20):
        stats.observe(accepted=0, rejected=1)
    assert policy.choose(stats, 4) == 0
    stats.rounds_without_draft = PROBE_EVERY
    assert policy.choose(stats, 4) == 1


def test_expected_speedup_model():
    assert expected_speedup(0, 0.5, 0.3) == 1.0
    assert abs(expected_speedup(2, 0.5, 0.0) - 1.75) < 1e-9  # 1 + a + a^2 tokens for free drafts
    assert expected_speedup(4, 0.9, 0.1) > expected_speedup(1, 0.9, 0.1)


def test_measured_costs_move_the_ratio_but_not_the_static_one():
    policy = DraftPolicy(cost_ratio=0.2)
    for _ in range(50):
        policy.observe_pass_times(nudger_pass_s=0.9, base_pass_s=1.0)
    assert policy.cost_ratio > 0.8 and policy.static_cost_ratio == 0.2
