"""A judge endpoint's rate limit: OpenAIChat waits as long as the server's Retry-After asks before retrying."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

from aiohttp import web

from testing.fake_judges import chat_once_against

ANSWER = {"choices": [{"message": {"content": '{"better": 1}'}}]}


async def _chat_against(
    limited_until: float, retry_after: str, status: int = 429, timeout_s: float = 10.0
) -> tuple[list[str | None], int]:
    """One call (3 retries, 1 ms backoff) to a server that answers `status` + Retry-After until `limited_until`
    (time.monotonic()), then 200; (the answers, how many requests the server saw)."""

    def answer(attempt: int) -> web.Response:
        if time.monotonic() < limited_until:
            return web.Response(status=status, text="rate limited", headers={"Retry-After": retry_after})
        return web.json_response(ANSWER)

    return await chat_once_against(answer, retries=3, backoff_s=0.001, timeout_s=timeout_s)


def test_a_429_with_retry_after_seconds_is_retried_after_that_wait_not_given_up():
    # Before: the 1 ms exponential backoff spent all 3 retries inside the provider's 1 s window: the judge abstained.
    answers, requests = asyncio.run(_chat_against(time.monotonic() + 1.0, "1"))
    assert answers == ['{"better": 1}'] and requests == 2


def test_a_503_with_retry_after_as_an_http_date_is_honoured():
    # The date has one-second resolution: 3 s ahead waits at least 2 s, past the 1.5 s overload.
    answers, requests = asyncio.run(
        _chat_against(time.monotonic() + 1.5, formatdate(time.time() + 3, usegmt=True), 503)
    )
    assert answers == ['{"better": 1}'] and requests == 2


def test_retry_after_is_parsed_and_bounded():
    from synpref.services.annotator.chat import MAX_RETRY_AFTER_S, retry_after_s

    assert retry_after_s(None) is None and retry_after_s("") is None and retry_after_s("soon") is None
    assert retry_after_s(" 7 ") == 7.0
    assert retry_after_s("86400") == MAX_RETRY_AFTER_S  # a day-long answer must not park a Stage 2 batch
    assert retry_after_s(formatdate(time.time() - 60, usegmt=True)) == 0.0  # a date in the past: no extra wait
    assert 25 <= (retry_after_s(formatdate(time.time() + 30, usegmt=True)) or 0) <= 30
    assert 25 <= (retry_after_s(formatdate(time.time() + 30)) or 0) <= 30  # "-0000": GMT, not local time


def test_retry_after_waits_no_longer_than_one_request_may_take():
    async def call() -> tuple[list[str | None], int]:
        chat_started = time.monotonic()
        out = await _chat_against(time.monotonic() + 0.3, "30", timeout_s=0.5)
        assert time.monotonic() - chat_started < 5
        return out

    answers, requests = asyncio.run(call())
    assert answers == ['{"better": 1}'] and requests == 2
