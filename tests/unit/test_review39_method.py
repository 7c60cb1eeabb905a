"""Review 39, the method's decision core: the consistency filter and the gold scorer on bad input."""

from __future__ import annotations

import pytest

from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.services.gold_scorer.scoring import ScoringModel, make_scoring_stage
from synpref.shared.config import FilterSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageUnavailable
from synpref.v1.pair_pb2 import (
    DECISION_FLIP,
    DECISION_KEEP,
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    ModelScore,
    PairRecord,
)


def rec(text: str, p_gold: float | None = None, p_best: float | None = None) -> PairRecord:
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": text}],
                    [{"role": "assistant", "content": "no"}], "t")  # fmt: skip
    out = new_record(pair)
    if p_gold is not None:
        out.scores.append(ModelScore(model="gold", version="g1", p=p_gold))
    if p_best is not None:
        out.scores.append(ModelScore(model="best", version="b1", p=p_best))
    return out


@pytest.mark.parametrize("on_disagreement", ["flip", "discard"])
@pytest.mark.parametrize("judges", [PREFERENCE_ABSTAIN, PREFERENCE_REJECTED, None])
def test_stage2_dead_letters_a_nan_best_score_where_it_decides_instead_of_reading_it_as_no_best_rm(
    on_disagreement, judges
):
    # The gold RM agrees and the judges do not (abstained, disagree, or were not asked): the best RM's word
    # decides. A diverged best RM's NaN must not count as a disagreement (flipped or discarded); it fails.
    settings = FilterSettings(stage=2, on_disagreement=on_disagreement)
    diverged, fine = rec("a", p_gold=0.9, p_best=float("nan")), rec("b", p_gold=0.9, p_best=0.9)
    if judges is not None:
        diverged.judge_aggregate.preference = fine.judge_aggregate.preference = judges
    result = make_filter_stage(settings)([diverged, fine])
    assert [(r.pair.id, r.decision.decision) for _, r in result.routed] == [(fine.pair.id, DECISION_KEEP)]
    assert [r.pair.id for r, _ in result.failed] == [diverged.pair.id]
    assert "best" in result.failed[0][1]


def test_stage2_decides_without_the_best_rm_where_its_word_cannot_change_the_decision():
    settings = FilterSettings(stage=2, on_disagreement="flip")
    agreed = rec("a", p_gold=0.9, p_best=float("nan"))
    agreed.judge_aggregate.preference = PREFERENCE_CHOSEN
    gold_disagrees = rec("b", p_gold=0.2, p_best=float("nan"))
    result = make_filter_stage(settings)([agreed, gold_disagrees, rec("c", p_gold=0.9)])
    assert not result.failed
    assert [r.decision.decision for _, r in result.routed] == [DECISION_KEEP, DECISION_FLIP, DECISION_FLIP]


def refusing(bad: str):
    """A pair scorer that raises on any batch holding a pair whose chosen text is `bad` (as a chat template
    that refuses a conversation does), else scores by length."""

    def score(pairs: list[dict]) -> list[tuple[float, float]]:
        if any(p["chosen"][0]["content"] == bad for p in pairs):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return [(len(p["chosen"][0]["content"]), len(p["rejected"][0]["content"])) for p in pairs]

    return score


def test_one_pair_the_scorer_refuses_fails_alone_not_its_whole_batch():
    stage = make_scoring_stage([ScoringModel("gold", "g", refusing("bad")), ScoringModel("best", "b", refusing("x"))])
    good, bad, other = rec("a good answer"), rec("bad"), rec("another")
    result = stage([good, bad, other])
    assert sorted(r.pair.id for _, r in result.routed) == sorted([good.pair.id, other.pair.id])
    assert all({s.model for s in r.scores} == {"gold", "best"} for _, r in result.routed)
    assert [(r.pair.id, "roles must alternate" in why) for r, why in result.failed] == [(bad.pair.id, True)]
    # A batch of that pair alone fails it too (in process nothing else would catch the error).
    assert [r.pair.id for r, _ in stage([bad]).failed] == [bad.pair.id]


def test_a_scorer_that_cannot_serve_or_miscounts_still_stops_the_batch():
    def unavailable(pairs):
        raise StageUnavailable("scorer restarting")

    with pytest.raises(StageUnavailable):
        make_scoring_stage([ScoringModel("gold", "g", unavailable)])([rec("a"), rec("b")])
    with pytest.raises(RuntimeError, match="returned 0 scores"):
        make_scoring_stage([ScoringModel("gold", "g", lambda ps: [])])([rec("a"), rec("b")])


def test_a_scorer_that_fails_every_pair_alone_too_raises_rather_than_dead_letter_the_batch():
    def broken(pairs):
        raise OSError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(OSError):
        make_scoring_stage([ScoringModel("gold", "g", broken)])([rec("a"), rec("b")])
