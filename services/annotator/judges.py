"""Judges, their answer cache, and vote aggregation.

A Judge turns one JudgeRequest (a pair, its attributes, retrieved examples) into n
JudgeVotes whose preference is relative to the pair's CURRENT label (CHOSEN = agrees).
LLMJudge asks a ChatBackend; other judges (a simulated judge of stated accuracy for studies,
a human desk, ...) only need `name` and `judge`.

Self-consistency: each judge is sampled n times and its votes reduced by majority; the
per-judge results are then reduced by majority across judges. Abstentions never count as
votes; a tie is an abstention.

A model may have a prompt budget (`max_prompt_chars`, system + user message characters): a judge drops
retrieved examples, the last (least similar) first, until its prompt fits; a pair that does not fit without
any is not sent (a server answers HTTP 400 past its context length, on every replay): its samples abstain.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from prometheus_client import Counter as PromCounter

from synpref.services.annotator.answer_cache import AnswerCache as AnswerCache
from synpref.services.annotator.chat import ChatBackend
from synpref.services.annotator.prompts import (
    ATTRIBUTE_SCHEMA,
    JUDGE_SCHEMA,
    PROMPT_EXAMPLES,
    PROMPT_VERSION,
    Example,
    attribute_prompt,
    judge_prompt,
    parse_attributes,
    parse_judgement,
    response_format,
)
from synpref.v1.pair_pb2 import (
    PREFERENCE_ABSTAIN,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    Attributes,
    JudgeAggregate,
    JudgeVote,
)

Messages = list[dict[str, str]]
PROMPT_TOO_LONG = PromCounter(
    "synpref_judge_prompt_too_long_calls",
    "Judge and labeller calls not sent: the pair's prompt, without examples, is over the model's max_prompt_chars "
    "(a judge's samples abstain, a labeller gives no attributes)",
    ["model"],
)


NO_ANSWER = "no answer (request failed, cut off at max_tokens, or left out by a server that ignores n at temperature 0)"


@dataclass(frozen=True)
class JudgeRequest:
    """One pair to judge: its messages, optional attributes and D_gold examples for the prompt, and meta."""

    pair_id: str
    conversation: Messages
    chosen: Messages
    rejected: Messages
    attributes: dict[str, Any] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


class Judge(Protocol):
    """Anything that votes on a pair: `name` labels its votes."""

    name: str

    async def judge(self, request: JudgeRequest) -> list[JudgeVote]:
        """The judge's votes on the pair (one per sample; abstentions included)."""
        ...


def candidate_orders(pair_id: str, judge: str, samples: int, seed: int = 0) -> list[bool]:
    """For each sample, whether chosen is shown as Candidate 2: random, but the same on replay."""
    rng = random.Random(f"{seed}:{pair_id}:{judge}")
    return [rng.random() < 0.5 for _ in range(samples)]


class _CachedLLM:
    """A model behind a ChatBackend whose answers are cached per pair, model and prompt version."""

    def __init__(
        self,
        backend: ChatBackend,
        cache: AnswerCache | None,
        prompt_version: str,
        json_mode: str,
        temperature: float,
        max_prompt_chars: int = 0,
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.cache = cache or AnswerCache(None)
        self.prompt_version = prompt_version
        self.json_mode = json_mode
        self.temperature = temperature
        self.max_prompt_chars = max_prompt_chars

    def too_long(self, messages: Messages) -> bool:
        """Whether `messages` hold more characters than max_prompt_chars (0: no limit)."""
        return 0 < self.max_prompt_chars < sum(len(m["content"]) for m in messages)

    def prompt_digest(self, prompt: Any) -> str:
        """A digest of everything a cached answer depends on beyond its key: the rendered prompt, the sampling
        temperature and the JSON mode. An answer cached under another digest is stale: asked again."""
        text = json.dumps([prompt, self.temperature, self.json_mode], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


class LLMJudge(_CachedLLM):
    """A judge model behind a ChatBackend, sampled n times (grouped by candidate order).

    Its cached answers carry a digest of the prompt they answered: a replay with other examples,
    attributes, temperature or JSON mode asks again instead of reusing them. With `max_prompt_chars` the
    examples that do not fit are dropped (the last first) and a pair that does not fit alone abstains unsent.
    """

    def __init__(
        self,
        backend: ChatBackend,
        samples: int = 3,
        temperature: float = 0.7,
        cache: AnswerCache | None = None,
        prompt_version: str = PROMPT_VERSION,
        json_mode: str = "json_schema",
        seed: int = 0,
        max_prompt_chars: int = 0,
    ) -> None:
        super().__init__(backend, cache, prompt_version, json_mode, temperature, max_prompt_chars)
        self.samples = samples
        self.seed = seed

    def fitted(self, request: JudgeRequest) -> JudgeRequest | None:
        """`request` with the most of its examples (in order) whose prompt fits max_prompt_chars; None when the pair
        alone does not fit. Both candidate orders render to the same length."""
        r = request
        if self.max_prompt_chars <= 0:
            return r
        for n in range(len(r.examples), -1, -1):
            if not self.too_long(judge_prompt(r.conversation, r.chosen, r.rejected, r.attributes, r.examples[:n])):
                return r if n == len(r.examples) else replace(r, examples=r.examples[:n])
        return None

    def shown_examples(self, request: JudgeRequest) -> list[Example]:
        """The examples of `request` its prompt holds: those that fit max_prompt_chars, at most the PROMPT_EXAMPLES a
        prompt renders; none when the pair is not sent."""
        fitted = self.fitted(request)
        return [] if fitted is None else fitted.examples[:PROMPT_EXAMPLES]

    def _context(self, request: JudgeRequest) -> str:
        """The prompt digest of the request (attributes and retrieved examples included: D_gold grows every
        iteration)."""
        r = request
        return self.prompt_digest(judge_prompt(r.conversation, r.chosen, r.rejected, r.attributes, r.examples))

    async def _answers(self, request: JudgeRequest) -> list[dict[str, Any]]:
        key = ("judge", request.pair_id, self.name, self.prompt_version)
        context = self._context(request)
        cached = self.cache.get(*key)
        # Answers to another prompt (other examples or attributes) are stale: ask again and overwrite them.
        if (
            isinstance(cached, list)
            and len(cached) >= self.samples
            and all(isinstance(a, dict) and a.get("context") == context for a in cached[: self.samples])
        ):
            return cached[: self.samples]
        orders = candidate_orders(request.pair_id, self.name, self.samples, self.seed)
        answers: list[dict[str, Any] | None] = [None] * self.samples
        complete = True
        for swapped in (False, True):
            idx = [i for i, s in enumerate(orders) if s == swapped]
            if not idx:
                continue
            first, second = (request.rejected, request.chosen) if swapped else (request.chosen, request.rejected)
            messages = judge_prompt(request.conversation, first, second, request.attributes, request.examples)
            texts = await self.backend.chat(
                messages,
                n=len(idx),
                temperature=self.temperature,
                response_format=response_format(JUDGE_SCHEMA, "preference", self.json_mode),
            )
            for i, text in zip(idx, texts, strict=True):
                complete &= text is not None
                answers[i] = {"sample": i, "swapped": swapped, "text": text, "context": context}
        result = [a for a in answers if a is not None]
        if complete:
            self.cache.put(result, *key)
        return result

    async def judge(self, request: JudgeRequest) -> list[JudgeVote]:
        """One vote per sampled answer: which response won, mapped back through the candidate order;
        a failed request or an unparseable answer abstains, and so does every sample of a pair whose prompt is over
        max_prompt_chars without examples (not sent: the server would refuse it).
        """
        fitted = self.fitted(request)
        if fitted is None:
            PROMPT_TOO_LONG.labels(self.name).inc()
            r = request
            chars = sum(len(m["content"]) for m in judge_prompt(r.conversation, r.chosen, r.rejected, r.attributes))
            rationale = f"not sent: {chars} chars without examples, over max_prompt_chars ({self.max_prompt_chars})"
            orders = candidate_orders(request.pair_id, self.name, self.samples, self.seed)
            return [
                JudgeVote(
                    judge=self.name,
                    sample=i,
                    preference=PREFERENCE_ABSTAIN,
                    candidate_order_swapped=swapped,
                    rationale=rationale,
                    prompt_version=self.prompt_version,
                )
                for i, swapped in enumerate(orders)
            ]
        votes = []
        for answer in await self._answers(fitted):
            better, rationale = parse_judgement(answer["text"])
            if answer["text"] is None:
                preference, rationale = PREFERENCE_ABSTAIN, NO_ANSWER
            elif better is None:
                preference = PREFERENCE_ABSTAIN
            else:
                chosen_won = (better == 1) != answer["swapped"]
                preference = PREFERENCE_CHOSEN if chosen_won else PREFERENCE_REJECTED
            votes.append(
                JudgeVote(
                    judge=self.name,
                    sample=answer["sample"],
                    preference=preference,  # type: ignore[arg-type]
                    candidate_order_swapped=answer["swapped"],
                    rationale=rationale,
                    prompt_version=self.prompt_version,
                )
            )
        return votes


class AttributeLabeller(_CachedLLM):
    """The 5-tuple from an LLM (one low-temperature sample, cached).

    The two responses are shown in an order drawn per pair (seeded like the judges' candidate orders, so a replay
    sends the same prompt): a chosen response always shown first leaked the label into the guideline and desired
    attributes the judges then follow. Its cached answer carries a digest of the prompt it answered, as LLMJudge's
    do: an answer to another prompt (an older order or text, another temperature or JSON mode) is asked again.
    """

    def __init__(
        self,
        backend: ChatBackend,
        cache: AnswerCache | None = None,
        prompt_version: str = PROMPT_VERSION,
        json_mode: str = "json_schema",
        temperature: float = 0.0,
        seed: int = 0,
        max_prompt_chars: int = 0,
    ) -> None:
        super().__init__(backend, cache, prompt_version, json_mode, temperature, max_prompt_chars)
        self.seed = seed

    def prompt(self, request: JudgeRequest) -> tuple[Messages, bool]:
        """The labeller's messages for the pair, and whether the chosen response is shown second (as Response B)."""
        # Its own stream ("attributes/<name>"): a model that is also a judge does not tie this order to its sample 0.
        (swapped,) = candidate_orders(request.pair_id, f"attributes/{self.name}", 1, self.seed)
        first, second = (request.rejected, request.chosen) if swapped else (request.chosen, request.rejected)
        return attribute_prompt(request.conversation, first, second), swapped

    async def label(self, request: JudgeRequest) -> Attributes | None:
        """The pair's attribute 5-tuple from one (cached) answer, or None when it is not usable (or the prompt is over
        max_prompt_chars: not sent)."""
        key = ("attributes", request.pair_id, self.name, self.prompt_version)
        messages, swapped = self.prompt(request)
        if self.too_long(messages):
            PROMPT_TOO_LONG.labels(self.name).inc()
            return None
        context = self.prompt_digest(messages)
        cached = self.cache.get(*key)
        if isinstance(cached, dict) and "text" in cached and cached.get("context") == context:
            answer = cached["text"]
        else:
            (answer,) = await self.backend.chat(
                messages,
                n=1,
                temperature=self.temperature,
                response_format=response_format(ATTRIBUTE_SCHEMA, "attributes", self.json_mode),
            )
            if answer is not None:
                self.cache.put({"text": answer, "swapped": swapped, "context": context}, *key)
        return parse_attributes(answer, self.name)


def examples_shown(judges: list[Judge], request: JudgeRequest) -> list[Example]:
    """The examples of `request` that some judge's prompt held, in order: a judge over its prompt budget drops the
    last ones, so this is the longest of the judges' prefixes. A judge without `shown_examples` (no prompt budget:
    a simulated judge, a desk) counts as given them all.

    A record's retrieved_example_ids lists these: the desk shows them as the examples the judges saw, and an example
    a budget dropped was never shown to any.
    """
    shown: list[list[Example]] = []
    for judge in judges:
        held = getattr(judge, "shown_examples", None)
        shown.append(held(request) if held is not None else request.examples)
    return max(shown, key=len, default=[])


def majority(preferences: list[int]) -> int:
    """CHOSEN or REJECTED by strict majority of non-abstaining votes; ABSTAIN on a tie or none."""
    counts = Counter(p for p in preferences if p in (PREFERENCE_CHOSEN, PREFERENCE_REJECTED))
    if counts[PREFERENCE_CHOSEN] > counts[PREFERENCE_REJECTED]:
        return PREFERENCE_CHOSEN
    if counts[PREFERENCE_REJECTED] > counts[PREFERENCE_CHOSEN]:
        return PREFERENCE_REJECTED
    return PREFERENCE_ABSTAIN


def aggregate(votes: list[JudgeVote]) -> JudgeAggregate:
    """Self-consistency within each judge, then majority across judges."""
    by_judge: dict[str, list[int]] = {}
    for vote in votes:
        by_judge.setdefault(vote.judge, []).append(vote.preference)
    per_judge = [majority(prefs) for prefs in by_judge.values()]
    voting = [p for p in per_judge if p != PREFERENCE_ABSTAIN]
    overall = majority(voting)
    agreement = (sum(p == overall for p in voting) / len(voting)) if voting and overall != PREFERENCE_ABSTAIN else 0.0
    return JudgeAggregate(
        preference=overall,  # type: ignore[arg-type]
        agreement=agreement,
        judges_voting=len(voting),
        judges_abstaining=len(per_judge) - len(voting),
    )
