"""Review 46 (area I), the consistency filter: a gold RM tie is no disagreement to recycle."""

from __future__ import annotations

import pytest

from synpref.services.consistency_filter.rules import decide, recycle
from synpref.shared.config import FilterSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import (
    DECISION_DISCARD,
    DECISION_FLIP,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    ModelScore,
    PairRecord,
)


def scored(p_gold: float, p_best: float, judges: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], "test")  # fmt: skip
    rec = new_record(pair)
    # Equal rewards: what a bf16 gold RM gives two close answers (sigmoid(0) is exactly 0.5).
    rec.scores.append(ModelScore(model="gold", version="g1", reward_chosen=2.5, reward_rejected=2.5, p=p_gold))
    rec.scores.append(ModelScore(model="best", version="b1", p=p_best))
    rec.judge_aggregate.preference = judges
    return rec


@pytest.mark.parametrize("judges", [PREFERENCE_CHOSEN, PREFERENCE_REJECTED])
@pytest.mark.parametrize("mode", ["flip", "discard", "auto"])
def test_a_gold_tie_is_discarded_never_flipped(mode: str, judges: int) -> None:
    """The old rule flipped it under `flip` (and recycle flipped it under auto): with the judges and the best RM
    both backing the label, the pair went to training with the label every informative signal rejects."""
    route, out = decide(scored(0.5, 0.9, judges), FilterSettings(stage=2, on_disagreement=mode))
    assert (route, out.decision.decision) == ("discarded", DECISION_DISCARD)
    assert out.pair.chosen[0].content == "a" and out.decision.reason.startswith("gold ties (p_gold=0.500)")
    assert recycle(out, "auto: strong gold RM") is out


def test_a_gold_disagreement_is_still_flipped_and_recycled() -> None:
    route, out = decide(scored(0.4999, 0.9, PREFERENCE_CHOSEN), FilterSettings(stage=2, on_disagreement="flip"))
    assert (route, out.decision.decision) == ("curated", DECISION_FLIP)
    _, discarded = decide(scored(0.4999, 0.9, PREFERENCE_CHOSEN), FilterSettings(stage=2, on_disagreement="auto"))
    assert recycle(discarded, "auto").decision.decision == DECISION_FLIP
