"""Simulated judges with correlated errors (error_mode length_correlated): study only."""

from __future__ import annotations

import asyncio
import math

import pytest

from synpref.services.annotator.judges import JudgeRequest
from synpref.services.controller.simulated import (
    SimulatedJudge,
    error_probability,
    judges_majority_label,
    label_is_true,
    mark_truth,
)
from synpref.shared.config import SimulatedJudgeSettings
from synpref.shared.pairs import flipped, message_dicts, new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN


def pair(i: int, better_len: int, worse_len: int, truth: bool = True):
    r = new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": f"{i:05d}" + "g" * (better_len - 5)}],
            [{"role": "assistant", "content": f"{i:05d}" + "b" * (worse_len - 5)}],
            "test",
        )
    )
    mark_truth(r)
    return r if truth else flipped(r)


def right(judge: SimulatedJudge, r) -> bool:
    p = r.pair
    req = JudgeRequest(
        p.id, message_dicts(p.conversation), message_dicts(p.chosen), message_dicts(p.rejected), meta=dict(p.meta)
    )
    (vote,) = asyncio.run(judge.judge(req))
    return (vote.preference == PREFERENCE_CHOSEN) == label_is_true(r)


def judge(name: str, accuracy: float, mode: str) -> SimulatedJudge:
    return SimulatedJudge(SimulatedJudgeSettings(name=name, accuracy=accuracy, samples=1, error_mode=mode), seed=5)


def test_error_probability_follows_the_length_difference():
    short, long = [{"role": "assistant", "content": "x" * 50}], [{"role": "assistant", "content": "x" * 500}]
    assert error_probability(0.8, 4.0, short, short) == pytest.approx(0.2)
    assert error_probability(0.8, 4.0, short, long) > 0.38  # better is the shorter: close to twice
    assert error_probability(0.8, 4.0, long, short) < 0.02  # better is the longer: seldom wrong
    assert error_probability(0.3, 4.0, short, long) == 1.0  # capped
    assert error_probability(0.8, 0.0, short, long) == pytest.approx(0.2)  # no bias: length is ignored


def test_length_correlated_judges_err_together_and_where_the_better_response_is_shorter():
    n = 1500
    equal = [pair(i, 100, 100, truth=bool(i % 2)) for i in range(n)]
    shorter = [pair(i, 60, 300, truth=bool(i % 2)) for i in range(n, 2 * n)]
    a, b = judge("a", 0.75, "length_correlated"), judge("b", 0.75, "length_correlated")
    on_equal = [right(a, r) for r in equal]
    # At equal lengths the stated accuracy holds (within 4 standard deviations).
    assert abs(sum(on_equal) / n - 0.75) <= 4 * math.sqrt(0.75 * 0.25 / n)
    # The better response being much the shorter makes errors far more likely (p_err ~ 0.46 here).
    assert sum(not right(a, r) for r in shorter) / n > 0.4
    # One shared coin: judges of equal accuracy err on exactly the same pairs, and majority voting
    # cannot repair them; independent judges share an error only about (1 - accuracy)^2 of the time.
    assert [right(b, r) for r in equal] == on_equal
    ia, ib = judge("a", 0.75, "independent"), judge("b", 0.75, "independent")
    both_wrong = sum(not right(ia, r) and not right(ib, r) for r in equal) / n
    assert both_wrong < 0.25 * 0.25 + 4 * math.sqrt(0.0625 * 0.9375 / n)


def test_length_correlated_judge_is_consistent_across_orientations_and_needs_the_rejected_side():
    j = judge("a", 0.6, "length_correlated")
    for i in range(50):
        r = pair(i, 80, 200)
        assert right(j, r) == right(j, flipped(r))
    r = pair(0, 80, 200)
    with pytest.raises(ValueError, match="rejected"):
        j.votes_for(r.pair.id, message_dicts(r.pair.chosen), r.pair.meta["study_true_chosen"])


def test_judges_only_label_is_the_panels_majority_and_agrees_with_the_votes_it_cast():
    from synpref.services.gold_scorer.scoring import pair_dict

    records = [pair(i, 100, 100, truth=bool(i % 2)) for i in range(200)]
    right_panel = [judge("r", 1.0, "independent")]
    wrong_panel = [judge("w", 0.0, "independent")]
    mute = [SimulatedJudge(SimulatedJudgeSettings(name="m", abstain=1.0), seed=5)]
    for r in records:
        given = pair_dict(r)
        swapped = dict(given, chosen=given["rejected"], rejected=given["chosen"])
        truth_first = given if label_is_true(r) else swapped
        assert judges_majority_label(right_panel, r, given) == truth_first
        assert judges_majority_label(wrong_panel, r, given) != truth_first
        assert judges_majority_label(mute, r, given) == given  # every judge abstains: as given
    # A 0.8 judge in the loop (judge()) and in the baseline believe the same thing about a pair.
    panel = [judge("j", 0.8, "independent")]
    for r in records[:50]:
        given = pair_dict(r)
        # Left as given exactly when its vote is CHOSEN: when it is right about a true label or wrong about a false one.
        assert (judges_majority_label(panel, r, given) == given) == (right(panel[0], r) == label_is_true(r))
