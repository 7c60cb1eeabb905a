"""Review 42, the annotator under long pairs and slow retrieval: a judge's prompt budget (max_prompt_chars) and
example retrieval off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import web
from prometheus_client import REGISTRY

from synpref.services.annotator.annotate import LATE, Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import AnswerCache, AttributeLabeller, JudgeRequest, LLMJudge
from synpref.services.annotator.main import build_annotator
from synpref.services.annotator.prompts import judge_prompt
from synpref.shared.config import Settings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.retrieval import Example
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN
from testing.fake_judges import completions_served

VERDICT = '{"rationale": "r", "better": 1}'


def example(i: int) -> Example:
    # Each of its three texts is cut to 600 characters in the prompt: ~1,800 characters an example.
    return Example(f"ex{i}", [{"role": "user", "content": f"q{i} " + "x" * 900}], "p" * 900, "d" * 900)


def request(answer_chars: int = 20) -> JudgeRequest:
    return JudgeRequest(
        "p1",
        [{"role": "user", "content": "Explain tides."}],
        [{"role": "assistant", "content": "The moon's gravity. " + "m" * answer_chars}],
        [{"role": "assistant", "content": "Wind."}],
        examples=[example(i) for i in range(8)],
    )


def chars(req: JudgeRequest, n_examples: int) -> int:
    messages = judge_prompt(req.conversation, req.chosen, req.rejected, req.attributes, req.examples[:n_examples])
    return sum(len(m["content"]) for m in messages)


async def judged(req: JudgeRequest, budget: int, cache: AnswerCache, times: int = 1) -> tuple[list, list[dict]]:
    """The votes of a 2-sample judge with `budget` asked `times` about `req`, and the request bodies the server got."""
    bodies: list[dict] = []

    async def completions(http: web.Request) -> web.Response:
        body = await http.json()
        bodies.append(body)
        return web.json_response({"choices": [{"message": {"content": VERDICT}}] * body["n"]})

    async with completions_served(completions) as base_url:
        judge = LLMJudge(OpenAIChat("len-judge", base_url, retries=0), samples=2, cache=cache, max_prompt_chars=budget)
        try:
            for _ in range(times):
                votes = await judge.judge(req)
        finally:
            await judge.backend.close()
    return votes, bodies


def test_examples_that_push_the_prompt_over_max_prompt_chars_are_dropped_last_first_and_the_vote_counts(tmp_path):
    # 8 examples of ~1,800 characters put an ordinary pair over an 8k-token judge's context: the server answered
    # HTTP 400, the judge abstained, and every replay sent the same doomed prompt.
    req = request()
    budget = chars(req, 3) + 10  # three examples fit, a fourth does not
    assert chars(req, 8) > budget
    votes, bodies = asyncio.run(judged(req, budget, AnswerCache(tmp_path), times=2))
    assert bodies, "the pair fits without (some) examples: it is sent"
    for body in bodies:
        prompt = body["messages"]
        assert sum(len(m["content"]) for m in prompt) <= budget
        user = prompt[-1]["content"]
        assert "Verified example 3" in user and "Verified example 4" not in user
        assert "q0 " in user and "q3 " not in user  # the nearest kept, the least similar dropped
    assert all(v.preference != PREFERENCE_ABSTAIN for v in votes) and len(votes) == 2
    assert len(bodies) <= 2, "the answers to the trimmed prompt are cached: the replay sends nothing"


def test_a_pair_over_max_prompt_chars_alone_is_not_sent_and_its_samples_abstain(tmp_path):
    req = request(answer_chars=5000)
    budget = chars(req, 0) - 1
    before = REGISTRY.get_sample_value("synpref_judge_prompt_too_long_calls_total", {"model": "len-judge"}) or 0.0
    votes, bodies = asyncio.run(judged(req, budget, AnswerCache(tmp_path)))
    assert bodies == [], "a prompt the server must refuse is never sent"
    assert [v.preference for v in votes] == [PREFERENCE_ABSTAIN] * 2
    assert all("max_prompt_chars" in v.rationale for v in votes)
    after = REGISTRY.get_sample_value("synpref_judge_prompt_too_long_calls_total", {"model": "len-judge"})
    assert after == before + 1


def test_no_budget_sends_every_example(tmp_path):
    req = request(answer_chars=5000)
    votes, bodies = asyncio.run(judged(req, 0, AnswerCache(None)))
    assert bodies and all("Verified example 8" in b["messages"][-1]["content"] for b in bodies)
    assert all(v.preference != PREFERENCE_ABSTAIN for v in votes) and len(votes) == 2


def test_the_setting_reaches_the_judges_and_the_labeller():
    judge = {"name": "j", "base_url": "http://127.0.0.1:9/v1", "max_prompt_chars": 24000}
    settings = Settings.model_validate({"annotator": {"judges": [judge], "attribute_model": judge, "cache_dir": ""}})
    annotator = build_annotator(settings)
    assert [j.max_prompt_chars for j in annotator.judges] == [24000]  # type: ignore[attr-defined]
    assert annotator.labeller is not None and annotator.labeller.max_prompt_chars == 24000


def record(i: int):
    return new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": "a long and careful answer"}],
            [{"role": "assistant", "content": "no"}],
            "t",
        )
    )


class WaitingExamples:
    """An example source whose call i waits (bounded) until the judge server has answered i requests: that can only
    happen when retrieval runs off the event loop that serves and sends them."""

    def __init__(self, served: list[threading.Event]) -> None:
        self.served = served
        self.calls = 0
        self.saw: list[bool] = []

    def examples(self, conversation, attributes, k):
        i, self.calls = self.calls, self.calls + 1
        self.saw.append(i == 0 or self.served[i - 1].wait(1.0))
        return [Example(f"ex{i}", [{"role": "user", "content": "q"}], "good", "bad")]


def test_retrieval_runs_off_the_event_loop_so_judge_calls_go_on_meanwhile():
    # Before, annotate_one embedded and searched on the event loop: every judge request of the batch stalled for
    # the whole retrieval of every other pair (tens of ms each), and the batch deadline could not interrupt it.
    pairs = 3
    served = [threading.Event() for _ in range(pairs)]
    answered = 0

    async def scenario() -> list:
        async def completions(http: web.Request) -> web.Response:
            nonlocal answered
            n = (await http.json())["n"]
            served[answered].set()
            answered += 1
            return web.json_response({"choices": [{"message": {"content": VERDICT}}] * n})

        async with completions_served(completions) as base_url:
            judge = LLMJudge(OpenAIChat("quick", base_url, retries=0), samples=1)
            annotator = Annotator([judge], examples=source, max_examples=1)
            try:
                return await annotator.annotate([record(i) for i in range(pairs)])
            finally:
                await judge.backend.close()
                annotator.close()

    source = WaitingExamples(served)
    results = asyncio.run(scenario())
    assert source.saw == [True] * pairs, "a judge request was served while the next pair's examples were retrieved"
    assert all(not isinstance(r, BaseException) and r.judge_aggregate.judges_voting == 1 for r in results)
    assert [list(r.retrieved_example_ids) for r in results] == [["ex0"], ["ex1"], ["ex2"]]  # type: ignore[union-attr]


class HungExamples:
    """An example source that hangs until released (bounded)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def examples(self, conversation, attributes, k):
        self.release.wait(5.0)
        return []


def test_the_batch_deadline_interrupts_a_hung_retrieval():
    source = HungExamples()
    judge = LLMJudge(OpenAIChat("unused", "http://127.0.0.1:9/v1", retries=0), samples=2)
    annotator = Annotator([judge], examples=source, batch_deadline_s=0.5)
    try:
        started = time.monotonic()
        result = annotator.stage()([record(0)])
        took = time.monotonic() - started
    finally:
        source.release.set()
        annotator.close()
    assert took < 3.0, f"the batch took {took:.1f}s against a 0.5 s deadline"
    ((_, out),) = result.routed
    assert [v.rationale for v in out.votes] == [LATE, LATE]
    assert list(out.retrieved_example_ids) == []


class Counting:
    """A chat backend that counts its calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, messages, *, n, temperature, response_format=None):
        self.calls += 1
        return [None] * n


def test_a_labeller_prompt_over_max_prompt_chars_is_not_sent():
    backend = Counting()
    labeller = AttributeLabeller(backend, AnswerCache(None), max_prompt_chars=50)
    assert asyncio.run(labeller.label(request())) is None
    assert backend.calls == 0
