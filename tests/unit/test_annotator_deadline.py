"""The annotator's batch deadline: a slow judge's samples abstain instead of holding the batch past Kafka's poll
interval (the consumer would leave its group and read the same batch again, as long as the judge stays slow)."""

from __future__ import annotations

import time

from synpref.services.annotator.annotate import LATE, Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import LLMJudge
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN
from testing.fake_judges import FakeOpenAI


def record(i: int):
    return new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": "a long and careful answer"}],
            [{"role": "assistant", "content": "no"}],
            "t",
        )
    )


def test_a_judge_slower_than_the_batch_deadline_abstains_and_the_batch_ends_on_time() -> None:
    with FakeOpenAI(slow_s=4.0) as server:
        judges = [
            LLMJudge(OpenAIChat("judge-a", server.base_url, timeout_s=60.0), samples=2),
            LLMJudge(OpenAIChat("judge-slow", server.base_url, timeout_s=60.0), samples=3),
        ]
        ann = Annotator(judges, batch_deadline_s=1.0)
        try:
            started = time.monotonic()
            result = ann.stage()([record(i) for i in range(4)])
            took = time.monotonic() - started
        finally:
            ann.close()
    assert took < 3.0, f"the batch took {took:.1f}s against a 1 s deadline"
    assert not result.failed and len(result.routed) == 4
    for _, out in result.routed:
        fast = [v for v in out.votes if v.judge == "judge-a"]
        slow = [v for v in out.votes if v.judge == "judge-slow"]
        assert len(fast) == 2 and all(v.preference != PREFERENCE_ABSTAIN for v in fast)
        assert len(slow) == 3 and all(v.preference == PREFERENCE_ABSTAIN and v.rationale == LATE for v in slow)
        assert out.judge_aggregate.judges_abstaining == 1


def test_without_a_deadline_a_slow_judge_is_waited_for() -> None:
    with FakeOpenAI(slow_s=1.5) as server:
        ann = Annotator([LLMJudge(OpenAIChat("judge-slow", server.base_url), samples=1)], batch_deadline_s=None)
        try:
            ((_, out),) = ann.stage()([record(0)]).routed
        finally:
            ann.close()
    assert [v.preference != PREFERENCE_ABSTAIN for v in out.votes] == [True]
