"""A batch whose every pair fails alone is the scorer's failure only if an ordinary pair fails too.

Before, a batch of one pair too long for the scorer's device (ScorerFailed alone, say out of memory), typically
the last of a stream, was read again for ever: no other pair scored beside it to show the scorer works, so the
stream's end never reached the filter. The same for a batch of such pairs.
"""

from __future__ import annotations

import pytest

from synpref.services.gold_scorer.scoring import ScorerFailed, ScoringModel, make_scoring_stage
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageUnavailable
from synpref.v1.pair_pb2 import PairRecord


def record(text: str) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": "q"}],
            [{"role": "assistant", "content": text}],
            [{"role": "assistant", "content": "no"}],
            source="t",
        )
    )


class TooLongFails:
    """Scores by length; any call holding a response over 1,000 characters fails as a device OOM would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pairs: list[dict]) -> list[tuple[float, float]]:
        self.calls += 1
        texts = [p["chosen"][0]["content"] for p in pairs]
        if any(len(t) > 1000 for t in texts):
            raise ScorerFailed(f"gold ran out of memory scoring {len(pairs)} pair(s)")
        return [(float(len(t)), 2.0) for t in texts]


@pytest.mark.parametrize("n", [1, 3])
def test_a_batch_of_pairs_too_long_for_the_device_is_dead_lettered_when_an_ordinary_pair_scores(n: int) -> None:
    scorer = TooLongFails()
    batch = [record("x" * (2000 + i)) for i in range(n)]
    result = make_scoring_stage([ScoringModel("gold", "g", scorer)])(batch)
    assert result.routed == []
    assert sorted(r.pair.id for r, _ in result.failed) == sorted(r.pair.id for r in batch)
    assert all("ScorerFailed" in why for _, why in result.failed)


def test_a_scorer_that_fails_an_ordinary_pair_too_has_the_batch_read_again() -> None:
    def broken(pairs: list[dict]) -> list[tuple[float, float]]:
        raise ScorerFailed("scorer failed with 'gold': INTERNAL: CUDA error: an illegal memory access")

    with pytest.raises(StageUnavailable, match="a small ordinary pair fails as well"):
        make_scoring_stage([ScoringModel("gold", "g", broken)])([record("x" * 2000)])
