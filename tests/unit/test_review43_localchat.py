"""Review 43: a local judge's answer cut off at max_new_tokens is no answer (as OpenAIChat's finish_reason
"length"): not voted on, not cached, so a larger max_new_tokens asks again."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from synpref.services.annotator.judges import AnswerCache, JudgeRequest, LLMJudge
from synpref.services.annotator.local_chat import LocalChat

EOS, PAD = 1, 0
VOCAB = {i + 10: c for i, c in enumerate('{}":, rationalebtr12')}
ANSWER = '{"better":1}'
REQUEST = JudgeRequest(
    "p",
    [{"role": "user", "content": "q"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "assistant", "content": "b"}],
)


class ScriptedTokenizer:
    eos_token_id, pad_token_id = EOS, PAD

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "prompt"

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor([[5, 6, 7]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(VOCAB.get(int(i), "") for i in ids)


class ScriptedLM:
    """generate() writes ANSWER then its end token, cut at max_new_tokens as transformers does."""

    def __init__(self) -> None:
        inverse = {c: i for i, c in VOCAB.items()}
        self.answer = [inverse[c] for c in ANSWER] + [EOS]
        self.generation_config = SimpleNamespace(eos_token_id=[EOS, 99])

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, num_return_sequences, max_new_tokens, **kwargs):
        return torch.tensor([input_ids[0].tolist() + self.answer[:max_new_tokens]] * num_return_sequences)


def test_a_cut_off_local_answer_is_no_answer_and_is_not_cached(tmp_path):
    # Before, LocalChat returned the cut-off draft: the judge voted on it or abstained, and cached it, so raising
    # max_new_tokens replayed the same draft for the cache's lifetime.
    short = LocalChat(ScriptedLM(), ScriptedTokenizer(), name="local", max_new_tokens=len(ANSWER) - 3)
    assert asyncio.run(short.chat([], n=2, temperature=0.0)) == [None, None]
    cache = AnswerCache(tmp_path)
    asyncio.run(LLMJudge(short, samples=2, cache=cache).judge(REQUEST))
    assert cache.get("judge", "p", "local", LLMJudge(short).prompt_version) is None
    # Room for the whole answer and its end token: an answer, and the judge votes on it.
    room = LocalChat(ScriptedLM(), ScriptedTokenizer(), name="local", max_new_tokens=len(ANSWER) + 1)
    assert asyncio.run(room.chat([], n=2, temperature=0.0)) == [ANSWER, ANSWER]
    votes = asyncio.run(LLMJudge(room, samples=2, cache=cache).judge(REQUEST))
    assert all(v.preference in (1, 2) for v in votes)
