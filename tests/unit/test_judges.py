"""Judge client against a local OpenAI-compatible server: answers, malformed, slow, 5xx; cache; aggregation."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import (
    AnswerCache,
    AttributeLabeller,
    JudgeRequest,
    LLMJudge,
    aggregate,
    candidate_orders,
)
from synpref.services.annotator.prompts import parse_judgement
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN, PREFERENCE_CHOSEN, PREFERENCE_REJECTED, JudgeVote
from testing.fake_judges import FakeOpenAI

REQUEST = JudgeRequest(
    pair_id="p1",
    conversation=[{"role": "user", "content": "Explain tides."}],
    chosen=[{"role": "assistant", "content": "The moon's gravity pulls the oceans, making two bulges."}],
    rejected=[{"role": "assistant", "content": "Wind."}],
    attributes={"annotation_guideline": "Prefer correct physics.", "desired_attributes": ["correct"]},
)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(slow_s=1.0, fail_first=2) as s:
        yield s


def judge(server, model, samples=5, cache=None, **chat):
    backend = OpenAIChat(model, server.base_url, api_key_env="SYNPREF_TEST_KEY", backoff_s=0.01, **chat)
    return LLMJudge(backend, samples=samples, temperature=0.7, cache=cache, seed=1)


def run(coro):
    return asyncio.run(coro)


async def judged(j, request=REQUEST):
    try:
        return await j.judge(request)
    finally:
        await j.backend.close()


def test_deterministic_answers_are_mapped_back_through_the_random_order(server, monkeypatch):
    monkeypatch.setenv("SYNPREF_TEST_KEY", "sk-test")
    votes = run(judged(judge(server, "judge-a", samples=8)))
    orders = candidate_orders("p1", "judge-a", 8, 1)
    assert any(orders) and not all(orders)  # both orders occur, so the mapping is exercised
    assert [v.candidate_order_swapped for v in votes] == orders
    assert [v.sample for v in votes] == list(range(8))
    # The server prefers the longer candidate, which is "chosen" in either position.
    assert {v.preference for v in votes} == {PREFERENCE_CHOSEN}
    assert server.auth["Bearer sk-test"] >= 1
    assert aggregate(votes).preference == PREFERENCE_CHOSEN


def test_malformed_answers_are_abstentions(server):
    votes = run(judged(judge(server, "judge-malformed", samples=3)))
    assert [v.preference for v in votes] == [PREFERENCE_ABSTAIN] * 3
    agg = aggregate(votes)
    assert (agg.preference, agg.judges_voting, agg.judges_abstaining) == (PREFERENCE_ABSTAIN, 0, 1)


def test_slow_answers_time_out_and_end_as_abstentions(server):
    j = judge(server, "judge-slow", samples=2, timeout_s=0.2, retries=1)
    before = server.requests["judge-slow"]
    votes = run(judged(j))
    assert [v.preference for v in votes] == [PREFERENCE_ABSTAIN] * 2
    assert all("request failed" in v.rationale for v in votes)
    assert j.backend.stats.retries >= 1 and j.backend.stats.failures >= 1
    assert server.requests["judge-slow"] - before >= 2  # first try + one retry, per candidate order


def test_5xx_is_retried_with_backoff_then_answers(server):
    j = judge(server, "judge-flaky", samples=3, retries=3)
    votes = run(judged(j))
    assert {v.preference for v in votes} == {PREFERENCE_CHOSEN}
    assert j.backend.stats.retries >= 2 and j.backend.stats.failures == 0


def test_persistent_5xx_gives_abstentions_not_an_exception(server):
    j = judge(server, "judge-down", samples=2, retries=1)
    votes = run(judged(j))
    assert [v.preference for v in votes] == [PREFERENCE_ABSTAIN] * 2


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_attempts_are_counted_per_model_and_result(server):
    flaky, down, refused = (judge(server, m, samples=1, retries=3) for m in ("m-flaky", "m-down", "m-forbidden"))
    for j in (flaky, down, refused):
        run(judged(j))
    attempts = "synpref_judge_http_attempts_total"
    # fail_first=2: two 503s, then the answer; a judge that is down is tried 1 + 3 times.
    assert metric(attempts, model="m-flaky", result="retryable") == 2
    assert metric(attempts, model="m-flaky", result="ok") == 1
    assert metric(attempts, model="m-down", result="retryable") == 4
    assert metric(attempts, model="m-forbidden", result="refused") == 1  # 403: not retried
    assert server.requests["m-forbidden"] == 1
    gave_up = "synpref_judge_gave_up_calls_total"
    assert [metric(gave_up, model=m) for m in ("m-flaky", "m-down", "m-forbidden")] == [0, 1, 1]
    assert metric("synpref_judge_http_seconds_count", model="m-down") == 4
    assert metric("synpref_judge_http_seconds_sum", model="m-down") > 0


def test_cache_replay_costs_no_calls(server, tmp_path):
    cache = AnswerCache(tmp_path / "cache")
    first = run(judged(judge(server, "judge-cached", cache=cache)))
    calls = server.requests["judge-cached"]
    assert calls >= 1
    again = run(judged(judge(server, "judge-cached", cache=AnswerCache(tmp_path / "cache"))))
    assert server.requests["judge-cached"] == calls
    assert [v.preference for v in again] == [v.preference for v in first]
    # A failed request is not cached: its replay asks again.
    down_cache = AnswerCache(tmp_path / "down")
    run(judged(judge(server, "judge-down", samples=1, cache=down_cache, retries=0)))
    run(judged(judge(server, "judge-down", samples=1, cache=down_cache, retries=0)))
    assert down_cache.hits == 0


def test_attribute_labeller_parses_the_tuple(server, tmp_path):
    labeller = AttributeLabeller(OpenAIChat("attr-model", server.base_url), cache=AnswerCache(tmp_path))

    async def go():
        try:
            return await labeller.label(REQUEST)
        finally:
            await labeller.backend.close()

    attrs = run(go())
    assert attrs is not None and attrs.task_category and attrs.annotation_guideline
    assert list(attrs.desired_attributes) == ["helpful", "correct"] and attrs.annotator_model == "attr-model"
    bad = AttributeLabeller(OpenAIChat("attr-malformed", server.base_url))

    async def go_bad():
        try:
            return await bad.label(REQUEST)
        finally:
            await bad.backend.close()

    assert run(go_bad()) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"rationale": "r", "better": 2}', 2),
        ('Sure! ```json\n{"better": 1, "rationale": "x"}\n```', 1),
        ('prose {"better": "Candidate 2"} more prose', 2),
        # Text verdicts (json_object / none modes, where no schema forces an integer): before, two digits abstained.
        ('{"better": "1 (Candidate 1)"}', 1),
        ('{"better": "2 is better than 1"}', 2),
        ('{"better": "Response #2"}', 2),
        ('{"better": "neither 1 nor 2"}', None),
        ('{"better": "10"}', None),
        ('{"better": "0 (tie)"}', None),
        ('{"better": 0}', None),
        ('{"better": true}', None),
        ('{"better": 3}', None),
        ("Candidate 1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judgement(text, expected):
    assert parse_judgement(text)[0] == expected


def test_aggregation_within_then_across_judges():
    def votes(judge, prefs):
        return [JudgeVote(judge=judge, sample=i, preference=p) for i, p in enumerate(prefs)]

    c, r, a = PREFERENCE_CHOSEN, PREFERENCE_REJECTED, PREFERENCE_ABSTAIN
    agg = aggregate(votes("j1", [c, c, r]) + votes("j2", [r, a, a]) + votes("j3", [c, r, a]) + votes("j4", [c, a, a]))
    # j1 -> chosen, j2 -> rejected, j3 -> tie (abstains), j4 -> chosen: 2 vs 1 across judges.
    assert (agg.preference, agg.judges_voting, agg.judges_abstaining) == (c, 3, 1)
    assert agg.agreement == 2 / 3  # 2 of 3 voting judges, one int division
    tie = aggregate(votes("j1", [c]) + votes("j2", [r]))
    assert tie.preference == a and tie.agreement == 0.0


def test_judge_prompt_carries_guideline_examples_and_candidates_in_the_given_order():
    from synpref.services.annotator.prompts import judge_prompt
    from synpref.shared.retrieval import Example

    examples = [
        Example(f"ex{i}", [{"role": "user", "content": f"example question {i}"}], f"good {i}", f"bad {i}",
                {"task_category": "science", "desired_attributes": ["accurate"], "annotation_guideline": f"g{i}"})
        for i in range(10)
    ]  # fmt: skip
    system, user = judge_prompt(REQUEST.conversation, REQUEST.rejected, REQUEST.chosen, REQUEST.attributes, examples)
    text = user["content"]
    assert system["role"] == "system" and "Prefer correct physics." in text
    assert text.count("## Verified example") == 8  # never more than 8
    assert "category=science" in text and "Guideline: g7" in text and "good 7" in text and "g8" not in text
    assert text.index("## Candidate 1\nWind.") < text.index("## Candidate 2\nThe moon")
    assert "Explain tides." in text
