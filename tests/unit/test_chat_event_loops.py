"""An OpenAI-compatible chat backend used from more than one event loop.

The embedded controller builds a new Annotator (with its own event loop) for each stage that
annotates, over the same judges: Stage 1 used a judge's HTTP session first, and in Stage 2
every request on that session failed ("Timeout context manager should be used inside a
task"), so every Stage-2 pair was dropped as failed. A backend keeps one session (and one
concurrency limit) per event loop.
"""

from __future__ import annotations

import asyncio

import pytest

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import LLMJudge
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN
from testing.fake_judges import FakeOpenAI

PROMPT = "## Candidate 1\nlong answer\n\n## Candidate 2\nno\n\nWhich candidate is better?"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as s:
        yield s


def test_one_backend_answers_on_two_event_loops(server):
    backend = OpenAIChat("judge-a", server.base_url, retries=0, max_concurrency=1)

    async def ask_twice() -> list[str | None]:
        # Two requests at once through a limit of one: the semaphore has to wait on this loop.
        first, second = await asyncio.gather(*(backend.chat(MESSAGES, n=1, temperature=0.0) for _ in range(2)))
        return first + second

    async def ask_twice_and_close() -> list[str | None]:
        try:
            return await ask_twice()
        finally:
            await backend.close()

    first_loop = asyncio.new_event_loop()
    try:
        assert None not in first_loop.run_until_complete(ask_twice())
        assert None not in asyncio.run(ask_twice_and_close())  # another loop, while the first is still open
        first_loop.run_until_complete(backend.close())
    finally:
        first_loop.close()
    assert None not in asyncio.run(ask_twice_and_close())  # and after the first loop is gone
    assert backend.stats.failures == 0 and backend.stats.requests == 6


def test_two_annotators_over_the_same_judges_both_annotate(server):
    # What the controller does: one Annotator for Stage 1, another for Stage 2, the same judges.
    judges = [LLMJudge(OpenAIChat("judge-a", server.base_url, retries=0), samples=1)]
    record = new_record(
        new_pair(
            [{"role": "user", "content": "q"}],
            [{"role": "assistant", "content": "a long and careful answer"}],
            [{"role": "assistant", "content": "no"}],
            "t",
        )
    )
    stage1, stage2 = Annotator(judges), Annotator(judges)
    try:
        for annotator in (stage1, stage2, stage1):
            result = annotator.stage()([record])
            assert not result.failed, result.failed
            (out,) = result.by_route()["annotated"]
            assert out.judge_aggregate.preference == PREFERENCE_CHOSEN
    finally:
        stage1.close()
        stage2.close()
