"""The pass-through stage, a pure function over a batch."""

from __future__ import annotations

from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PairRecord


def passthrough(route: str) -> Stage:
    """A stage that emits every input record to `route` (a TopicSettings field)."""

    def stage(batch: list[PairRecord]) -> StageResult:
        result = StageResult()
        for record in batch:
            result.emit(route, record)
        return result

    return stage
