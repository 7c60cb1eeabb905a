"""Review 40, task D1: the attribute labeller shows the two responses in a per-pair random order (not chosen first),
the same on replay, and its cached answers are tied to the prompt they answered."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from synpref.services.annotator.judges import AnswerCache, AttributeLabeller, JudgeRequest

ANSWER = json.dumps(
    {
        "task_category": "science",
        "objectivity": "objective",
        "controversiality": "low",
        "desired_attributes": ["correct"],
        "annotation_guideline": "Prefer correct physics.",
    }
)
CHOSEN, REJECTED = "CHOSEN-TEXT: the moon's gravity", "REJECTED-TEXT: wind"


class RecordingChat:
    """A chat backend that answers a fixed 5-tuple and keeps every prompt it was sent."""

    name = "attr-model"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def chat(
        self, messages: list[dict[str, str]], *, n: int, temperature: float, response_format: Any = None
    ) -> list[str | None]:
        self.prompts.append(messages[-1]["content"])
        return [ANSWER] * n


def request(pair_id: str) -> JudgeRequest:
    return JudgeRequest(
        pair_id=pair_id,
        conversation=[{"role": "user", "content": f"Explain tides. [{pair_id}]"}],
        chosen=[{"role": "assistant", "content": CHOSEN}],
        rejected=[{"role": "assistant", "content": REJECTED}],
    )


def chosen_shown_first(prompt: str) -> bool:
    a, b = prompt.index("## Response A"), prompt.index("## Response B")
    assert a < b
    return a < prompt.index(CHOSEN) < b


def pair_of(prompt: str) -> str:
    return prompt.split("Explain tides. [", 1)[1].split("]", 1)[0]


def label_all(labeller: AttributeLabeller, pair_ids: list[str]) -> None:
    async def go() -> None:
        for pair_id in pair_ids:
            assert await labeller.label(request(pair_id)) is not None

    asyncio.run(go())


def test_attribute_prompt_order_is_random_per_pair_and_the_same_on_replay() -> None:
    pair_ids = [f"p{i}" for i in range(40)]
    first, again = RecordingChat(), RecordingChat()
    label_all(AttributeLabeller(first), pair_ids)
    label_all(AttributeLabeller(again), pair_ids)
    orders = [chosen_shown_first(p) for p in first.prompts]
    # The old prompt showed the chosen response as Response A for every pair: the label leaked into the guideline.
    assert 10 <= sum(orders) <= 30, orders
    assert again.prompts == first.prompts  # replay: the same prompts, so cached answers stay valid
    for prompt in first.prompts:  # both responses shown, each once
        assert prompt.count(CHOSEN) == 1 and prompt.count(REJECTED) == 1


def test_attribute_cache_reuses_answers_to_the_same_prompt_only(tmp_path) -> None:
    cache_dir = tmp_path / "cache"
    pair_ids = [f"p{i}" for i in range(20)]
    chat = RecordingChat()
    label_all(AttributeLabeller(chat, cache=AnswerCache(cache_dir)), pair_ids)
    assert len(chat.prompts) == 20
    label_all(AttributeLabeller(chat, cache=AnswerCache(cache_dir)), pair_ids)
    assert len(chat.prompts) == 20  # replay: answered from the cache
    # Another seed draws other orders: the pairs whose prompt changed are asked again, the others are not.
    reseeded = RecordingChat()
    label_all(AttributeLabeller(reseeded, cache=AnswerCache(cache_dir), seed=7), pair_ids)
    old_order = {pair_of(p): chosen_shown_first(p) for p in chat.prompts}
    seven = AttributeLabeller(RecordingChat(), seed=7)
    new_order = {p: chosen_shown_first(seven.prompt(request(p))[0][-1]["content"]) for p in pair_ids}
    changed = sorted(p for p in pair_ids if new_order[p] != old_order[p])
    assert 0 < len(changed) < 20
    assert sorted(pair_of(p) for p in reseeded.prompts) == changed


def test_an_answer_cached_before_the_order_was_drawn_is_asked_again(tmp_path) -> None:
    # An entry of the old labeller ({"text": ...}, no prompt digest) answered a chosen-first prompt: reusing it kept
    # the leaked guideline. It is asked again, and the new answer replaces it.
    cache = AnswerCache(tmp_path)
    chat = RecordingChat()
    labeller = AttributeLabeller(chat, cache=cache)
    key = ("attributes", "p1", chat.name, labeller.prompt_version)
    cache.put({"text": ANSWER.replace("Prefer correct physics.", "Prefer Response A.")}, *key)
    label_all(labeller, ["p1"])
    assert len(chat.prompts) == 1
    stored = cache.get(*key)
    assert stored["text"] == ANSWER and "context" in stored and isinstance(stored["swapped"], bool)
