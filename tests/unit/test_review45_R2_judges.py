"""Review 45, the annotator's judges: transient 5xx a provider's CDN sends, and answers cut off at max_tokens."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import REGISTRY

from synpref.services.annotator import chat as chat_module
from synpref.services.annotator.annotate import LATE, Annotator
from synpref.services.annotator.chat import ChatStats, OpenAIChat
from synpref.services.annotator.judges import LLMJudge
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN
from testing.fake_judges import FakeOpenAI, completions_served

VERDICT = '{"rationale": "r", "better": 1}'


def answer(n: int, finish_reason: str = "stop") -> web.Response:
    choice = {"message": {"role": "assistant", "content": VERDICT}, "finish_reason": finish_reason}
    return web.json_response({"choices": [{**choice, "index": i} for i in range(n)]})


def statuses_then_answer(statuses: list[int]) -> tuple[list[int], object]:
    """A handler that answers `statuses` in turn, then a verdict; and the list of statuses it sent."""
    sent: list[int] = []

    async def completions(request: web.Request) -> web.Response:
        n = (await request.json())["n"]
        if len(sent) < len(statuses):
            sent.append(statuses[len(sent)])
            return web.Response(status=sent[-1], text=f"<html>error code: {sent[-1]}</html>")
        sent.append(200)
        return answer(n)

    return sent, completions


def ask(statuses: list[int]) -> tuple[list[str | None], list[int]]:
    sent, completions = statuses_then_answer(statuses)

    async def scenario() -> list[str | None]:
        async with completions_served(completions) as base_url:
            chat = OpenAIChat("cdn-judge", base_url, retries=3, backoff_s=0.0)
            try:
                return await chat.chat([{"role": "user", "content": "x"}], n=1, temperature=0.0)
            finally:
                await chat.close()

    return asyncio.run(scenario()), sent


def test_a_cdn_5xx_is_retried_like_any_transient_5xx():
    # A provider behind Cloudflare answers 524 for an origin that took too long and 520/522 for one that dropped the
    # connection; gateways answer 529 when overloaded. Before: only 500/502/503/504 were retried (the docs say 5xx),
    # so these gave up at once and every sample of the call abstained.
    texts, sent = ask([524, 520, 529])
    assert texts == [VERDICT]
    assert sent == [524, 520, 529, 200]


def test_a_5xx_that_never_changes_is_not_retried():
    texts, sent = ask([501])
    assert texts == [None]
    assert sent == [501]


def record(i: int):
    return new_record(
        new_pair(
            [{"role": "user", "content": f"Question {i}?"}],
            [{"role": "assistant", "content": f"Good answer {i}."}],
            [{"role": "assistant", "content": f"Bad answer {i}."}],
            "t",
        )
    )


def cut_off_total(model: str) -> float:
    return REGISTRY.get_sample_value("synpref_judge_cut_off_answers_total", {"model": model}) or 0.0


def test_a_judge_whose_answers_are_cut_off_at_max_tokens_is_warned_about_once_per_period(caplog):
    # A reasoning model spends max_tokens (512) on hidden reasoning: every answer comes back with finish_reason
    # "length" and abstains. Before: nothing said so (the judge looked as if it had no opinion on any pair).
    finish = {"reason": "length"}

    async def completions(request: web.Request) -> web.Response:
        return answer((await request.json())["n"], finish["reason"])

    async def scenario() -> list[list]:
        async with completions_served(completions) as base_url:
            judge = LLMJudge(OpenAIChat("reasoner", base_url, max_tokens=512), samples=2)
            annotator = Annotator([judge])
            try:
                batches = []
                for first, reason in [(0, "length"), (10, "length"), (20, "stop"), (30, "length")]:
                    finish["reason"] = reason
                    batches.append(await annotator.annotate([record(i) for i in range(first, first + 3)]))
                return batches
            finally:
                await judge.backend.close()

    before = cut_off_total("reasoner")
    with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.annotate"):
        batches = asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "cut off at max_tokens" in r.getMessage()]
    # The first cut-off batch warns, the second (same period) does not, a good batch ends the period, the next warns.
    assert len(warnings) == 2
    assert "reasoner: 6 of 6 answers in this batch" in warnings[0]
    assert "(512;" in warnings[0] and "annotator.max_tokens" in warnings[0]
    assert cut_off_total("reasoner") - before == 18  # 3 cut-off batches of 3 pairs x 2 samples
    # The cut-off answers stay abstentions; the good batch votes.
    assert {v.preference for r in batches[0] for v in r.votes} == {PREFERENCE_ABSTAIN}
    assert PREFERENCE_ABSTAIN not in {v.preference for r in batches[2] for v in r.votes}


def test_a_few_cut_off_answers_are_no_warning(caplog):
    served = 0

    async def completions(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        return answer((await request.json())["n"], "length" if served == 1 else "stop")

    async def scenario() -> None:
        async with completions_served(completions) as base_url:
            judge = LLMJudge(OpenAIChat("mostly-fine", base_url), samples=1)
            try:
                await Annotator([judge]).annotate([record(i) for i in range(4)])
            finally:
                await judge.backend.close()

    with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.annotate"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if "cut off at max_tokens" in r.getMessage()]
    assert cut_off_total("mostly-fine") == 1


def test_a_judge_that_misses_the_batch_deadline_is_one_warning_per_batch_not_one_per_pair(caplog):
    # A hung judge misses the deadline on every pair of the batch at the same instant. Before: one WARNING per pair
    # (hundreds a batch, every batch); now one per model and batch, with the count.
    with FakeOpenAI(slow_s=3.0) as server:
        ann = Annotator([LLMJudge(OpenAIChat("judge-slow", server.base_url), samples=1)], batch_deadline_s=0.3)
        try:
            with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.annotate"):
                result = ann.stage()([record(i) for i in range(5)])
        finally:
            ann.close()
    assert len(result.routed) == 5 and all(out.votes[0].rationale == LATE for _, out in result.routed)
    said = [r.getMessage() for r in caplog.records if "batch deadline" in r.getMessage()]
    assert said == ["judge-slow: 5 calls had no answer before the batch deadline (annotator.batch_deadline_s)"]


def test_an_endpoint_that_is_down_is_one_give_up_warning_a_minute_not_one_per_call(caplog, monkeypatch):
    # Before: every call given up on logged a WARNING, so an outage logged one per call of every batch (thousands).
    async def completions(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    async def calls(chat: OpenAIChat, count: int) -> None:
        messages = [[{"role": "user", "content": str(i)}] for i in range(count)]
        await asyncio.gather(*(chat.chat(m, n=1, temperature=0.0) for m in messages))

    async def scenario() -> ChatStats:
        async with completions_served(completions) as base_url:
            chat = OpenAIChat("down-judge", base_url, retries=0)
            try:
                await calls(chat, 20)
                monkeypatch.setattr(chat_module, "GAVE_UP_LOG_S", 0.0, raising=False)  # as if a minute had passed
                await calls(chat, 1)
            finally:
                await chat.close()
        return chat.stats

    with caplog.at_level(logging.WARNING, logger=chat_module.__name__):
        stats = asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if r.name == chat_module.__name__]
    assert stats.failures == 21
    assert len(said) == 2
    assert "giving up after 1 attempts: HTTP 503: down" in said[0] and "others" not in said[0]
    assert said[1].endswith("(19 others given up since the last one logged)")


def test_retries_are_not_logged_at_info(caplog):
    # A 429 storm retries every call of a batch: one INFO line per retry flooded the annotator's log (the attempts
    # metric counts them; a call given up on is still warned about).
    with caplog.at_level(logging.DEBUG, logger=chat_module.__name__):
        texts, sent = ask([429, 503])
    assert texts == [VERDICT] and sent == [429, 503, 200]
    retries = [r for r in caplog.records if r.name == chat_module.__name__ and "retry" in r.getMessage()]
    assert len(retries) == 2 and all(r.levelno == logging.DEBUG for r in retries)
