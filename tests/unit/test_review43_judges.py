"""Review 43, the annotator's judges and answer cache: the provenance of a verdict (retrieved_example_ids) names
only the examples a judge's prompt held, and a cache entry that cannot be read is a miss, never an error."""

from __future__ import annotations

import asyncio
import errno
import re
from pathlib import Path

import pytest
from aiohttp import web

from synpref.services.annotator.annotate import Annotator
from synpref.services.annotator.chat import OpenAIChat
from synpref.services.annotator.judges import AnswerCache, JudgeRequest, LLMJudge, examples_shown
from synpref.services.annotator.prompts import PROMPT_EXAMPLES, judge_prompt
from synpref.shared.pairs import message_dicts, new_pair, new_record
from synpref.shared.retrieval import Example
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN, PREFERENCE_CHOSEN, JudgeVote
from testing.fake_judges import completions_served, tides_request

VERDICT = '{"rationale": "r", "better": 1}'


def example(i: int) -> Example:
    # ~1,800 characters in a prompt (each text is cut to 600); "q<i> " marks it in a prompt sent.
    return Example(f"ex{i}", [{"role": "user", "content": f"q{i} " + "x" * 900}], "p" * 900, "d" * 900)


def with_examples(request: JudgeRequest, n: int) -> JudgeRequest:
    return JudgeRequest(request.pair_id, request.conversation, request.chosen, request.rejected,
                        examples=[example(i) for i in range(n)])  # fmt: skip


def budget_for(request: JudgeRequest, n_examples: int) -> int:
    """A max_prompt_chars that holds the request's first `n_examples` examples and not one more."""
    r = request
    messages = judge_prompt(r.conversation, r.chosen, r.rejected, r.attributes, r.examples[:n_examples])
    return sum(len(m["content"]) for m in messages) + 10


class Unused:
    """A chat backend never called (shown_examples sends nothing)."""

    name = "unused"

    async def chat(self, messages, *, n, temperature, response_format=None):
        raise AssertionError("not called")


class NoPrompt:
    """A judge without a prompt (a simulated judge): it counts as given every example."""

    name = "no-prompt"

    async def judge(self, request):
        return [JudgeVote(judge=self.name, sample=0, preference=PREFERENCE_CHOSEN)]


def test_the_examples_shown_are_those_some_judges_budget_kept():
    req = with_examples(tides_request(), 8)
    three = LLMJudge(Unused(), max_prompt_chars=budget_for(req, 3))
    five = LLMJudge(Unused(), max_prompt_chars=budget_for(req, 5))
    none = LLMJudge(Unused(), max_prompt_chars=budget_for(req, 0) - 20)  # the pair alone is over: not sent
    ids = [[e.id for e in examples_shown(judges, req)] for judges in ([three], [three, five], [none], [])]
    assert ids == [[f"ex{i}" for i in range(3)], [f"ex{i}" for i in range(5)], [], []]
    # No budget: what the prompt renders (8), never the examples past it; a judge without a prompt: all of them.
    many = with_examples(tides_request(), PROMPT_EXAMPLES + 2)
    assert len(examples_shown([LLMJudge(Unused())], many)) == PROMPT_EXAMPLES
    assert len(examples_shown([none, NoPrompt()], req)) == 8


class EightExamples:
    def examples(self, conversation, attributes, k):
        return [example(i) for i in range(k)]


def test_a_record_lists_only_the_examples_its_judges_prompts_held():
    # Before, retrieved_example_ids listed all 8 retrieved examples while a judge's max_prompt_chars kept 3 in its
    # prompt: the desk showed reviewers 5 "verified examples" the judges never saw.
    tides = tides_request()
    record = new_record(new_pair(tides.conversation, tides.chosen, tides.rejected, "t"))
    pair = record.pair
    req = JudgeRequest(pair.id, message_dicts(pair.conversation), message_dicts(pair.chosen),
                       message_dicts(pair.rejected), examples=[example(i) for i in range(8)])  # fmt: skip
    prompts: list[str] = []

    async def scenario():
        async def completions(http: web.Request) -> web.Response:
            body = await http.json()
            prompts.append(body["messages"][-1]["content"])
            return web.json_response({"choices": [{"message": {"content": VERDICT}}] * body["n"]})

        async with completions_served(completions) as base_url:
            judge = LLMJudge(
                OpenAIChat("budget-3", base_url, retries=0), samples=2, max_prompt_chars=budget_for(req, 3)
            )
            annotator = Annotator([judge], examples=EightExamples(), max_examples=8)
            try:
                return await annotator.annotate([record])
            finally:
                await judge.backend.close()
                annotator.close()

    (out,) = asyncio.run(scenario())
    assert not isinstance(out, BaseException) and prompts
    sent = sorted({f"ex{i}" for p in prompts for i in re.findall(r"^q(\d+) ", p, re.MULTILINE)})
    assert sent == ["ex0", "ex1", "ex2"]
    assert list(out.retrieved_example_ids) == sent


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.ESTALE])
def test_an_entry_that_cannot_be_read_is_a_miss_and_the_judge_is_asked_again(tmp_path, monkeypatch, code):
    # A regression guard (the suspect did not reproduce): the whole read is inside get()'s guarded block.
    cache = AnswerCache(tmp_path)
    cache.put([{"text": VERDICT}], "judge", "p1", "m", "v")
    real = Path.read_bytes

    def failing(self: Path) -> bytes:
        if self.suffix == ".json":
            raise OSError(code, "injected")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    assert cache.get("judge", "p1", "m", "v") is None and cache.read_errors == 1

    class Answering:
        name = "m"

        async def chat(self, messages, *, n, temperature, response_format=None):
            return [VERDICT] * n

    votes = asyncio.run(LLMJudge(Answering(), samples=2, cache=cache, prompt_version="v").judge(tides_request()))
    assert len(votes) == 2 and all(v.preference != PREFERENCE_ABSTAIN for v in votes)
