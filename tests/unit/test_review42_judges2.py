"""Review 42, the judges' answer cache and HTTP accounting: unreadable cache entries, 200 answers with no choices,
and the verdict among several JSON objects."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from synpref.services.annotator.judges import AnswerCache, AttributeLabeller, LLMJudge
from synpref.services.annotator.prompts import parse_attributes, parse_judgement
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN
from testing.fake_judges import TIDES_ATTRIBUTES, chat_once_against, tides_request

VERDICT = '{"rationale": "r", "better": 1}'
ATTRIBUTES = TIDES_ATTRIBUTES
REQUEST = tides_request()
READ_ERRORS = "synpref_judge_cache_read_errors_total"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Answering:
    """A chat backend that answers judge prompts with a verdict and labeller prompts with attributes, counted."""

    name = "answering"

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, messages, *, n, temperature, response_format=None):
        self.calls += 1
        if "preference attributes" in messages[-1]["content"]:
            return [ATTRIBUTES] * n
        return [VERDICT] * n

    async def close(self) -> None:
        return None


def failing_io_under(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Every stat, open and read of a path under `root` raises EIO, as a failing disk or a stale NFS handle does."""

    def patched(name: str) -> None:
        original = getattr(Path, name)

        def failing(self: Path, *args, **kwargs):
            if str(self).startswith(str(root)):
                raise OSError(errno.EIO, "Input/output error", str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, name, failing)

    for name in ("stat", "open", "read_text", "read_bytes"):
        patched(name)


def test_a_cache_that_cannot_be_read_is_a_miss_and_the_judges_still_answer(tmp_path, monkeypatch, caplog):
    # Before: path.exists() raised the EIO (only ENOENT-like errors mean False), the judge call failed and the pair
    # was dead-lettered, although asking the judge again would do.
    root = tmp_path / "cache"
    cache = AnswerCache(root)
    cache.put([{"sample": 0}], "judge", "p0", "m", "v")  # the folder exists; now its disk fails
    failing_io_under(monkeypatch, root)
    backend = Answering()
    judge = LLMJudge(backend, samples=2, cache=cache)
    labeller = AttributeLabeller(backend, cache=cache)
    before = metric(READ_ERRORS)
    with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.answer_cache"):
        votes = asyncio.run(judge.judge(REQUEST))
        attributes = asyncio.run(labeller.label(REQUEST))
    assert [v.preference != PREFERENCE_ABSTAIN for v in votes] == [True, True]
    assert attributes is not None and attributes.task_category == "science"
    assert cache.misses == 2 and cache.hits == 0  # one get() each, both asked the backend
    assert metric(READ_ERRORS) - before == 2 and cache.read_errors == 2
    # Logged on the first failure (and every 1000th after), as failed writes are: not once a pair.
    (logged,) = [r.getMessage() for r in caplog.records if "reads failed" in r.getMessage()]
    assert logged.startswith(f"answer cache {root}: 1 reads failed so far") and "Input/output error" in logged


def test_read_failures_are_logged_on_the_first_and_every_1000th(tmp_path, caplog):
    cache = AnswerCache(tmp_path)
    key = ("judge", "p1", "m", "v")
    path = cache._path(*key)
    assert path is not None
    path.mkdir(parents=True)  # a directory where the entry should be: every read fails (even as root)
    with caplog.at_level(logging.WARNING, logger="synpref.services.annotator.answer_cache"):
        for _ in range(1001):
            assert cache.get(*key) is None
    assert cache.read_errors == 1001 and cache.misses == 1001
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "1 reads failed" in logged[0] and "1001 reads failed" in logged[1]


@pytest.mark.parametrize(
    "content",
    [
        b'[{"sample": 0, "swapped": false, "te',  # torn: a filesystem without atomic rename, or a crash mid-write
        b"\xff\xfe\x00garbage\x80\x81",  # a disk error: not even UTF-8 (UnicodeDecodeError escaped before)
    ],
)
def test_a_cache_entry_that_is_not_json_is_a_counted_miss(tmp_path, content):
    cache = AnswerCache(tmp_path)
    key = ("judge", "p1", "answering", "v")
    path = cache._path(*key)
    assert path is not None
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    before = metric(READ_ERRORS)
    assert cache.get(*key) is None
    assert cache.misses == 1 and cache.read_errors == 1 and metric(READ_ERRORS) - before == 1
    # The judge asks again and its answer replaces the bad entry.
    judge = LLMJudge(Answering(), samples=1, cache=cache, prompt_version="v")
    (vote,) = asyncio.run(judge.judge(REQUEST))
    assert vote.preference != PREFERENCE_ABSTAIN
    assert cache.get("judge", "p1", "answering", "v")[0]["text"] == VERDICT


def test_an_absent_entry_is_a_miss_but_no_read_error(tmp_path):
    cache = AnswerCache(tmp_path)
    assert cache.get("judge", "nothing", "m", "v") is None
    assert cache.misses == 1 and cache.read_errors == 0


# --- a 200 answer with no choices --------------------------------------------------------------------------------


BAD_BODIES = [None, [], {"error": {"message": "upstream timed out", "code": 504}}, {"choices": None, "error": {}}]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_200_without_choices_is_a_failed_attempt_and_is_asked_again(body):
    # Before: counted "ok", not retried, and every sample abstained with the give-up counter still: an operator saw
    # a healthy endpoint that answered nothing.
    def handler(attempt: int) -> web.Response:
        if attempt == 1:
            return web.json_response(body)
        return web.json_response({"choices": [{"message": {"content": VERDICT}}] * 2})

    attempts = "synpref_judge_http_attempts_total"
    ok, bad = metric(attempts, model="m", result="ok"), metric(attempts, model="m", result="bad_body")
    answers, requests = asyncio.run(chat_once_against(handler, n=2, retries=2, backoff_s=0.001))
    assert answers == [VERDICT, VERDICT] and requests == 2
    assert metric(attempts, model="m", result="bad_body") - bad == 1
    assert metric(attempts, model="m", result="ok") - ok == 1


def test_an_endpoint_that_always_answers_no_choices_is_given_up_on_after_its_retries():
    gave_up = "synpref_judge_gave_up_calls_total"
    before = metric(gave_up, model="m")
    answers, requests = asyncio.run(
        chat_once_against(lambda attempt: web.json_response(None), n=2, retries=2, backoff_s=0.001)
    )
    assert answers == [None, None] and requests == 3
    assert metric(gave_up, model="m") - before == 1


def test_a_server_that_ignores_n_still_answers_once_without_a_retry():
    answers, requests = asyncio.run(
        chat_once_against(
            lambda attempt: web.json_response({"choices": [{"message": {"content": VERDICT}}]}), n=2, retries=2
        )
    )
    assert answers == [VERDICT, None] and requests == 1


# --- the verdict among several JSON objects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"rationale": "r", "better": 2}\n{"note": "confidence is low"}', 2),
        ('Verdict: {"better": 1, "rationale": "x"} and my scratch state {"step": 3}', 1),
        ('```json\n{"better": 2}\n```\nAlso: ```json\n{"confidence": 0.4}\n```', 2),
        ('{"winner": 2} {"meta": {"tokens": 10}}', 2),
        # Several with a verdict: the last one still wins (a model that reasons in prose states its verdict last).
        ('Draft {"better": 1}. On reflection {"better": 2} {"note": 1}', 2),
        # None has the key: as before, the last object decides (and abstains).
        ('{"note": 1} {"other": 2}', None),
    ],
)
def test_the_verdict_is_the_last_object_that_has_one(text, expected):
    assert parse_judgement(text)[0] == expected


def test_the_attributes_are_the_last_object_that_has_them():
    attributes = parse_attributes(ATTRIBUTES + '\n{"note": "the guideline is short"}', "m")
    assert attributes is not None and attributes.task_category == "science"
