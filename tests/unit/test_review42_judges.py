"""Review 42, the annotator's LLM judges: unfinished reasoning traces, cache write failures, connection pool size."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import AnswerCache, AttributeLabeller, LLMJudge
from synpref.services.annotator.prompts import parse_judgement
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN
from testing.fake_judges import TIDES_ATTRIBUTES, completions_served, tides_request

ATTRIBUTES = TIDES_ATTRIBUTES
REQUEST = tides_request()


@pytest.mark.parametrize(
    "text",
    [
        # max_tokens cut the trace before the model decided: a draft inside it is not its verdict.
        '<think>Draft: {"rationale": "d", "better": 1}. Hmm, but Candidate 2 handles the edge case',
        '<think>Maybe ```json\n{"rationale": "d", "better": 2}\n``` no, wait',
        # A finished trace, then a second one the budget cut off.
        '<think>ok</think>\n<think>Draft: {"rationale": "d", "better": 1}',
    ],
)
def test_a_draft_verdict_in_an_unfinished_reasoning_trace_is_no_vote(text):
    assert parse_judgement(text)[0] is None


def test_a_finished_trace_still_yields_the_answer_after_it():
    assert parse_judgement('<think>Draft {"better": 1}</think>\n{"rationale": "r", "better": 2}')[0] == 2
    # A rationale may quote a candidate's own unclosed tag: that is no trace of the judge's.
    assert parse_judgement('{"rationale": "Candidate 1 leaks a bare <think> tag", "better": 2}')[0] == 2


class Answering:
    """A chat backend that answers every judge prompt with a verdict and every labeller prompt with attributes."""

    name = "answering"

    async def chat(self, messages, *, n, temperature, response_format=None):
        if "preference attributes" in messages[-1]["content"]:
            return [ATTRIBUTES] * n
        return ['{"rationale": "r", "better": 1}'] * n

    async def close(self) -> None:
        return None


def test_a_cache_that_cannot_be_written_loses_no_pair(tmp_path):
    # The cache folder on a full or read-only volume: the answers came back, only their copy on disk failed. Before,
    # the OSError of put() failed every pair of the batch into the dead-letter topic.
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")  # mkdir under it raises an OSError, as ENOSPC would
    cache = AnswerCache(blocker)
    annotator = Annotator([LLMJudge(Answering(), samples=2, cache=cache)], AttributeLabeller(Answering(), cache=cache))
    record = new_record(
        new_pair(
            [{"role": "user", "content": "Explain tides."}],
            [{"role": "assistant", "content": "The moon's gravity."}],
            [{"role": "assistant", "content": "Wind."}],
            "t",
        )
    )
    try:
        result = annotator.stage()([record])
    finally:
        annotator.close()
    assert result.failed == []
    (out,) = result.by_route()["annotated"]
    assert out.attributes.task_category == "science"
    assert len(out.votes) == 2 and all(v.preference != PREFERENCE_ABSTAIN for v in out.votes)


def test_max_concurrency_above_aiohttps_default_pool_is_what_the_server_sees():
    # aiohttp's connector opens at most 100 connections by default, and a request waiting for one spends its
    # timeout_s there: max_concurrency 120 sent 100 at once, and the 20 others timed out against a busy server.
    want = 120

    async def scenario() -> int:
        in_flight = peak = 0
        everyone = asyncio.Event()

        async def completions(request: web.Request) -> web.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight >= want:
                everyone.set()
            try:
                await asyncio.wait_for(everyone.wait(), 5.0)
            except TimeoutError:
                everyone.set()  # not all of them ever arrived: release the ones here
            in_flight -= 1
            return web.json_response({"choices": [{"message": {"content": '{"better": 1}'}}]})

        async with completions_served(completions) as base_url:
            chat = OpenAIChat("m", base_url, max_concurrency=want, timeout_s=30, retries=0)
            try:
                answers = await asyncio.gather(
                    *(chat.chat([{"role": "user", "content": "x"}], n=1, temperature=0.0) for _ in range(want))
                )
            finally:
                await chat.close()
        assert all(a == ['{"better": 1}'] for a in answers)
        return peak

    assert asyncio.run(scenario()) == want


def test_an_answer_cut_off_at_max_tokens_is_no_vote_and_is_asked_again(tmp_path):
    # A reasoning judge whose chat template opened the trace (its answer holds no "<think>"), cut off by max_tokens
    # while drafting: the draft's verdict was counted as its vote, and cached, so raising max_tokens changed nothing.
    draft = 'Let me draft the reply: {"rationale": "d", "better": 1}. But Candidate 2 covers the edge case, so'
    requests = 0

    async def scenario() -> list:
        nonlocal requests

        async def completions(request: web.Request) -> web.Response:
            nonlocal requests
            requests += 1
            n = (await request.json())["n"]
            choice = {"message": {"role": "assistant", "content": draft}, "finish_reason": "length"}
            return web.json_response({"choices": [choice] * n})

        async with completions_served(completions) as base_url:
            judge = LLMJudge(OpenAIChat("r1", base_url), samples=2, cache=AnswerCache(tmp_path))
            try:
                votes = await judge.judge(REQUEST)
                await judge.judge(REQUEST)
            finally:
                await judge.backend.close()
        return votes

    votes = asyncio.run(scenario())
    assert [v.preference for v in votes] == [PREFERENCE_ABSTAIN] * 2
    assert all("max_tokens" in v.rationale for v in votes)
    first_call = len({v.candidate_order_swapped for v in votes})  # one request per candidate order
    assert requests == 2 * first_call, "a cut-off answer is not cached: the replay asks again"
