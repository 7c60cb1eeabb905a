"""Consistency filter: Stage-1 routing and the Stage-2 KEEP / FLIP / DISCARD rule."""

from __future__ import annotations

import pytest

from synpref.services.consistency_filter.rules import (
    accuracy_lower_bound,
    decide,
    disagreement_rule,
    make_filter_stage,
    recycle,
)
from synpref.shared.config import FilterSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import (
    DECISION_DISCARD,
    DECISION_FLIP,
    DECISION_KEEP,
    DECISION_REVIEW,
    DECISION_SKIP,
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    STAGE_ONE,
    STAGE_TWO,
    JudgeVote,
    ModelScore,
)


def record(p_gold=None, p_best=None, judges=None):
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], "test")  # fmt: skip
    rec = new_record(pair)
    if p_gold is not None:
        rec.scores.append(ModelScore(model="gold", version="g1", reward_chosen=1.0, reward_rejected=0.0, p=p_gold))
    if p_best is not None:
        rec.scores.append(ModelScore(model="best", version="b1", p=p_best))
    if judges is not None:
        rec.judge_aggregate.preference = judges
        rec.votes.append(JudgeVote(judge="j", preference=judges))
    return rec


def test_auto_mode_discards_and_recycle_makes_the_flip_rules_record():
    """A filter running auto on its own discards; the controller's recycle of that record, once it trusts the
    gold RM, is the record the flip rule makes (reason aside)."""
    rec = record(0.3, 0.2, PREFERENCE_REJECTED)
    route, discarded = decide(rec, FilterSettings(stage=2, on_disagreement="auto"))
    assert (route, discarded.decision.decision) == ("discarded", DECISION_DISCARD)
    _, flip = decide(rec, FilterSettings(stage=2, on_disagreement="flip"))
    out = recycle(discarded, "auto: strong gold RM")
    assert out.decision.decision == DECISION_FLIP and out.decision.reason.endswith("(auto: strong gold RM)")
    for m in (out, flip):
        m.decision.reason = ""
        m.lineage.updated_at.Clear()
    assert out == flip
    kept = decide(record(0.9, 0.8, PREFERENCE_CHOSEN), FilterSettings(stage=2, on_disagreement="auto"))[1]
    assert recycle(kept, "x") is kept  # only Stage 2's disagreement discards are recycled


def test_the_auto_rule_trusts_a_gold_rm_only_on_enough_held_out_pairs():
    assert accuracy_lower_bound(0, 0) == 0.0
    assert accuracy_lower_bound(9, 10) < accuracy_lower_bound(90, 100) < accuracy_lower_bound(900, 1000) < 0.9
    assert accuracy_lower_bound(900, 1000) == pytest.approx(0.8876, abs=1e-3)  # Wilson, one-sided 90%
    assert disagreement_rule(9, 10, 0.75) == ("discard", pytest.approx(accuracy_lower_bound(9, 10)))
    assert disagreement_rule(90, 100, 0.75)[0] == "flip"
    assert disagreement_rule(60, 100, 0.75)[0] == "discard"
    assert accuracy_lower_bound(10, 10) > 0.75 and disagreement_rule(10, 10, 0.75)[0] == "discard"  # under 30 pairs
    assert disagreement_rule(10, 10, 0.75, min_pairs=10)[0] == "flip"


def test_the_accuracy_interval_is_wilsons_two_sided_95_percent():
    from synpref.services.consistency_filter.rules import accuracy_interval

    assert accuracy_interval(0.5, 100) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    low, high = accuracy_interval(1.0, 10)  # never past 1, unlike the normal approximation
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    assert accuracy_interval(0.7, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("p_gold", "p_best", "judges", "expected"),
    [
        (0.9, 0.2, PREFERENCE_CHOSEN, DECISION_KEEP),  # gold + judges
        (0.9, 0.8, PREFERENCE_REJECTED, DECISION_KEEP),  # gold + best RM
        (0.9, 0.3, PREFERENCE_REJECTED, DECISION_FLIP),  # gold alone is not enough
        (0.9, 0.3, PREFERENCE_ABSTAIN, DECISION_FLIP),
        (0.4, 0.9, PREFERENCE_CHOSEN, DECISION_FLIP),  # gold disagrees
        (0.49, 0.9, PREFERENCE_CHOSEN, DECISION_FLIP),  # gold disagrees, narrowly (a tie: test_review46_I_filter.py)
    ],
)
def test_stage2_rule(p_gold, p_best, judges, expected):
    route, out = decide(record(p_gold, p_best, judges), FilterSettings(stage=2, on_disagreement="flip"))
    assert out.decision.decision == expected
    assert out.decision.rule == "stage2.consistency" and out.decision.reason
    assert route == "curated"
    assert list(out.lineage.steps)[-1] == "consistency-filter"


def test_flip_swaps_texts_scores_and_votes():
    rec = record(0.3, 0.2, PREFERENCE_REJECTED)
    _, out = decide(rec, FilterSettings(stage=2, on_disagreement="flip"))
    assert out.pair.chosen[0].content == "b" and out.pair.rejected[0].content == "a"
    assert out.pair.id != rec.pair.id and out.lineage.original_id == rec.pair.id
    assert next(s.p for s in out.scores if s.model == "gold") == 1.0 - 0.3  # the flip's p -> 1 - p, exactly
    assert out.judge_aggregate.preference == PREFERENCE_CHOSEN
    assert out.votes[0].preference == PREFERENCE_CHOSEN


def test_discard_mode_routes_to_discarded():
    route, out = decide(record(0.3, 0.2, PREFERENCE_REJECTED), FilterSettings(stage=2, on_disagreement="discard"))
    assert (route, out.decision.decision) == ("discarded", DECISION_DISCARD)
    assert out.pair.chosen[0].content == "a"


@pytest.mark.parametrize(
    ("p_best", "band", "expected", "route"),
    [(0.2, 0.05, DECISION_REVIEW, "review"), (0.53, 0.05, DECISION_REVIEW, "review"),
     (0.56, 0.05, DECISION_SKIP, "discarded"), (0.51, 0.0, DECISION_SKIP, "discarded")],
)  # fmt: skip
def test_stage1_routing(p_best, band, expected, route):
    got_route, out = decide(record(p_best=p_best), FilterSettings(stage=1, band=band))
    assert (got_route, out.decision.decision) == (route, expected)
    assert out.decision.rule == "stage1.error_driven"


def test_missing_scores_fail_to_dead_letter():
    stage2 = make_filter_stage(FilterSettings(stage=2))
    result = stage2([record(p_best=0.9), record(0.9, 0.9)])
    assert len(result.failed) == 1 and "gold" in result.failed[0][1]
    assert [r for r, _ in result.routed] == ["curated"]
    stage1 = make_filter_stage(FilterSettings(stage=1))
    assert len(stage1([record(p_gold=0.9)]).failed) == 1


def test_the_service_applies_each_records_stage_rule_and_writes_it_to_decided():
    from synpref.services.consistency_filter.main import by_stage

    settings = FilterSettings(stage=2, on_disagreement="discard")
    stage_one, stage_two = record(p_best=0.3), record(p_gold=0.9, p_best=0.8)
    stage_one.lineage.stage, stage_two.lineage.stage = STAGE_ONE, STAGE_TWO
    result = by_stage(settings)([stage_one, stage_two, record(p_gold=0.2, p_best=0.9)])
    assert not result.failed
    decided = [(route, r.decision.decision, r.lineage.stage) for route, r in result.routed]
    # The configured stage (2) applies only to a record no controller staged.
    assert decided == [
        ("decided", DECISION_REVIEW, STAGE_ONE),
        ("decided", DECISION_KEEP, STAGE_TWO),
        ("decided", DECISION_DISCARD, STAGE_TWO),
    ]
    by_decision = by_stage(settings, by_decision=True)([stage_one, stage_two])
    assert [route for route, _ in by_decision.routed] == ["review", "curated"]
