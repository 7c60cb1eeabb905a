"""Chat-template encoding, truncation and reward reading on tiny models and the real MiniLM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from synpref.shared.batched_rewards import length_batches, reward_of
from synpref.shared.modeling import (
    encode_conversation,
    encode_pair,
    encode_text,
    load_reward_model,
    score_pairs,
    token_ids,
)
from testing.numerics import approx_fp32_forward
from testing.tiny import build_tiny_reward_model, minilm_path

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["qwen3", "llama", "bert"])
def tiny(request, tmp_path_factory):
    path = build_tiny_reward_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1)
    model, tok = load_reward_model(str(path))
    return request.param, path, model, tok


def _conv(turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "be kind"}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question number {i} " + "word " * 20})
        msgs.append({"role": "assistant", "content": f"answer number {i} " + "word " * 20})
    return msgs


def test_exactly_one_bos_and_pad_in_config(tiny):
    arch, _, model, tok = tiny
    enc = encode_conversation(tok, _conv(1), max_length=4096)
    assert enc.fits and not enc.truncated
    assert model.config.pad_token_id == tok.pad_token_id is not None
    assert not model.training
    if arch == "llama":
        # The template writes BOS and the tokenizer would add another: exactly one survives.
        assert enc.input_ids[0] == tok.bos_token_id != enc.input_ids[1]
        assert enc.input_ids.count(tok.bos_token_id) == 1
    elif arch == "bert":
        assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[-1] == tok.sep_token_id
    else:
        assert tok.bos_token_id is None
        assert tok.decode(enc.input_ids).startswith("<|im_start|>system")


def test_left_turns_cuts_old_turns_and_keeps_response_whole(tiny):
    _, _, _, tok = tiny
    msgs = _conv(6)
    full = encode_conversation(tok, msgs, max_length=100_000)
    last_two = encode_conversation(tok, [msgs[0], *msgs[-2:]], max_length=100_000)
    enc = encode_conversation(tok, msgs, max_length=len(last_two.input_ids) + 5)
    assert len(full.input_ids) > len(enc.input_ids)
    assert enc.fits and enc.truncated and enc.dropped_turns == 10
    assert enc.input_ids == last_two.input_ids  # system + last exchange, response untouched
    text = tok.decode(enc.input_ids)
    assert "question number 5" in text and "answer number 5" in text and "be kind" in text
    assert "question number 4" not in text


def test_left_turns_cuts_both_sides_of_a_pair_to_the_same_turns(tiny):
    # Found in review: each side dropped old turns on its own, so a short response kept the whole
    # conversation while a long one to the same prompt kept only the last exchange.
    _, _, _, tok = tiny
    msgs = _conv(4)
    conv, short = msgs[:-1], [{"role": "assistant", "content": "ok"}]
    long = [{"role": "assistant", "content": "a much longer answer " * 12}]
    alone = encode_conversation(tok, conv + short, max_length=100_000)
    budget = len(alone.input_ids) + 4  # the short side fits whole, the long one must drop turns
    chosen, rejected = encode_pair(tok, {"conversation": conv, "chosen": short, "rejected": long}, budget)
    assert rejected.dropped_turns > 0 and chosen.dropped_turns == rejected.dropped_turns
    assert chosen.fits and rejected.fits and len(chosen.input_ids) < len(alone.input_ids)
    kept = [tok.decode(e.input_ids) for e in (chosen, rejected)]
    assert all("question number 3" in t and "be kind" in t and "question number 0" not in t for t in kept)
    flipped = encode_pair(tok, {"conversation": conv, "chosen": long, "rejected": short}, budget)
    assert [e.input_ids for e in flipped] == [rejected.input_ids, chosen.input_ids]


def test_unfittable_pair_is_reported_not_hidden(tiny):
    _, _, _, tok = tiny
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long answer " * 200}]
    enc = encode_conversation(tok, msgs, max_length=64)
    assert not enc.fits and enc.truncated and len(enc.input_ids) == 64
    assert encode_conversation(tok, msgs, max_length=64, truncation="left_tokens").fits
    right = encode_conversation(tok, msgs, max_length=64, truncation="right")
    assert right.fits and len(right.input_ids) == 64
    assert not encode_conversation(tok, msgs, max_length=64, truncation="none").fits
    with pytest.raises(ValueError):
        encode_conversation(tok, msgs, max_length=64, truncation="middle")  # type: ignore[arg-type]


def test_plain_text_path_collapses_duplicated_bos(tiny):
    arch, _, _, tok = tiny
    rendered = tok.apply_chat_template(_conv(1), tokenize=False) if tok.chat_template else "user: hi"
    enc = encode_text(tok, rendered, max_length=4096)
    if arch == "llama":
        assert enc.input_ids[:2] != [tok.bos_token_id] * 2
    assert enc.input_ids == encode_conversation(tok, _conv(1), 4096).input_ids or arch == "bert"


def test_reward_of_matches_single_text_logits(tiny):
    _, path, model, tok = tiny
    texts = [_conv(1), _conv(2), _conv(1)[:2]]
    ids = [encode_conversation(tok, m, 4096).input_ids for m in texts]
    batched = reward_of(model, ids, tok.pad_token_id)
    fresh = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        singles = [fresh(input_ids=torch.tensor([seq])).logits[0][0].item() for seq in ids]
    # Batched and padded vs one at a time: the same fp32 arithmetic summed in another order.
    assert batched == approx_fp32_forward(singles)


def test_score_pairs_in_input_order(tiny):
    _, _, model, tok = tiny
    pairs = [
        {
            "conversation": _conv(i)[:-1],
            "chosen": [{"role": "assistant", "content": "yes " * (i + 1)}],
            "rejected": [{"role": "assistant", "content": "no"}],
            "source": "t",
        }
        for i in range(1, 5)
    ]
    got = [r for rewards in score_pairs(model, tok, pairs, max_length=4096, batch_size=3) for r in rewards]
    singles = [
        reward_of(model, [side.input_ids], tok.pad_token_id)[0]
        for pair in pairs
        for side in encode_pair(tok, pair, 4096)
    ]
    # Batches of 3 by length vs one sequence at a time: fp32 rounding in another order.
    assert got == approx_fp32_forward(singles)


def test_length_batches_respect_limits():
    lengths = [5, 50, 7, 49, 6, 48, 100]
    batches = length_batches(lengths, batch_size=3, max_tokens=150)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= max(150, max(lengths[i] for i in b))


def test_real_minilm_loads_as_reward_model(tmp_path):
    # The published MiniLM has no classifier (load_reward_model refuses it): give it one, as training does.
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    model, tok = load_reward_model(str(tmp_path))
    enc = encode_conversation(tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], 512)
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids.count(tok.cls_token_id) == 1
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    rewards = reward_of(model, [enc.input_ids, [*enc.input_ids[:4], tok.sep_token_id]], tok.pad_token_id)
    assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)


TEXTS = ["hello", "", "  two  spaces\n\nand lines", "Ünïcödé ✓ 漢字 🙂", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_token_ids_from_the_rust_backend_are_the_tokenizer_calls(tiny, add_special_tokens):
    _, _, _, tok = tiny
    minilm_tok = AutoTokenizer.from_pretrained(minilm_path())
    for t in (tok, minilm_tok):
        t("x")  # a call without truncation clears the backend's (MiniLM's tokenizer.json sets 128)
        assert t.backend_tokenizer.truncation is None  # else token_ids takes the call, and this test nothing
        texts = [*TEXTS, t.decode([5, 6, 7]), (t.bos_token or "") + "x" + (t.eos_token or "")]
        for text in texts:
            assert token_ids(t, text, add_special_tokens) == t(text, add_special_tokens=add_special_tokens)["input_ids"]
    # A truncation left on the backend (transformers sets it for a truncating call) is not inherited.
    tok.backend_tokenizer.enable_truncation(8)
    assert len(token_ids(tok, "word " * 50, add_special_tokens)) > 8


@pytest.mark.parametrize("truncation", ["left_turns", "left_tokens", "right"])
def test_messages_are_cut_to_the_character_budget_before_tokenizing(tiny, truncation):
    # A message over max_length x 32 characters is over max_length tokens for any vocabulary, so
    # its far side goes before tokenizing: the kept tokens are those of the uncut text, and a
    # megabyte response (a poison record near the topic limit) no longer costs a megabyte of
    # tokenizer time in the gold-scorer, the controller or the trainer.
    _, _, _, tok = tiny
    words = " ".join(f"w{i % 97}" for i in range(4000))  # ~19k characters
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": words}]
    cut = encode_conversation(tok, msgs, 64, truncation)
    uncut = encode_conversation(tok, msgs, 64, truncation, max_chars_per_token=10**9)
    assert cut.input_ids == uncut.input_ids and (cut.truncated, cut.fits) == (uncut.truncated, uncut.fits)
    # "none" never cuts: an item too long is reported, not shortened.
    assert not encode_conversation(tok, msgs, 64, "none").fits


def test_a_local_folder_loads_without_asking_a_hub(tiny, monkeypatch):
    # Issue 12: a model folder (an admin reload, a registry path) loads local_files_only, so nothing
    # in it can send transformers to a hub; the model still loads and scores as before.
    import transformers

    _, path, _, _ = tiny
    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(name, *args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    model, _ = load_reward_model(str(path))
    assert seen == [True] and model.config.num_labels == 1
