"""A real local judge: a tiny random transformers causal LM behind the same Judge plumbing."""

from __future__ import annotations

import asyncio

import pytest

from synpref.services.annotator.judges import AnswerCache, JudgeRequest, LLMJudge, aggregate
from synpref.services.annotator.local_chat import LocalChat
from synpref.v1.pair_pb2 import PREFERENCE_ABSTAIN, PREFERENCE_CHOSEN, PREFERENCE_REJECTED

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from testing.tiny import build_tiny_tokenizer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny-lm")
    text = 'Candidate 1 Candidate 2 {"rationale": "the first is better", "better": 1} {"better": 2} judge answer JSON'
    tokenizer = build_tiny_tokenizer(out, texts=[text] * 20, style="qwen", vocab_size=400)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return str(out)


REQUEST = JudgeRequest(
    "pair-local",
    [{"role": "user", "content": "Which is bigger, 2 or 3?"}],
    [{"role": "assistant", "content": "3 is bigger."}],
    [{"role": "assistant", "content": "2."}],
)


def test_local_tiny_lm_judge_samples_and_abstains_on_junk(tiny_lm, tmp_path):
    backend = LocalChat.from_pretrained(tiny_lm, name="tiny-local", max_new_tokens=12)
    judge = LLMJudge(backend, samples=3, temperature=1.0, cache=AnswerCache(tmp_path))
    votes = asyncio.run(judge.judge(REQUEST))
    assert len(votes) == 3 and [v.sample for v in votes] == [0, 1, 2]
    assert all(v.judge == "tiny-local" for v in votes)
    # A random 1-layer LM writes tokens, not a verdict: every vote must be a well-formed
    # preference, and anything unparseable an abstention with its reason.
    for vote in votes:
        assert vote.preference in (PREFERENCE_CHOSEN, PREFERENCE_REJECTED, PREFERENCE_ABSTAIN)
        if vote.preference == PREFERENCE_ABSTAIN:
            assert vote.rationale
    assert aggregate(votes).judges_voting + aggregate(votes).judges_abstaining == 1
    # A random LM does not end its answer within 12 tokens: cut off, each is no answer, so nothing is cached for
    # replay (a larger max_new_tokens must ask again); answers that ended are cached (test_review43_localchat).
    assert all(v.preference == PREFERENCE_ABSTAIN for v in votes)
    assert judge.cache.get("judge", REQUEST.pair_id, "tiny-local", judge.prompt_version) is None


def test_local_chat_generates_n_samples(tiny_lm):
    backend = LocalChat.from_pretrained(tiny_lm, max_new_tokens=5)
    texts = asyncio.run(backend.chat([{"role": "user", "content": "hi"}], n=4, temperature=1.0))
    assert len(texts) == 4 and all(t is None or isinstance(t, str) for t in texts)  # None: cut off at 5 tokens
    greedy = asyncio.run(backend.chat([{"role": "user", "content": "hi"}], n=2, temperature=0.0))
    assert greedy[0] == greedy[1]
