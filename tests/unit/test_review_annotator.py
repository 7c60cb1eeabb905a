"""Review findings in the annotator and the consistency filter, each pinned by a test."""

from __future__ import annotations

import asyncio
import math

import pytest

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import LLMJudge
from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.shared.config import FilterSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.retrieval import Example
from synpref.v1.pair_pb2 import DECISION_KEEP, PREFERENCE_CHOSEN, STAGE_ONE, STAGE_TWO, ModelScore, PairRecord
from testing.fake_judges import FakeOpenAI, chat_once_against

NAN = math.nan


def rec(p_gold: float | None = None, p_best: float | None = None, stage: int = STAGE_TWO) -> PairRecord:
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a long answer"}],
                    [{"role": "assistant", "content": "b"}], "test")  # fmt: skip
    out = new_record(pair)
    out.lineage.stage = stage  # type: ignore[assignment]
    if p_gold is not None:
        out.scores.append(ModelScore(model="gold", version="g", p=p_gold))
    if p_best is not None:
        out.scores.append(ModelScore(model="best", version="b", p=p_best))
    return out


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as s:
        yield s


# --- NaN model scores (a diverged RM: sigmoid(nan) or inf - inf) -------------------------------------------


@pytest.mark.parametrize("mode", ["flip", "discard"])
def test_a_nan_gold_score_is_a_dead_letter_not_a_disagreement(mode):
    # Before: NaN > 0.5 is False, so the gold RM "disagreed" and flip mode swapped the label on no evidence.
    result = make_filter_stage(FilterSettings(stage=2, on_disagreement=mode))([rec(p_gold=NAN, p_best=0.9)])
    assert not result.routed and len(result.failed) == 1 and "gold" in result.failed[0][1]


def test_a_nan_best_score_in_stage_one_is_a_dead_letter_not_a_confident_skip():
    # Before: NaN <= 0.5 + band is False, so the pair was SKIPped as "the best RM already agrees".
    result = make_filter_stage(FilterSettings(stage=1))([rec(p_best=NAN, stage=STAGE_ONE)])
    assert not result.routed and len(result.failed) == 1


class FixedExamples:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def examples(self, conversation, attributes, k):
        self.asked.append(k)
        return [Example(f"ex{i}", [{"role": "user", "content": f"q{i}"}], "good", "bad") for i in range(k)]


def test_a_nan_best_score_does_not_skip_the_judges_and_the_gold_agreeing_pair_is_kept(server):
    # Before: skip_confident read NaN as "confident", so no judge was asked; the filter then saw neither the
    # judges nor the best RM agree and flipped (or discarded) a pair the gold RM agrees with.
    examples = FixedExamples()
    judges = [LLMJudge(OpenAIChat("judge-a", server.base_url, backoff_s=0.01), samples=3)]
    ann = Annotator(judges, examples=examples, skip_confident=True, band=0.05)
    try:
        annotated = ann.stage()([rec(p_gold=0.9, p_best=NAN)])
    finally:
        ann.close()
    (record,) = annotated.by_route()["annotated"]
    assert len(record.votes) == 3 and record.judge_aggregate.preference == PREFERENCE_CHOSEN
    assert examples.asked == [9]  # an unknown p gets every example, as a missing one does
    decided = make_filter_stage(FilterSettings(stage=2, on_disagreement="flip"))([record])
    assert [route for route, _ in decided.routed] == ["curated"]
    assert decided.routed[0][1].decision.decision == DECISION_KEEP
    assert decided.routed[0][1].pair.id == record.pair.id  # kept, not flipped


# --- odd bodies from a judge endpoint (a proxy's error page, a provider's error shape) ------------------------


async def _serve_then_chat(handler, retries: int = 2) -> tuple[list[str | None], int]:
    """One OpenAIChat call (n=2) against `handler`; (the answers, how many requests the handler saw)."""
    return await chat_once_against(handler, n=2, retries=retries, backoff_s=0.001)


def test_a_bad_gateway_page_that_is_not_utf8_is_retried_not_raised():
    # Before: resp.text() raised UnicodeDecodeError out of chat(): the 502 was not retried and the judge's
    # exception dead-lettered the pair (every pair of a batch, when a proxy in front of the judge hiccups).
    from aiohttp import web

    def handler(attempt: int) -> web.Response:
        if attempt == 1:
            return web.Response(status=502, body=b"<html>Passerelle d\xe9faillante</html>", content_type="text/html")
        return web.json_response({"choices": [{"message": {"content": '{"better": 1}'}}] * 2})

    answers, requests = asyncio.run(_serve_then_chat(handler))
    assert answers == ['{"better": 1}'] * 2 and requests == 2


@pytest.mark.parametrize(
    "body", [{"choices": None, "error": {"message": "upstream"}}, {"choices": [{"message": "oops"}, None]}]
)
def test_a_200_whose_choices_have_the_wrong_shape_gives_abstentions_not_an_exception(body):
    # Before: TypeError / AttributeError out of chat() dead-lettered the pair instead of the judge abstaining.
    from aiohttp import web

    answers, _ = asyncio.run(_serve_then_chat(lambda attempt: web.json_response(body)))
    assert answers == [None, None]


# --- a LocalChat judge shared by two annotators (the controller keeps one annotator, and loop, per stage) ------


def test_a_local_judge_answers_for_two_annotators_on_their_own_event_loops():
    # Before: LocalChat's asyncio.Lock bound itself to the first loop that waited on it; the second annotator's
    # concurrent requests raised RuntimeError and every pair of its batch was dead-lettered.
    import time

    from synpref.services.annotator.local_chat import LocalChat

    class Model:
        def eval(self) -> Model:
            return self

    backend = LocalChat(Model(), tokenizer=None, name="local")

    def generate(messages, n, temperature):
        time.sleep(0.01)  # long enough for the concurrent requests of a batch to wait on each other
        return ['{"rationale": "r", "better": 1}'] * n

    backend._generate = generate  # type: ignore[method-assign]
    judges = [LLMJudge(backend, samples=2)]
    first, second = Annotator(judges), Annotator(judges)
    try:
        results = [a.stage()([rec(), rec(p_best=0.2)]) for a in (first, second)]
    finally:
        first.close()
        second.close()
    assert [len(r.failed) for r in results] == [0, 0], [r.failed for r in results]
    assert all(len(out.votes) == 2 for r in results for _, out in r.routed)
